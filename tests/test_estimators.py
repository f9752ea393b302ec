"""Estimators for large n (stratified Shapley, control-variate permutations, MSR-Banzhaf) and the margin utility.

Every estimator is checked against exact enumeration at n <= 10. The threshold for a comparison of an estimate
with its exact value is ``z_allow(N)``: 3 standard errors, raised to the Bonferroni level that keeps the chance
of any of the ``N`` comparisons of one test exceeding it below 1 % (two-sided Gaussian) when ``N`` is large.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

from freeshap_ray.utility import UTILITIES, margin, margin_per_test

from .helpers import EPS
from .test_shapley_math import make_problem, prefix_values


def z_allow(comparisons: int, alpha: float = 0.01) -> float:
    """``max(3, Phi^-1(1 - alpha / (2 N)))``: 3 stderr, or the Bonferroni bound for ``N`` comparisons."""
    return max(3.0, float(norm.isf(alpha / (2 * comparisons))))


# ---- margin utility ----------------------------------------------------------------------------------


def test_margin_per_test_by_hand():
    pred = np.array([[2.0, -1.0, 0.5], [0.0, 3.0, 3.0], [1.0, 4.0, -2.0]])
    y = np.array([0, 2, 0])
    np.testing.assert_array_equal(margin_per_test(pred, y), [1.5, 0.0, -3.0])
    assert margin(pred, y) == pytest.approx(-0.5, abs=4 * EPS)
    # leading batch axes, and the sign agrees with accuracy away from ties
    rng = np.random.default_rng(0)
    batch = rng.normal(size=(4, 30, 3))
    yy = rng.integers(0, 3, 30)
    m = margin_per_test(batch, yy)
    assert m.shape == (4, 30)
    np.testing.assert_array_equal(m[1], margin_per_test(batch[1], yy))
    np.testing.assert_array_equal(m > 0, UTILITIES["accuracy"].per_test(batch, yy) == 1.0)
    util = UTILITIES["margin"]
    np.testing.assert_allclose(util.batch(batch, yy), m.mean(axis=1), rtol=0, atol=8 * EPS * np.abs(m).max())
    assert util.empty_value(yy, 3) == 0.0
    np.testing.assert_array_equal(util.empty_per_test(yy, 3), np.zeros(30))
    np.testing.assert_array_equal(util.per_test(np.zeros((30, 3)), yy), np.zeros(30))  # closed form = computed
    with pytest.raises(ValueError, match="C >= 2"):
        margin_per_test(np.zeros((2, 1)), np.array([0, 0]))


def test_margin_through_tmc_and_exact():
    from freeshap_ray.valuation import exact_shapley, full_utility, run_permutation

    prob = make_problem(6, 12, seed=3)
    vals = exact_shapley(prob, "margin")
    pt = exact_shapley(prob, "margin", per_test_point=True)
    total = full_utility(prob, "margin")
    scale = np.abs(pt).max() + abs(total)
    assert vals.sum() == pytest.approx(total, abs=2**6 * 6 * EPS * scale)  # efficiency; v(empty) = 0
    np.testing.assert_allclose(pt.mean(axis=1), vals, atol=2**6 * 6 * EPS * scale)
    res = run_permutation(prob, np.arange(6), "margin", truncation_tol=0)
    ref, tol = prefix_values(prob, np.arange(6), "margin")  # margin is 2-Lipschitz in max-norm, as utility_tol assumes
    assert res.v_empty == 0.0
    np.testing.assert_allclose(res.marginals, np.diff(ref), rtol=0, atol=tol)


# ---- exact references ----------------------------------------------------------------------------------


@pytest.mark.parametrize("utility", ["accuracy", "neg_ce", "margin"])
def test_exact_stratum_means_and_banzhaf(utility):
    from itertools import combinations

    from freeshap_ray.valuation import exact_banzhaf, exact_shapley, exact_stratum_means, subset_utilities

    n = 6
    prob = make_problem(n, 10, seed=4)
    v = subset_utilities(prob, utility, per_test_point=True)
    tol = 2**n * n * EPS * np.abs(v).max()  # same subset utilities, other summation orders
    mu = exact_stratum_means(prob, utility, per_test_point=True)
    assert mu.shape == (n, n, 10)
    np.testing.assert_allclose(mu.mean(axis=1), exact_shapley(prob, utility, per_test_point=True), atol=tol)
    # one entry by hand: point 2 at size 3
    others = [j for j in range(n) if j != 2]
    by_hand = np.mean([v[sum(1 << j for j in c) | 4] - v[sum(1 << j for j in c)] for c in combinations(others, 3)],
                      axis=0)
    np.testing.assert_allclose(mu[2, 3], by_hand, atol=tol)
    # efficiency of the table; size 0 is v({i}) - v(empty)
    np.testing.assert_allclose(mu.mean(axis=1).sum(axis=0), v[-1] - v[0], atol=tol)
    np.testing.assert_allclose(mu[:, 0], v[1 << np.arange(n)] - v[0], atol=tol)
    # Banzhaf = binomially weighted strata; it differs from Shapley on this game (the test can tell them apart)
    from math import comb

    w = np.array([comb(n - 1, s) for s in range(n)]) / 2 ** (n - 1)
    ban = exact_banzhaf(prob, utility, per_test_point=True)
    np.testing.assert_allclose(ban, np.einsum("s,ism->im", w, mu), atol=tol)
    np.testing.assert_allclose(exact_banzhaf(prob, utility), ban.mean(axis=1), atol=tol)
    assert np.abs(ban - mu.mean(axis=1)).max() > 100 * tol


# ---- coalitions one point away from a prefix ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["first_logit", "full"])
def test_branch_and_loo_updates_match_direct_solves(kind):
    from freeshap_ray.utility import IncrementalRegressor

    from .helpers import solve_tol

    n = 90 if kind == "first_logit" else 30
    prob = make_problem(n, 11, kind=kind, seed=7, lam=1e-2)
    rng = np.random.default_rng(1)
    perm = rng.permutation(n)
    walked = n - 7  # the last 7 points are never added
    reg = IncrementalRegressor(prob)
    reg.extend(perm[:walked])
    pos = np.empty(n, dtype=np.int64)
    pos[perm] = np.arange(n)
    # branch: every point outside some prefix, sizes spread over [0, walked] so several windows are used
    pts_b = rng.permutation(n)[:40]
    sizes_b = np.array([rng.integers(0, min(pos[j], walked) + 1) for j in pts_b])
    sizes_b[:3] = 0
    got_b = reg.branch_updates(pts_b, sizes_b, max_cols=7)
    # loo: points inside a prefix
    inside = perm[:walked]
    pts_l = rng.choice(inside, size=min(30, walked - 3), replace=False)
    sizes_l = np.array([rng.integers(pos[j] + 1, walked + 1) for j in pts_l])
    got_l = reg.loo_updates(pts_l, sizes_l, max_cols=5)
    tol = solve_tol(prob)
    for j, t, got in zip(pts_b, sizes_b, got_b):
        base = prob.predict(perm[:t])
        want = prob.predict(np.append(perm[:t], j)) - base
        scale = max(np.abs(base).max(), np.abs(want).max())  # F(S + j) - F(S): error relative to F's size
        np.testing.assert_allclose(got, want, rtol=0, atol=tol * scale)
    for j, t, got in zip(pts_l, sizes_l, got_l):
        full = prob.predict(perm[:t])
        want = full - prob.predict(perm[:t][perm[:t] != j])
        np.testing.assert_allclose(got, want, rtol=0, atol=tol * max(np.abs(full).max(), np.abs(want).max()))
    assert reg.size == walked  # read-only
    np.testing.assert_array_equal(reg.order, perm[:walked])
    with pytest.raises(ValueError, match="outside the prefix"):
        reg.branch_updates(np.array([perm[0]]), np.array([1]))
    with pytest.raises(ValueError, match="inside the prefix"):
        reg.loo_updates(np.array([perm[5]]), np.array([5]))
    with pytest.raises(ValueError, match="sizes"):
        reg.branch_updates(np.array([perm[-1]]), np.array([walked + 1]))


def test_branch_and_loo_on_a_rank_deficient_kernel_at_reference_scaling():
    """Rank 40 << n at lam = 1e-6 / divisor 1e4 (cond ~ 1e8): still within the solve bound of direct solves."""
    from freeshap_ray.utility import IncrementalRegressor

    from .helpers import solve_tol
    from .test_shapley_engine import low_rank_problem

    n = 160
    prob = low_rank_problem(n, 40, rank=40)
    perm = np.random.default_rng(2).permutation(n)
    reg = IncrementalRegressor(prob)
    reg.extend(perm)
    sizes = np.array([10, 39, 41, 80, 150])  # below and beyond the rank
    tol = solve_tol(prob)
    got_b = reg.branch_updates(perm[sizes + 3], sizes)
    got_l = reg.loo_updates(perm[sizes - 2], sizes)
    for k, t in enumerate(sizes):
        base = prob.predict(perm[:t])
        want_b = prob.predict(np.append(perm[:t], perm[t + 3])) - base
        want_l = base - prob.predict(np.delete(perm[:t], t - 2))
        scale = np.abs(base).max() + np.abs(want_b).max() + np.abs(want_l).max()
        np.testing.assert_allclose(got_b[k], want_b, rtol=0, atol=tol * scale)
        np.testing.assert_allclose(got_l[k], want_l, rtol=0, atol=tol * scale)
