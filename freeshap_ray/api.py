"""Public Python API: value training examples from precomputed kernels, read a run's kernel."""

from __future__ import annotations

from typing import Literal

import numpy as np

from .io import load_kernel
from .utility import RegressionProblem, UtilitySpec
from .values import ValuesResult

__all__ = ["load_kernel", "shapley"]


def shapley(
    k_train: np.ndarray,
    k_test_train: np.ndarray,
    y_train: np.ndarray,
    y_test: np.ndarray,
    *,
    utility: UtilitySpec | Literal["accuracy", "neg_ce"] = "accuracy",
    n_permutations: int = 200,
    truncation_tol: float = 0.05,
    truncation_patience: int = 2,
    lam: float = 1e-6,
    kernel_divisor: float = 1e4,
    seed: int = 0,
    per_test_point: bool = False,
    n_classes: int | None = None,
    permutations_per_task: int = 8,
    progress: bool = False,
) -> ValuesResult:
    """TMC Shapley values of training points under the kernel-regression utility, on Ray.

    Args:
        k_train: (n, n) first-logit kernel or (n, n, C, C) full kernel.
        k_test_train: (m, n) or (m, n, C, C).
        y_train, y_test: (n,), (m,) integer class labels.
        utility: ``accuracy``, ``neg_ce`` or a callable ``(pred (m, C), y (m,)) -> float | (m,)``.
        n_permutations: permutations to sample.
        truncation_tol: TMC tolerance relative to v(N); 0 disables truncation.
        lam, kernel_divisor: ridge and kernel scaling, F = (K/div) ((K/div) + lam I)^-1 Y.
        seed: permutation k is ``default_rng([seed, k]).permutation(n)``.
        per_test_point: also return (n, m) values (then ``.values`` etc. have shape (n, m)).

    Returns:
        :class:`ValuesResult` with ``.values``, ``.stderr``, ``.counts``; (n,) or (n, m) per test point.
        ``.info`` holds v(N), v(∅) and truncation statistics.

    Runs on the current Ray runtime; starts an embedded local one (127.0.0.1) if none is running.
    """
    from .distributed import ensure_ray
    from .distributed.shapley_job import run_tmc

    problem = RegressionProblem.from_kernels(
        k_train, k_test_train, y_train, y_test, n_classes=n_classes, lam=lam, kernel_divisor=kernel_divisor
    )
    ensure_ray()
    run = run_tmc(
        problem, utility=utility, n_permutations=n_permutations, truncation_tol=truncation_tol,
        truncation_patience=truncation_patience, seed=seed, per_test_point=per_test_point,
        permutations_per_task=permutations_per_task, progress=progress,
    )
    result = run.per_test if per_test_point else run.values
    assert result is not None
    result.info.update(
        v_full=run.v_full, v_empty=run.v_empty, n_permutations=n_permutations,
        mean_truncated_at=float(run.truncated_at.mean()), seconds=run.seconds,
    )
    return result
