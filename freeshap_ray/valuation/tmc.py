"""Truncated Monte-Carlo (TMC) Shapley: one permutation at a time, exact incremental regression.

For a permutation ``pi`` the marginal of the point added at step ``k`` is
``v(pi[:k+1]) - v(pi[:k])`` with ``v(empty)`` the utility's empty-set value. Truncation (reference
rule): after computing ``v(prefix_k)``, if ``truncation_tol > 0`` and
``|v(prefix_k) - v_full| < truncation_tol * |v_full|`` holds for ``truncation_patience``
consecutive steps, the walk stops and every later point gets marginal 0 (still counted as sampled).
The decision always uses the mean utility, also in per-test-point mode.

Permutations are reproducible per id: permutation ``k`` of a run with seed ``s`` is
``np.random.default_rng([s, k]).permutation(n)``, independent of how permutations are batched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..utility.metrics import Utility, UtilitySpec, resolve_utility
from ..utility.solver import Problem, make_regressor

__all__ = [
    "PermutationResult",
    "run_permutation",
    "permutation_for",
    "sample_permutations",
    "full_utility",
    "empty_utility",
    "DEFAULT_BLOCK_SIZE",
]

#: Points added per level-3 incremental update of the dual (kernel) regression; at most
#: ``block_size - 1`` are computed in vain after a truncation. The primal (feature-space) regression
#: uses its own (:attr:`PrimalRegressor.block_size`) unless one is given.
DEFAULT_BLOCK_SIZE = 64


@dataclass
class PermutationResult:
    """Marginal contributions from one permutation.

    Attributes:
        permutation: ``(n,)`` int64 order in which points were added.
        marginals: ``(n,)`` float64 indexed by original point index, or ``(n, m)`` per test point.
        truncated_at: number of points actually added before truncation (``n`` if none).
        v_full: mean utility of the full training set used for truncation.
        v_empty: mean utility of the empty set.
    """

    permutation: np.ndarray
    marginals: np.ndarray
    truncated_at: int
    v_full: float
    v_empty: float


def permutation_for(n: int, seed: int, perm_id: int) -> np.ndarray:
    """Permutation number ``perm_id`` of ``range(n)``: ``default_rng([seed, perm_id]).permutation(n)``.

    Returns:
        ``(n,)`` int64.
    """
    if seed < 0 or perm_id < 0:
        raise ValueError(f"seed/perm_id: must be >= 0, got {seed} and {perm_id}")
    return np.random.default_rng([int(seed), int(perm_id)]).permutation(n).astype(np.int64)


def sample_permutations(n: int, n_permutations: int, seed: int, start: int = 0) -> np.ndarray:
    """Permutations with ids ``start .. start + n_permutations - 1`` (see :func:`permutation_for`).

    Returns:
        ``(n_permutations, n)`` int64; row ``k`` has id ``start + k``.
    """
    if n < 0 or n_permutations < 0:
        raise ValueError(f"n/n_permutations: must be >= 0, got {n} and {n_permutations}")
    out = np.empty((n_permutations, n), dtype=np.int64)
    for k in range(n_permutations):
        out[k] = permutation_for(n, seed, start + k)
    return out


def full_utility(problem: Problem, utility: UtilitySpec = "accuracy",
                 per_test_point: bool = False) -> float | np.ndarray:
    """Utility of the whole training set by a direct solve: a float, or ``(m,)`` per test point."""
    util = resolve_utility(utility)
    pred = problem.predict(None)
    return util.per_test(pred, problem.y_test) if per_test_point else util(pred, problem.y_test)


def empty_utility(problem: Problem, utility: UtilitySpec = "accuracy",
                  per_test_point: bool = False) -> float | np.ndarray:
    """Utility of the empty training set: a float, or ``(m,)`` per test point."""
    util = resolve_utility(utility)
    if per_test_point:
        return util.empty_per_test(problem.y_test, problem.n_classes)
    return util.empty_value(problem.y_test, problem.n_classes)


def _check_permutation(problem: Problem, permutation: np.ndarray) -> np.ndarray:
    perm = np.asarray(permutation)
    if perm.shape != (problem.n,) or (perm.size and perm.dtype.kind not in "iu"):
        raise ValueError(f"permutation: expected an integer array of shape ({problem.n},), "
                         f"got {perm.dtype} {perm.shape}")
    perm = perm.astype(np.int64)
    if not np.array_equal(np.sort(perm), np.arange(problem.n)):
        raise ValueError(f"permutation: must contain each index 0..{problem.n - 1} exactly once")
    return perm


class _Truncation:
    """Tracks the consecutive-steps-near-v_full rule."""

    def __init__(self, tol: float, patience: int, v_full: float) -> None:
        self.enabled = tol > 0
        self.bound = tol * abs(v_full)
        self.v_full = v_full
        self.patience = patience
        self.streak = 0

    def stop_after(self, value: float) -> bool:
        if not self.enabled:
            return False
        self.streak = self.streak + 1 if abs(value - self.v_full) < self.bound else 0
        return self.streak >= self.patience


def run_permutation(
    problem: Problem,
    permutation: np.ndarray,
    utility: UtilitySpec = "accuracy",
    *,
    truncation_tol: float = 0.05,
    truncation_patience: int = 2,
    v_full: float | np.ndarray | None = None,
    per_test_point: bool = False,
    block_size: int | None = None,
) -> PermutationResult:
    """Marginal contributions of every training point along one permutation (TMC step).

    Args:
        problem: the regression problem (a :class:`~freeshap_ray.utility.FeatureProblem` runs in feature space).
        permutation: ``(n,)`` order in which points are added.
        utility: ``"accuracy"``, ``"neg_ce"``, a :class:`Utility` or a callable.
        truncation_tol: relative tolerance to ``v_full``; 0 disables truncation.
        truncation_patience: consecutive in-tolerance steps before stopping (``>= 1``).
        v_full: mean utility of the full set (an ``(m,)`` array is averaged); computed by a direct
            solve if None. Pass it when running many permutations.
        per_test_point: return ``(n, m)`` per-test marginals instead of ``(n,)``.
        block_size: points added per level-3 update (does not change the result); None: the solver's
            own (64 for the dual, 128 for the primal).

    Returns:
        A :class:`PermutationResult`; marginals are indexed by original point index.
    """
    if not truncation_tol >= 0:
        raise ValueError(f"truncation_tol: must be >= 0, got {truncation_tol}")
    if truncation_patience < 1:
        raise ValueError(f"truncation_patience: must be >= 1, got {truncation_patience}")
    if block_size is not None and block_size < 1:
        raise ValueError(f"block_size: must be >= 1, got {block_size}")
    perm = _check_permutation(problem, permutation)
    util: Utility = resolve_utility(utility)
    y = problem.y_test
    if v_full is None:
        v_full = full_utility(problem, util)
    v_full = float(np.mean(v_full))
    prev = empty_utility(problem, util, per_test_point)
    v_empty = float(np.mean(prev))
    marginals = np.zeros((problem.n, problem.m) if per_test_point else problem.n)
    rule = _Truncation(truncation_tol, truncation_patience, v_full)
    reg = make_regressor(problem)  # dual for kernels, primal for features
    block_size = reg.block_size if block_size is None else block_size
    added = 0
    while added < problem.n:
        chunk = perm[added:added + block_size]
        vals = util.batch(reg.extend(chunk), y, per_test=per_test_point)  # (b,) or (b, m)
        means = vals.mean(axis=1) if per_test_point else vals
        for j, point in enumerate(chunk):
            marginals[point] = vals[j] - prev
            prev = vals[j]
            added += 1
            if rule.stop_after(float(means[j])):
                return PermutationResult(perm, marginals, added, v_full, v_empty)
    return PermutationResult(perm, marginals, added, v_full, v_empty)
