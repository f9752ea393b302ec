"""Exact semivalues by enumerating all ``2^n`` subsets (small ``n`` only; references for tests).

* :func:`exact_shapley`: ``phi_i = (1/n) sum_s mu_{i,s}``;
* :func:`exact_stratum_means`: the per-(point, coalition size) means ``mu_{i,s}`` that stratified
  samplers estimate;
* :func:`exact_banzhaf`: ``beta_i = 2^-(n-1) sum_{S not containing i} (v(S + i) - v(S))``.
"""

from __future__ import annotations

import math

import numpy as np

from ..utility.metrics import UtilitySpec, resolve_utility
from ..utility.problem import RegressionProblem

__all__ = ["exact_shapley", "exact_banzhaf", "exact_stratum_means", "subset_utilities", "MAX_EXACT_N"]

#: Largest training set :func:`exact_shapley` accepts (``2^14`` direct solves).
MAX_EXACT_N = 14


def subset_utilities(problem: RegressionProblem, utility: UtilitySpec = "accuracy",
                     per_test_point: bool = False) -> np.ndarray:
    """Utility of every subset, indexed by bitmask (bit ``i`` set = point ``i`` included).

    Returns:
        ``(2^n,)`` or ``(2^n, m)``; entry 0 is the utility's empty-set value.
    """
    n = problem.n
    if n > MAX_EXACT_N:
        raise ValueError(f"exact Shapley enumerates 2^n subsets; n = {n} exceeds the limit of {MAX_EXACT_N}")
    util = resolve_utility(utility)
    y = problem.y_test
    out = np.zeros((2 ** n, problem.m) if per_test_point else 2 ** n)
    c = problem.n_classes
    out[0] = util.empty_per_test(y, c) if per_test_point else util.empty_value(y, c)
    bits = np.arange(n)
    for mask in range(1, 2 ** n):
        pred = problem.predict(bits[(mask >> bits) & 1 == 1])
        out[mask] = util.per_test(pred, y) if per_test_point else util(pred, y)
    return out


def exact_shapley(problem: RegressionProblem, utility: UtilitySpec = "accuracy",
                  per_test_point: bool = False) -> np.ndarray:
    """Exact Shapley values ``phi_i = sum_S |S|!(n-|S|-1)!/n! (v(S + i) - v(S))``.

    Args:
        problem: the regression problem (``n <= 14``).
        utility: ``"accuracy"``, ``"neg_ce"``, a Utility or a callable.
        per_test_point: per-test-point values.

    Returns:
        ``(n,)`` values, or ``(n, m)`` per test point.

    Raises:
        ValueError: ``n > 14``.
    """
    n = problem.n
    v = subset_utilities(problem, utility, per_test_point)
    masks = np.arange(2 ** n)
    sizes = np.array([bin(k).count("1") for k in range(2 ** n)])
    weights = np.array([math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n) for s in range(n)])
    values = np.zeros((n,) + v.shape[1:])
    for i in range(n):
        without = masks[(masks >> i) & 1 == 0]
        w = weights[sizes[without]]
        diff = v[without | (1 << i)] - v[without]
        values[i] = np.tensordot(w, diff, axes=(0, 0))
    return values


def _marginal_table(v: np.ndarray, n: int):
    """Yield ``(i, sizes (2^(n-1),), diffs (2^(n-1), ...))`` over the subsets ``S`` not containing ``i``."""
    masks = np.arange(2 ** n)
    sizes = np.array([bin(k).count("1") for k in range(2 ** n)])
    for i in range(n):
        without = masks[(masks >> i) & 1 == 0]
        yield i, sizes[without], v[without | (1 << i)] - v[without]


def exact_stratum_means(problem: RegressionProblem, utility: UtilitySpec = "accuracy",
                        per_test_point: bool = False) -> np.ndarray:
    """Exact mean marginal of each point at each coalition size.

    ``mu[i, s] = mean over S in N - {i} with |S| = s of v(S + i) - v(S)``; the Shapley value is
    ``mu[i].mean(axis=0)`` and the contribution of sizes ``>= L`` is ``mu[i, L:].sum(axis=0) / n``.

    Returns:
        ``(n, n)`` indexed ``[point, size]``, or ``(n, n, m)`` per test point.

    Raises:
        ValueError: ``n > 14``.
    """
    n = problem.n
    v = subset_utilities(problem, utility, per_test_point)
    out = np.zeros((n, n) + v.shape[1:])
    for i, sizes, diff in _marginal_table(v, n):
        for s in range(n):
            out[i, s] = diff[sizes == s].mean(axis=0)
    return out


def exact_banzhaf(problem: RegressionProblem, utility: UtilitySpec = "accuracy",
                  per_test_point: bool = False) -> np.ndarray:
    """Exact Banzhaf values ``beta_i = 2^-(n-1) sum_{S in N - {i}} (v(S + i) - v(S))``.

    Returns:
        ``(n,)`` values, or ``(n, m)`` per test point.

    Raises:
        ValueError: ``n > 14``.
    """
    n = problem.n
    v = subset_utilities(problem, utility, per_test_point)
    out = np.zeros((n,) + v.shape[1:])
    for i, _, diff in _marginal_table(v, n):
        out[i] = diff.mean(axis=0)
    return out
