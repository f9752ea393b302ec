"""Shapley math: exact enumeration, TMC permutations, truncation, and mergeable value statistics."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from freeshap_ray.valuation import (
    empty_utility,
    exact_shapley,
    full_utility,
    permutation_for,
    run_permutation,
    sample_permutations,
    subset_utilities,
)
from freeshap_ray.utility import UTILITIES, RegressionProblem
from freeshap_ray.values import ValuesResult

from .helpers import EPS, utility_tol


def make_problem(n: int, m: int, c: int = 3, *, kind: str = "first_logit", d: int = 8, seed: int = 0,
                 lam: float = 1e-2, div: float = 1.0, duplicate: bool = False) -> RegressionProblem:
    """Random well-conditioned kernel problem with labels a noisy linear function of the features.

    ``duplicate`` makes point 1 an exact copy of point 0 (features and label).
    """
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n + m, d))
    y = np.argmax(feats @ rng.normal(size=(d, c)) + 0.5 * rng.normal(size=(n + m, c)), axis=1)  # learnable
    if kind == "first_logit":
        if duplicate:
            feats[1], y[1] = feats[0], y[0]
        k = feats @ feats.T
    else:
        grads = feats[:, None, :] + 0.5 * rng.normal(size=(n + m, c, d))
        if duplicate:
            grads[1], y[1] = grads[0], y[0]
        k = np.einsum("icx,jdx->ijcd", grads, grads)
    return RegressionProblem.from_kernels(k[:n, :n], k[n:, :n], y[:n], y[n:], n_classes=c, lam=lam,
                                          kernel_divisor=div)


def prefix_values(problem, perm, utility, per_test=False):
    """Reference utilities of every prefix ``perm[:k]``, k = 0..n, by direct solves, and the tolerance for
    comparing other evaluations of them (:func:`~tests.helpers.utility_tol` at these predictions' scale)."""
    u = UTILITIES[utility]
    y = problem.y_test
    out = [empty_utility(problem, utility, per_test)]
    scale = 0.0
    for k in range(1, len(perm) + 1):
        pred = problem.predict(perm[:k])
        scale = max(scale, float(np.abs(pred).max()))
        out.append(u.per_test(pred, y) if per_test else u(pred, y))
    return np.array(out), utility_tol(problem, scale)


UTILS = ["accuracy", "neg_ce"]


# ---- exact ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("utility", UTILS)
@pytest.mark.parametrize("kind", ["first_logit", "full"])
def test_exact_efficiency(utility, kind):
    prob = make_problem(7, 15, kind=kind, seed=1)
    vals = exact_shapley(prob, utility)
    total = full_utility(prob, utility) - empty_utility(prob, utility)
    assert vals.shape == (7,)
    # both sides use the same subset utilities; only summation differs: ≤ 2^n · n · eps · max|v(S)|
    tol = 2**7 * 7 * EPS * np.abs(subset_utilities(prob, utility, per_test_point=True)).max()
    assert vals.sum() == pytest.approx(total, abs=tol)
    per_test = exact_shapley(prob, utility, per_test_point=True)
    assert per_test.shape == (7, 15)
    want = full_utility(prob, utility, True) - empty_utility(prob, utility, True)
    np.testing.assert_allclose(per_test.sum(axis=0), want, atol=tol)
    np.testing.assert_allclose(per_test.mean(axis=1), vals, atol=tol)


@pytest.mark.parametrize("utility", UTILS)
def test_exact_symmetry_of_identical_points(utility):
    prob = make_problem(6, 20, seed=2, duplicate=True)
    vals = exact_shapley(prob, utility)
    tol = 2**6 * 6 * EPS * np.abs(subset_utilities(prob, utility)).max()  # same utilities, other summation
    assert vals[0] == pytest.approx(vals[1], abs=tol)
    assert not np.allclose(vals, vals[0])  # the check is not vacuous


@pytest.mark.parametrize("utility", UTILS)
def test_exact_equals_average_over_all_permutations(utility):
    prob = make_problem(4, 10, kind="full", c=2, seed=3)
    vf = full_utility(prob, utility)
    perms = list(itertools.permutations(range(4)))
    marg = np.mean([run_permutation(prob, np.array(p), utility, truncation_tol=0, v_full=vf).marginals
                    for p in perms], axis=0)
    _, tol = prefix_values(prob, np.arange(4), utility)
    np.testing.assert_allclose(marg, exact_shapley(prob, utility), atol=tol)


def test_exact_refuses_large_n():
    prob = make_problem(15, 3, seed=0)
    with pytest.raises(ValueError, match="exceeds the limit of 14"):
        exact_shapley(prob)


# ---- single permutations -------------------------------------------------------------------------


@pytest.mark.parametrize("utility", UTILS)
@pytest.mark.parametrize("kind", ["first_logit", "full"])
def test_permutation_marginals_telescope(utility, kind):
    prob = make_problem(25, 12, kind=kind, seed=4)
    perm = permutation_for(25, seed=0, perm_id=1)
    res = run_permutation(prob, perm, utility, truncation_tol=0)
    ref, tol = prefix_values(prob, perm, utility)
    assert res.truncated_at == 25
    assert res.marginals.sum() == pytest.approx(res.v_full - res.v_empty, abs=tol)
    assert res.v_full == full_utility(prob, utility)  # the same direct solve
    pt = run_permutation(prob, perm, utility, truncation_tol=0, per_test_point=True)
    assert pt.marginals.shape == (25, 12)
    want = full_utility(prob, utility, True) - empty_utility(prob, utility, True)
    np.testing.assert_allclose(pt.marginals.sum(axis=0), want, atol=tol)
    # same predictions on both sides; mean of differences vs difference of means: far inside the solve bound
    np.testing.assert_allclose(pt.marginals.mean(axis=1), res.marginals, atol=tol)
    # marginals are indexed by original point, matching direct solves on each prefix
    np.testing.assert_allclose(res.marginals[perm], np.diff(ref), atol=tol)


def test_block_size_does_not_change_result():
    prob = make_problem(40, 10, seed=5)
    perm = permutation_for(40, seed=3, perm_id=0)
    a = run_permutation(prob, perm, "neg_ce", truncation_tol=0.01, block_size=1)
    b = run_permutation(prob, perm, "neg_ce", truncation_tol=0.01, block_size=64)
    c = run_permutation(prob, perm, "neg_ce", truncation_tol=0.01, block_size=7)
    assert a.truncated_at == b.truncated_at == c.truncated_at
    _, tol = prefix_values(prob, perm, "neg_ce")  # other blockings = other rounding, within the solve bound
    np.testing.assert_allclose(a.marginals, b.marginals, atol=tol)
    np.testing.assert_allclose(a.marginals, c.marginals, atol=tol)


def expected_truncation(values: np.ndarray, v_full: float, tol: float, patience: int) -> int:
    """Independent statement of the rule: stop after step k once `patience` steps in a row are near."""
    streak = 0
    for k in range(1, len(values)):
        streak = streak + 1 if abs(values[k] - v_full) < tol * abs(v_full) else 0
        if streak >= patience:
            return k
    return len(values) - 1


@pytest.mark.parametrize("utility,tol", [("accuracy", 0.1), ("neg_ce", 0.05)])
def test_truncation_rule_and_zero_tail(utility, tol):
    prob = make_problem(30, 25, seed=6, lam=1e-1)
    vf = full_utility(prob, utility)
    truncated = 0
    for pid in range(6):
        perm = permutation_for(30, seed=11, perm_id=pid)
        res = run_permutation(prob, perm, utility, truncation_tol=tol, truncation_patience=2, v_full=vf)
        ref, atol = prefix_values(prob, perm, utility)
        t = res.truncated_at
        assert t == expected_truncation(ref, vf, tol, 2)
        np.testing.assert_array_equal(res.marginals[perm[t:]], 0.0)
        np.testing.assert_allclose(res.marginals[perm[:t]], np.diff(ref[:t + 1]), atol=atol)
        truncated += t < 30
        pt = run_permutation(prob, perm, utility, truncation_tol=tol, v_full=vf, per_test_point=True)
        assert pt.truncated_at == t  # decided on the mean utility
        np.testing.assert_allclose(pt.marginals.mean(axis=1), res.marginals, atol=atol)
        assert not pt.marginals[perm[t:]].any()
    assert truncated >= 3  # the rule actually fired


def test_zero_tolerance_disables_truncation():
    prob = make_problem(30, 25, seed=6, lam=1e-1)
    perm = permutation_for(30, seed=11, perm_id=0)
    off = run_permutation(prob, perm, "accuracy", truncation_tol=0.0)
    never = run_permutation(prob, perm, "accuracy", truncation_tol=0.1, truncation_patience=10**9)
    on = run_permutation(prob, perm, "accuracy", truncation_tol=0.1)
    assert off.truncated_at == never.truncated_at == 30
    assert on.truncated_at < 30
    np.testing.assert_array_equal(off.marginals, never.marginals)
    assert not np.array_equal(off.marginals, on.marginals)


def test_callable_utility_through_tmc_and_exact():
    prob = make_problem(5, 8, seed=8)
    per_test = lambda pred, y: np.take_along_axis(pred, y[:, None], axis=1)[:, 0]  # noqa: E731
    scalar = lambda pred, y: float(per_test(pred, y).mean())  # noqa: E731
    perm = permutation_for(5, seed=0, perm_id=0)
    a = run_permutation(prob, perm, scalar, truncation_tol=0)
    b = run_permutation(prob, perm, per_test, truncation_tol=0, per_test_point=True)
    _, tol = prefix_values(prob, perm, "neg_ce")  # mean-of-differences vs difference-of-means: far below it
    np.testing.assert_allclose(b.marginals.mean(axis=1), a.marginals, atol=tol)
    assert a.v_empty == 0.0  # callable(zeros)
    np.testing.assert_allclose(exact_shapley(prob, per_test, per_test_point=True).mean(axis=1),
                               exact_shapley(prob, scalar), atol=tol)
    with pytest.raises(ValueError, match="per-test"):
        run_permutation(prob, perm, scalar, per_test_point=True)


def test_permutation_validation():
    prob = make_problem(5, 3)
    with pytest.raises(ValueError, match="exactly once"):
        run_permutation(prob, np.array([0, 1, 2, 3, 3]))
    with pytest.raises(ValueError, match="shape"):
        run_permutation(prob, np.arange(4))
    with pytest.raises(ValueError, match="truncation_tol"):
        run_permutation(prob, np.arange(5), truncation_tol=-1.0)


def test_sample_permutations_reproducible_by_id():
    allp = sample_permutations(9, 8, seed=5)
    assert allp.shape == (8, 9) and allp.dtype == np.int64
    for row in allp:
        np.testing.assert_array_equal(np.sort(row), np.arange(9))
    np.testing.assert_array_equal(sample_permutations(9, 3, seed=5, start=4), allp[4:7])
    np.testing.assert_array_equal(permutation_for(9, 5, 6), allp[6])
    assert not np.array_equal(sample_permutations(9, 8, seed=6), allp)
    assert len({tuple(r) for r in allp}) > 1


# ---- TMC vs exact --------------------------------------------------------------------------------


@pytest.mark.parametrize("utility", UTILS)
@pytest.mark.parametrize("per_test", [False, True])
def test_tmc_mean_matches_exact(utility, per_test):
    n, m = 6, 20
    prob = make_problem(n, m, seed=0)
    exact = exact_shapley(prob, utility, per_test_point=per_test)
    assert np.abs(exact).max() > 0.01
    vf = full_utility(prob, utility)
    marg = np.stack([run_permutation(prob, p, utility, truncation_tol=0, v_full=vf,
                                     per_test_point=per_test).marginals
                     for p in sample_permutations(n, 3000, seed=7)])
    res = ValuesResult.from_marginals(marg)
    assert res.values.shape == exact.shape and np.all(res.counts == 3000)
    sampled = res.stderr > 0
    _, tol = prefix_values(prob, np.arange(n), "neg_ce")
    # entries whose marginal never varied must equal the exact value
    np.testing.assert_allclose(res.values[~sampled], exact[~sampled], atol=tol)
    z = np.abs(res.values[sampled] - exact[sampled]) / res.stderr[sampled]
    # within 3 standard errors, also for each of the 120 per-test-point comparisons (fixed seed)
    assert z.max() < 3.0, z.max()
    # efficiency holds for every permutation, hence for the mean
    total = full_utility(prob, utility, per_test) - empty_utility(prob, utility, per_test)
    np.testing.assert_allclose(res.values.sum(axis=0), total, atol=tol)


# ---- ValuesResult --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(50, 7), (50, 7, 4)])
def test_values_merge_is_exact(shape):
    rng = np.random.default_rng(9)
    marg = rng.normal(loc=3.0, scale=2.0, size=shape)
    whole = ValuesResult.from_marginals(marg)
    np.testing.assert_allclose(whole.values, marg.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(whole.variances, marg.var(axis=0, ddof=1), rtol=1e-13)
    np.testing.assert_allclose(whole.stderr, np.sqrt(marg.var(axis=0, ddof=1) / 50), rtol=1e-13)
    merged = ValuesResult.from_marginals(marg[:20]) + ValuesResult.from_marginals(marg[20:])
    np.testing.assert_array_equal(merged.counts, np.full(7, 50))
    for name in ("values", "variances", "stderr"):
        np.testing.assert_allclose(getattr(merged, name), getattr(whole, name), rtol=1e-12, atol=1e-14)
    parts = [ValuesResult.from_marginals(marg[i:i + 1]) for i in range(50)]
    summed = sum(parts, ValuesResult.empty(7, None if len(shape) == 2 else 4))
    np.testing.assert_allclose(summed.values, whole.values, rtol=1e-12)
    np.testing.assert_allclose(summed.variances, whole.variances, rtol=1e-11)
    assert sum(parts).counts.tolist() == [50] * 7


def test_values_small_counts():
    one = ValuesResult.from_marginals(np.array([[1.0, -2.0]]))
    assert np.all(np.isinf(one.stderr)) and np.all(one.variances == 0)
    two = one + ValuesResult.from_marginals(np.array([[3.0, -2.0]]))
    np.testing.assert_allclose(two.values, [2.0, -2.0])
    np.testing.assert_allclose(two.variances, [2.0, 0.0])
    np.testing.assert_allclose(two.stderr, [1.0, 0.0])
    empty = ValuesResult.empty(2)
    assert np.all(np.isinf(empty.stderr)) and empty.counts.tolist() == [0, 0]
    same = empty + two
    np.testing.assert_array_equal(same.values, two.values)
    np.testing.assert_array_equal(same.counts, two.counts)
    with pytest.raises(ValueError, match="shape"):
        two + ValuesResult.empty(3)
