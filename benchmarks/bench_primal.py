"""Seconds per permutation prefix of the feature-space (primal) regression vs its k·D² floor, and the dual.

One process, one BLAS thread (set before numpy is imported and pinned with threadpoolctl). Synthetic
features of an eNTK-like power-law spectrum (singular values ~ j^-1/2), raw scale ~100, stored in float32,
reference scaling (divisor 1e4, lam 1e-6); ``m`` test points, first-logit kernel (``g = 1``, ``C = 2``).

For each ``D`` and prefix length ``k``:

* primal: ``run_permutation`` on a :class:`FeatureProblem` of ``n = k`` points, no truncation (the whole
  TMC step: QR row updates, every prefix's predictions, utilities), for each block size;
* floor: ``k·D²`` flops at the float64 GEMM rate measured in this process (best of the rates measured
  before and after, so a burst of load on a shared machine does not flatter the ratio);
* model: the primal's flop count ``k·(2D² + 4DM + 4qD + 4q²/3)`` (``M = m``, ``q`` the block) over the
  floor, and the achieved fraction of the GEMM rate;
* dual: ``run_permutation`` on ``to_dual()`` of the same problem (the kernel itself is not timed), its
  floor ``(k³/3 + M·k²)`` flops, when ``k`` is at most ``--dual-max``;
* accuracy (``D <= --check-max``): the largest relative difference between primal and dual predictions
  over the prefixes ending each block of 256, against the derived bound
  ``10·(N + D)·cond·eps + 10·N·cond_dual·eps`` (``cond = (λ_max(Φ̃ᵀΦ̃) + λ)/λ``, as in tests/test_primal.py).

Usage: python benchmarks/bench_primal.py [--dims 2048 8192] [--k 4000 2000] [--m 500] [--blocks 64 256]
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from threadpoolctl import threadpool_info, threadpool_limits  # noqa: E402

from freeshap_ray.utility import FeatureProblem, IncrementalRegressor, PrimalRegressor, solver_costs  # noqa: E402
from freeshap_ray.valuation import permutation_for, run_permutation  # noqa: E402


def gemm_rate(size: int = 2000, reps: int = 3) -> float:
    """Float64 GEMM flop/s (best of ``reps``)."""
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(size, size)), rng.normal(size=(size, size))
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best


def synthetic(n: int, m: int, D: int, seed: int = 0) -> FeatureProblem:
    rng = np.random.default_rng(seed)
    phi = (rng.normal(size=(n + m, D)) * (np.arange(1, D + 1) ** -0.5) * 100.0).astype(np.float32)
    y = np.argmax(phi[:, :16] @ rng.normal(size=(16, 2)) + 30.0 * rng.normal(size=(n + m, 2)), axis=1)
    return FeatureProblem.from_features(phi[:n], phi[n:], y[:n], y[n:], n_classes=2, lam=1e-6, kernel_divisor=1e4)


def timed_walk(problem, perm: np.ndarray, block: int) -> float:
    t = time.perf_counter()
    run_permutation(problem, perm, "accuracy", truncation_tol=0, v_full=0.5, block_size=block)
    return time.perf_counter() - t


def accuracy(prob: FeatureProblem, dual, perm: np.ndarray, block: int = 256) -> tuple[float, float]:
    """(max relative primal-vs-dual difference over block-end prefixes, derived bound)."""
    p, d, worst = PrimalRegressor(prob), IncrementalRegressor(dual), 0.0
    for s in range(0, perm.size, block):
        a, b = p.extend(perm[s:s + block])[-1], d.extend(perm[s:s + block])[-1]
        worst = max(worst, float(np.abs(a - b).max() / np.abs(b).max()))
    eps, N = float(np.finfo(np.float64).eps), prob.phi_train.shape[0]
    top = float(np.linalg.eigvalsh(prob.gram())[-1])
    eig = np.linalg.eigvalsh(dual.K)
    cond_dual = (eig[-1] + prob.lam) / (max(eig[0], 0.0) + prob.lam)
    bound = 10 * (N + prob.dim) * (top + prob.lam) / prob.lam * eps + 10 * N * cond_dual * eps
    return worst, bound


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--k", type=int, nargs="+", default=[4000, 2000], help="prefix length per D (last repeats)")
    ap.add_argument("--m", type=int, default=500)
    ap.add_argument("--blocks", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--dual-max", type=int, default=8000, help="largest k for which the dual is timed")
    ap.add_argument("--check-max", type=int, default=4096, help="largest D for the accuracy check")
    args = ap.parse_args()
    with threadpool_limits(limits=1):
        blas = [(i.get("internal_api"), i.get("num_threads")) for i in threadpool_info()]
        rate0 = gemm_rate()
        rows, checks = [], []
        for j, D in enumerate(args.dims):
            k = args.k[min(j, len(args.k) - 1)]
            prob = synthetic(k, args.m, D)
            perm = permutation_for(k, seed=0, perm_id=0)
            floor = k * D**2
            for q in args.blocks:
                secs = timed_walk(prob, perm, q)
                model = solver_costs(k, args.m, D, 1, k, block_size=q)["primal"]["flops"]
                rows.append(("primal", D, k, q, secs, floor, model))
            if k <= args.dual_max:
                dual = prob.to_dual()
                secs = timed_walk(dual, perm, 64)
                model = solver_costs(k, args.m, D, 1, k, block_size=64)["dual"]["flops"]
                rows.append(("dual", D, k, 64, secs, model, model))
                if D <= args.check_max:
                    checks.append((D, k, *accuracy(prob, dual, perm)))
                del dual
        rate = max(rate0, gemm_rate())
    print(f"float64 GEMM rate: {rate / 1e9:.1f} GFLOP/s (1 thread; {rate0 / 1e9:.1f} before the runs); BLAS {blas}")
    print(f"m = {args.m} test points, first_logit, reference scaling; loadavg {os.getloadavg()[0]:.2f} on "
          f"{os.cpu_count()} cores")
    print(f"{'solver':>6} {'D':>5} {'k':>5} {'block':>5} {'seconds':>8} {'ms/point':>8} {'floor s':>8} "
          f"{'ratio':>6} {'model/floor':>11} {'GEMM frac':>9}")
    for solver, D, k, q, secs, floor, model in rows:
        fs = floor / rate
        print(f"{solver:>6} {D:>5} {k:>5} {q:>5} {secs:>8.2f} {1e3 * secs / k:>8.3f} {fs:>8.3f} {secs / fs:>6.2f} "
              f"{model / floor:>11.2f} {model / rate / secs:>9.2f}")
    print("primal floor: k·D² flops; dual floor: k³/3 + m·k² flops (both at the GEMM rate above).")
    for D, k, worst, bound in checks:
        print(f"accuracy D={D} k={k}: max rel. |primal - dual| over block-end prefixes {worst:.1e} "
              f"(derived bound {bound:.1e})")


if __name__ == "__main__":
    main()
