"""Public Python API: value training examples from precomputed kernels."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from .utility import RegressionProblem, UtilitySpec
from .values import ValuesResult

__all__ = ["shapley"]


def shapley(
    k_train: np.ndarray,
    k_test_train: np.ndarray,
    y_train: np.ndarray,
    y_test: np.ndarray,
    *,
    utility: UtilitySpec | Literal["accuracy", "neg_ce", "margin"] = "neg_ce",
    n_permutations: int = 100_000,
    truncation_tol: float = 0.05,
    truncation_patience: int = 2,
    lam: float = 1e-6,
    kernel_divisor: float = 1e4,
    seed: int = 0,
    per_test_point: bool = False,
    n_classes: int | None = None,
    permutations_per_task: int = 8,
    progress: bool = False,
    sampler: Literal["tmc", "permutation", "antithetic"] = "tmc",
    max_seconds: float | None = 1800.0,
    convergence: Literal["none", "stderr", "rank", "spearman"] = "spearman",
    convergence_tol: float = 0.05,
    convergence_top_k: int = 10,
    convergence_patience: int = 3,
    min_permutations: int = 10,
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    sign_splits: int = 100,
    num_cpus_per_task: float = 1.0,
    estimator: Literal["tmc", "cv", "stratified", "msr_banzhaf"] = "stratified",
    convergence_target: float = 0.9,
    stratified_tail: Literal["sample", "thin", "zero"] = "sample",
) -> ValuesResult:
    """Monte-Carlo Shapley values of training points under the kernel-regression utility, on Ray.

    Args:
        k_train: (n, n) first-logit kernel or (n, n, C, C) full kernel.
        k_test_train: (m, n) or (m, n, C, C).
        y_train, y_test: (n,), (m,) integer class labels.
        utility: ``accuracy``, ``neg_ce``, ``margin`` or a callable ``(pred (m, C), y (m,)) -> float | (m,)``.
        estimator: ``tmc``, ``cv``, ``stratified`` or ``msr_banzhaf`` (Banzhaf values); see the ``shapley``
            config section (:class:`freeshap_ray.config.ShapleyConfig`) for these and the other keywords.
        n_permutations: sample budget (a cap: by default the run stops once the values of two independent
            halves of the samples agree to Spearman 0.9, or after 30 minutes; for ``antithetic`` rounded up to
            whole pairs).
        truncation_tol: TMC tolerance relative to v(N); 0 disables truncation.
        lam, kernel_divisor: ridge and kernel scaling, F = (K/div) ((K/div) + lam I)^-1 Y.
        seed: permutation k is ``default_rng([seed, k]).permutation(n)``.
        per_test_point: also return (n, m) values (then ``.values`` etc. have shape (n, m)).
        sampler: ``tmc``, ``permutation`` (never truncated) or ``antithetic`` (permutation + reverse = one sample).
        max_seconds: time budget; convergence (``spearman``: split-half Spearman >= ``convergence_target``),
            convergence_tol, convergence_top_k, convergence_patience, min_permutations: stopping criterion.
        checkpoint_dir: stream marginals to ``checkpoint_dir/marginals/part-*.parquet``; calling again
            with the same directory resumes (only missing permutations run; see ``resume``).
        sign_splits: random half-splits for the per-point sign agreement.

    Returns:
        :class:`ValuesResult` with ``.values``, ``.stderr``, ``.counts``; (n,) or (n, m) per test point.
        ``.info`` holds v(N), v(∅), truncation statistics, the stop reason, and sign robustness:
        ``sign_agreement_halves`` (even/odd split), ``sign_agreement_mean`` and the per-point array
        ``sign_agreement`` (fraction of random half-splits in which the point's sign agrees).

    Runs on the current Ray runtime; starts an embedded local one (127.0.0.1) if none is running.
    """
    from .config import ShapleyConfig, build_section
    from .distributed import ensure_ray
    from .distributed.shapley_job import run_valuation
    from .io import MarginalsStore
    from .valuation.settings import ValuationSettings
    from .valuation.sinks import MemorySink

    keys = {k: v for k, v in locals().items() if k in _CONFIG_KEYS}  # the keywords that mirror shapley.* keys
    if isinstance(utility, str):
        keys["utility"] = utility
    settings = ValuationSettings.of(build_section(ShapleyConfig, keys, "shapley."), utility)  # validated here, once
    problem = RegressionProblem.from_kernels(
        k_train, k_test_train, y_train, y_test, n_classes=n_classes, lam=lam, kernel_divisor=kernel_divisor
    )
    ensure_ray()
    sink = MemorySink() if checkpoint_dir is None else MarginalsStore(checkpoint_dir)
    run = run_valuation(problem, settings, sink, progress=progress)
    result = run.per_test if per_test_point else run.values
    result.info["sign_agreement"] = run.sign.per_point
    return result


_CONFIG_KEYS = frozenset(
    ["n_permutations", "truncation_tol", "truncation_patience", "lam", "kernel_divisor", "seed", "per_test_point",
     "permutations_per_task", "sampler", "max_seconds", "convergence", "convergence_tol", "convergence_top_k",
     "convergence_patience", "min_permutations", "resume", "sign_splits", "num_cpus_per_task", "estimator",
     "convergence_target", "stratified_tail"])
