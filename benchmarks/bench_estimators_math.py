"""Estimators at equal CPU time: TMC, permutation, antithetic, control variate, stratified, MSR-Banzhaf.

One process, one BLAS thread, no Ray. A synthetic rank-``r`` kernel problem at the reference scaling
(divisor 1e4, lam 1e-6; as in ``bench_shapley.py``). For each utility (accuracy, neg_ce, margin) every
estimator runs until it has used ``--budget`` CPU seconds (``time.process_time``), then:

* ``split-half``: Spearman between the values of two disjoint halves of its samples (halves by sample
  id, or, for stratified, alternating within each stratum; each half has half the budget);
* ``vs ref``: Spearman of the full-budget values against a long-run reference of the same semivalue
  (Shapley: plain permutations without truncation, unbiased; Banzhaf: MSR) run for ``--ref-budget``;
* ``max|z|``: ``max_i |value_i - ref_i| / sqrt(se_i^2 + se_ref_i^2)`` (bias shows up here; unbiased
  estimators should stay near the Gaussian maximum of n draws, ~3.5 at n = 300);
* ``med se``: median stderr relative to the spread (5-95 % range) of the reference values;
* for MSR-Banzhaf also ``vs Shapley ref`` (how far Banzhaf ranks are from Shapley ranks).

Estimators:

* ``tmc``: permutations with the reference truncation (tol 0.05, patience 2);
* ``permutation``: permutations without truncation; ``antithetic``: reversed pairs;
* ``cv-size``/``cv-bins``: the permutation samples with the cross-fitted control variate (size profile
  ``1/(p+1), 1/sqrt(p+1)``, or post-stratification on size bins of ratio 4); the samples are the same
  as ``permutation``'s, so the control costs nothing extra here;
* ``stratified``: pilot (2 samples per stratum), measured seconds per stratum, pooled Neyman allocation
  with cost, every stratum sampled (unbiased);
* ``strat-thin``: values of the truncated target (sizes ``< L`` only, ``L`` = median TMC truncation point
  of 4 TMC permutations, counted in its budget), Neyman on the body and 1 sample per cycle in each tail
  stratum to measure the bias of the truncation (the note gives the mean measured |bias| / spread);
* ``strat-zero``: the same without any tail sample (bias unmeasured);
* ``msr``: MSR-Banzhaf.

Usage: python benchmarks/bench_estimators_math.py [--n 300] [--m 200] [--rank 64] [--budget 10]
       [--ref-budget 200] [--utilities accuracy,neg_ce,margin]
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_shapley import synthetic_problem  # noqa: E402

from freeshap_ray.utility import UTILITIES, IncrementalRegressor, RegressionProblem  # noqa: E402
from freeshap_ray.valuation import (  # noqa: E402
    BanzhafStats,
    CVStats,
    StrataStats,
    allocate,
    control_mean,
    empty_utility,
    full_utility,
    geometric_edges,
    msr_sample,
    run_permutation,
    sample_controls,
    sampler_permutation,
    samples_from_marginals,
    size_bin_basis,
    stratified_sample,
    uniform_plan,
)
from freeshap_ray.valuation.control_variate import DEFAULT_BASIS  # noqa: E402
from freeshap_ray.values import ValuesResult  # noqa: E402

cpu = time.process_time


# ---- references ----------------------------------------------------------------------------------------


def shapley_reference(prob: RegressionProblem, utilities: list[str], budget: float, seed: int = 10**6):
    """Plain permutations (no truncation) for ``budget`` CPU seconds; one walk serves every utility."""
    y = prob.y_test
    marg = {u: [] for u in utilities}
    empties = {u: empty_utility(prob, u) for u in utilities}
    t0, k = cpu(), 0
    while cpu() - t0 < budget:
        perm = sampler_permutation(prob.n, seed, k)
        preds = IncrementalRegressor(prob).extend(perm)
        for u in utilities:
            vals = np.concatenate([[empties[u]], UTILITIES[u].batch(preds, y)])
            row = np.empty(prob.n)
            row[perm] = np.diff(vals)
            marg[u].append(row)
        k += 1
    return {u: ValuesResult.from_marginals(np.array(m)) for u, m in marg.items()}, k


def banzhaf_reference(prob: RegressionProblem, utilities: list[str], budget: float, seed: int = 10**6):
    """MSR subsets for ``budget`` CPU seconds; one solve serves every utility."""
    from freeshap_ray.valuation import msr_subset

    y = prob.y_test
    masks, vals = [], {u: [] for u in utilities}
    t0, k = cpu(), 0
    while cpu() - t0 < budget:
        mask = msr_subset(prob.n, seed, k)
        pred = prob.predict(np.flatnonzero(mask))
        masks.append(mask)
        for u in utilities:
            vals[u].append(UTILITIES[u](pred, y))
        k += 1
    mk = np.array(masks)
    return {u: BanzhafStats.from_records(mk, np.array(v)).values() for u, v in vals.items()}, k


# ---- estimators at a CPU budget --------------------------------------------------------------------------


def perm_samples(prob, utility, budget, sampler, tol, seed):
    """Samples until the budget: ``(sample_ids, samples (S, n), cpu)``; antithetic pairs count as one sample."""
    vf = full_utility(prob, utility)
    per = 2 if sampler == "antithetic" else 1
    ids, rows = [], []
    t0, k = cpu(), 0
    while cpu() - t0 < budget:
        for half in range(per):
            pid = k * per + half
            perm = sampler_permutation(prob.n, seed, pid, sampler)
            rows.append(run_permutation(prob, perm, utility, truncation_tol=tol, v_full=vf).marginals)
            ids.append(pid)
        k += 1
    sid, samples = samples_from_marginals(np.array(ids), np.array(rows), sampler)
    return sid, samples, cpu() - t0


def halves_of(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two halves of sample positions: by (id // 2) parity, so each half keeps both control-variate folds."""
    a = (ids // 2) % 2 == 0
    return a, ~a


def run_permutation_family(prob, utility, budget, seed):
    out = {}
    for name, sampler, tol in (("tmc", "tmc", 0.05), ("permutation", "permutation", 0.0),
                               ("antithetic", "antithetic", 0.0)):
        ids, s, used = perm_samples(prob, utility, budget, sampler, tol, seed)
        a, b = halves_of(ids)
        out[name] = dict(full=ValuesResult.from_marginals(s), h1=ValuesResult.from_marginals(s[a]),
                         h2=ValuesResult.from_marginals(s[b]), samples=len(ids), cpu=used)
        if name == "permutation":
            for cv_name, basis in (("cv-size", DEFAULT_BASIS), ("cv-bins", size_bin_basis(geometric_edges(prob.n, 4)))):
                t0 = cpu()
                z = sample_controls(prob.n, seed, ids, "permutation", basis)
                mu = control_mean(prob.n, basis)
                extra = cpu() - t0
                full = CVStats.from_samples(ids, s, z, mu).values()
                out[cv_name] = dict(full=full, h1=CVStats.from_samples(ids[a], s[a], z[a], mu).values(),
                                    h2=CVStats.from_samples(ids[b], s[b], z[b], mu).values(), samples=len(ids),
                                    cpu=used + extra, note=f"var ratio {full.info['variance_ratio']:.2f}")
    return out


def run_stratified_budget(prob, utility, budget, seed, tail: str):
    """Pilot, measured-cost Neyman allocation, then samples until the budget (``tail``: sample, thin or zero)."""
    n = prob.n
    t0 = cpu()
    L = None
    zero_tail = tail == "zero"
    if tail != "sample":
        vf = full_utility(prob, utility)
        cuts = [run_permutation(prob, sampler_permutation(n, seed + 7, k), utility, truncation_tol=0.05,
                                v_full=vf).truncated_at for k in range(4)]
        L = int(np.clip(np.median(cuts), 1, n))
        L = None if L >= n else L
    edges = geometric_edges(n, truncation=L)
    pilot = uniform_plan(n, edges, per_cycle=1, tail_from=L if zero_tail else None)
    samples, strata, secs = [], [], np.zeros(edges.size - 1)
    k = 0
    for _ in range(2 * len(pilot.cycle)):
        h, _r = pilot.slot(k)
        t1 = cpu()
        samples.append(stratified_sample(prob, pilot, seed, k, utility))
        secs[h] += cpu() - t1
        strata.append(h)
        k += 1
    stats = StrataStats.from_samples(edges, samples)
    sampled = pilot.counts > 0
    cost = np.where(sampled, secs / 2 / n, 1.0)
    plan = allocate(stats, np.maximum(cost, 1e-9), per_cycle=8 * int(sampled.sum()), tail_from=L,
                    tail=tail if L is not None else "sample")
    while cpu() - t0 < budget:
        samples.append(stratified_sample(prob, plan, seed, k, utility))
        strata.append(plan.slot(k)[0])
        k += 1
    used = cpu() - t0
    strata = np.array(strata)
    half = np.zeros(len(samples), dtype=bool)
    for h in np.unique(strata):
        idx = np.flatnonzero(strata == h)
        half[idx[::2]] = True
    target = "sample" if tail == "sample" or L is None else "zero"

    def stats_of(sel):
        return StrataStats.from_samples(edges, [s for s, keep in zip(samples, sel) if keep])

    everything = stats_of(np.ones(len(samples), dtype=bool))
    full = everything.values(tail_from=L, tail=target)
    walked = np.mean([s.walked for s in samples])
    note = f"L={L}, mean walk {walked:.0f}" if L is not None else f"mean walk {walked:.0f}"
    if tail == "thin" and L is not None:
        bias, se = everything.tail_contribution(L)
        note += f", measured |bias| {np.mean(np.abs(bias)):.2e} +- {np.mean(se):.1e}"
    return dict(full=full, h1=stats_of(half).values(tail_from=L, tail=target),
                h2=stats_of(~half).values(tail_from=L, tail=target), samples=len(samples), cpu=used, note=note)


def run_msr_budget(prob, utility, budget, seed):
    t0 = cpu()
    recs, k = [], 0
    while cpu() - t0 < budget:
        recs.append(msr_sample(prob, seed, k, utility))
        k += 1
    used = cpu() - t0
    ids = np.arange(len(recs))
    a, b = ids % 2 == 0, ids % 2 == 1
    st = lambda sel: BanzhafStats.from_samples(prob.n, [r for r, keep in zip(recs, sel) if keep]).values()  # noqa
    return dict(full=st(np.ones(len(recs), dtype=bool)), h1=st(a), h2=st(b), samples=len(recs), cpu=used)


# ---- report ---------------------------------------------------------------------------------------------


def rho(a: np.ndarray, b: np.ndarray) -> float:
    return float(spearmanr(a, b).statistic)


def row(name: str, r: dict, ref: ValuesResult, shap_ref: ValuesResult | None = None) -> str:
    v, se = r["full"].values, r["full"].stderr
    z = np.abs(v - ref.values) / np.sqrt(se**2 + ref.stderr**2)
    spread = np.subtract(*np.percentile(ref.values, [95, 5]))
    cells = [f"{name:<12}", f"{r['samples']:>7d}", f"{r['cpu']:>6.1f}", f"{rho(r['h1'].values, r['h2'].values):>10.3f}",
             f"{rho(v, ref.values):>7.3f}", f"{np.max(z):>7.1f}", f"{np.median(se) / spread:>8.3f}"]
    cells.append(f"{rho(v, shap_ref.values):>8.3f}" if shap_ref is not None else f"{'':>8}")
    return " | ".join(cells) + ("  " + r["note"] if r.get("note") else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--m", type=int, default=200)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--budget", type=float, default=10.0, help="CPU seconds per estimator and utility")
    ap.add_argument("--ref-budget", type=float, default=200.0, help="CPU seconds of each reference")
    ap.add_argument("--utilities", default="accuracy,neg_ce,margin")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    utilities = args.utilities.split(",")
    with threadpool_limits(limits=1):
        prob = synthetic_problem(args.n, args.m, args.rank)
        print(f"# n={args.n} m={args.m} rank={args.rank} lam={prob.lam:g} budget={args.budget:g}s/estimator "
              f"(CPU, 1 thread), references {args.ref_budget:g}s each", flush=True)
        shap_ref, n_perm = shapley_reference(prob, utilities, args.ref_budget)
        ban_ref, n_sub = banzhaf_reference(prob, utilities, args.ref_budget / 2)
        print(f"# Shapley reference: {n_perm} permutations; Banzhaf reference: {n_sub} MSR subsets", flush=True)
        for u in utilities:
            print(f"\n## utility = {u}: v(N) = {full_utility(prob, u):.4f}, v(empty) = {empty_utility(prob, u):.4f}; "
                  f"reference median stderr / spread = "
                  f"{np.median(shap_ref[u].stderr) / np.subtract(*np.percentile(shap_ref[u].values, [95, 5])):.3f}")
            print(" | ".join([f"{'estimator':<12}", f"{'samples':>7}", f"{'cpu s':>6}", f"{'split-half':>10}",
                              f"{'vs ref':>7}", f"{'max|z|':>7}", f"{'med se':>8}", f"{'vs Shap':>8}"]), flush=True)
            res = run_permutation_family(prob, u, args.budget, args.seed)
            for name, r in res.items():
                print(row(name, r, shap_ref[u]), flush=True)
            for name, tail in (("stratified", "sample"), ("strat-thin", "thin"), ("strat-zero", "zero")):
                print(row(name, run_stratified_budget(prob, u, args.budget, args.seed, tail), shap_ref[u]), flush=True)
            print(row("msr-banzhaf", run_msr_budget(prob, u, args.budget, args.seed), ban_ref[u], shap_ref[u]),
                  flush=True)


if __name__ == "__main__":
    main()
