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


# ---- stratified Shapley --------------------------------------------------------------------------------

UTILS3 = ["accuracy", "neg_ce", "margin"]


def direct_marginal(prob, utility, coalition, j, per_test=False):
    """``v(S + j) - v(S)`` by direct solves (the empty set takes the utility's empty value)."""
    from freeshap_ray.valuation import empty_utility

    u = UTILITIES[utility]

    def value(s):
        if len(s) == 0:
            return empty_utility(prob, utility, per_test)
        pred = prob.predict(np.asarray(s, dtype=np.int64))
        return u.per_test(pred, prob.y_test) if per_test else u(pred, prob.y_test)

    return value(np.append(coalition, j)) - value(coalition)


@pytest.mark.parametrize("utility", UTILS3)
def test_stratified_sample_marginals_are_the_stated_coalitions(utility):
    """Each marginal is ``v(S_j + j) - v(S_j)`` with ``S_j`` the first ``t_j`` points of the permutation other
    than ``j``; all three evaluation paths (free, branch, leave-one-out) occur."""
    from freeshap_ray.valuation import permutation_for
    from freeshap_ray.valuation.stratified import StrataPlan, stratified_sample

    n = 24
    prob = make_problem(n, 9, seed=11)
    edges = np.array([0, 1, 2, 4, 8, 16, 24])
    plan = StrataPlan(edges, np.array([1, 1, 2, 2, 1, 1]), n)
    kinds = {"free": 0, "branch": 0, "loo": 0}
    _, tol = prefix_values(prob, np.arange(n), "neg_ce")  # 4 * solve bound * prediction scale
    for k in range(len(plan.cycle)):
        s = stratified_sample(prob, plan, seed=3, sample_id=k, utility=utility, per_test_point=True, block_size=5)
        h, _ = plan.slot(k)
        perm = permutation_for(n, 3, k)
        pos = np.argsort(perm)
        assert np.all((s.sizes >= edges[h]) & (s.sizes < edges[h + 1]))
        for j in range(n):
            t = s.sizes[j]
            kinds["free" if pos[j] == t else "branch" if pos[j] > t else "loo"] += 1
            coalition = perm[perm != j][:t]
            want = direct_marginal(prob, utility, coalition, j, per_test=True)
            np.testing.assert_allclose(s.marginals[j], want, rtol=0, atol=tol)
    assert min(kinds.values()) >= 5, kinds


def test_stratified_sample_is_a_function_of_seed_and_id():
    from freeshap_ray.valuation.stratified import StrataStats, run_stratified, uniform_plan

    prob = make_problem(16, 8, seed=2)
    plan = uniform_plan(16, per_cycle=2)
    together = run_stratified(prob, plan, 5, range(12), "neg_ce")
    alone = run_stratified(prob, plan, 5, [7, 3], "neg_ce")
    for s in alone:
        np.testing.assert_array_equal(s.sizes, together[s.sample_id].sizes)
        np.testing.assert_array_equal(s.marginals, together[s.sample_id].marginals)
    import json

    from freeshap_ray.valuation.stratified import StrataPlan

    again = StrataPlan.from_description(json.loads(json.dumps(plan.describe())))  # as a resumed run rebuilds it
    resumed = run_stratified(prob, again, 5, [7], "neg_ce")[0]
    np.testing.assert_array_equal(resumed.marginals, together[7].marginals)
    other = run_stratified(prob, plan, 6, [7], "neg_ce")[0]
    assert not np.array_equal(other.marginals, together[7].marginals)
    # merge: two halves == all at once
    whole = StrataStats.from_samples(plan.edges, together)
    merged = StrataStats.from_samples(plan.edges, together[:5]) + StrataStats.from_samples(plan.edges, together[5:])
    np.testing.assert_array_equal(merged.counts, whole.counts)
    scale = np.abs(whole.means).max()
    np.testing.assert_allclose(merged.means, whole.means, rtol=0, atol=16 * EPS * scale)
    np.testing.assert_allclose(merged.m2, whole.m2, rtol=0, atol=64 * EPS * scale**2 * whole.counts.max())
    a, b = whole.values(), merged.values()
    np.testing.assert_allclose(b.values, a.values, rtol=0, atol=16 * EPS * scale)
    assert merged.samples == 12


def stratified_run(prob, utility, seed, *, pilot_cycles=3, cycles=6, per_cycle=40, tail_from=None,
                   tail="sample", pooled=True, per_test=False, min_count=1):
    """Pilot (one sample per sampled stratum per cycle) then a Neyman plan; returns merged stats and the plan."""
    from freeshap_ray.valuation.stratified import (
        StrataStats, allocate, geometric_edges, marginal_cost, run_stratified, uniform_plan)

    n = prob.n
    edges = geometric_edges(n, truncation=tail_from)
    pilot = uniform_plan(n, edges, tail_from=tail_from if tail == "zero" else None)
    ids = range(pilot_cycles * len(pilot.cycle))
    stats = StrataStats.from_samples(edges, run_stratified(prob, pilot, seed, ids, utility, per_test_point=per_test))
    plan = allocate(stats, marginal_cost(edges, n, prob.m), per_cycle=per_cycle, pooled=pooled,
                    tail_from=tail_from, tail=tail, min_count=min_count)
    more = range(len(ids), len(ids) + cycles * len(plan.cycle))
    stats = stats + StrataStats.from_samples(edges, run_stratified(prob, plan, seed, more, utility,
                                                                   per_test_point=per_test))
    return stats, plan


@pytest.mark.parametrize("utility", UTILS3)
def test_stratified_matches_exact(utility):
    from freeshap_ray.valuation import exact_shapley, exact_stratum_means

    n = 9
    prob = make_problem(n, 14, seed=5)
    exact = exact_shapley(prob, utility)
    stats, plan = stratified_run(prob, utility, seed=1)
    res = stats.values()
    assert np.all(np.isfinite(res.stderr))
    spread = exact.max() - exact.min()
    assert res.stderr.max() < 0.1 * spread  # the test has power: 3 stderr is well below the spread of values
    _, tol = prefix_values(prob, np.arange(n), "neg_ce")  # rounding: marginals from other solves than exact's
    assert_within(res.values, exact, res.stderr, z_allow(n), tol)
    # each (point, stratum) mean against the exact stratum mean (n * H comparisons); strata of one coalition
    # (size 0, size n - 1) have zero variance up to rounding
    mu = exact_stratum_means(prob, utility)
    e = stats.edges
    want = np.stack([mu[:, e[h]:e[h + 1]].mean(axis=1) for h in range(e.size - 1)], axis=1)
    se = np.sqrt(stats.variances_by_stratum() / stats.counts)
    assert_within(stats.means, want, se, z_allow(want.size), tol)


def assert_within(got, want, stderr, z, tol):
    """``|got - want| <= z stderr + tol`` everywhere (``tol``: rounding of the marginals)."""
    bad = np.abs(got - want) > z * stderr + tol
    assert not bad.any(), (np.abs(got - want)[bad], stderr[bad], z, tol)


@pytest.mark.parametrize("utility", UTILS3)
def test_stratified_truncation_bias_is_measured_and_bounded(utility):
    """Tail ``[L, n)`` sampled thinly: the full estimate matches exact; dropping the tail (``tail="zero"``) matches
    exact minus the exact tail contribution, which the thin tail sample estimates within its stated bound."""
    from freeshap_ray.valuation import exact_shapley, exact_stratum_means

    n, L = 10, 4
    prob = make_problem(n, 14, seed=1)
    mu = exact_stratum_means(prob, utility)
    exact, exact_tail = exact_shapley(prob, utility), mu[:, L:].sum(axis=1) / n
    # "thin": Neyman allocation of the body, min_count (4: >= 27 samples with the pilot) in each tail stratum
    stats, plan = stratified_run(prob, utility, seed=2, tail_from=L, tail="thin", min_count=4)
    tail_strata = plan.edges[:-1] >= L
    assert np.all(plan.counts[tail_strata] == 4)  # thin, not dropped
    _, tol = prefix_values(prob, np.arange(n), "neg_ce")
    z = z_allow(n)
    full = stats.values(tail_from=L, tail="sample")
    assert_within(full.values, exact, full.stderr, z, tol)
    cut = stats.values(tail_from=L, tail="zero")
    assert_within(cut.values, exact - exact_tail, cut.stderr, z, tol)
    est, se = stats.tail_contribution(L)
    assert_within(est, exact_tail, se, z, tol)
    # the stated bound |tail| <= |estimate| + 3 stderr (z_allow for the n comparisons) holds for every point
    assert np.all(np.abs(exact_tail) <= np.abs(est) + z * se + tol)
    assert cut.info["tail_bias_max_bound"] == pytest.approx(float((np.abs(est) + 3 * se).max()))
    # the bias is real here (n = 10 does not saturate) and detectable: comparing the truncated estimate with the
    # exact Shapley values, or a zero tail with its estimate, would fail
    assert np.max(np.abs(exact_tail) / cut.stderr) > 2 * z
    assert np.max(np.abs(exact_tail) / se) > 2 * z


def test_stratified_zero_tail_never_walks_past_the_truncation():
    from freeshap_ray.valuation import exact_shapley, exact_stratum_means
    from freeshap_ray.valuation.stratified import run_stratified

    n, L = 10, 4
    prob = make_problem(n, 14, seed=1)
    stats, plan = stratified_run(prob, "neg_ce", seed=3, tail_from=L, tail="zero")
    assert np.all(plan.counts[plan.edges[:-1] >= L] == 0)
    samples = run_stratified(prob, plan, 3, range(2 * len(plan.cycle)), "neg_ce")
    assert max(s.walked for s in samples) <= L and max(s.sizes.max() for s in samples) < L
    res = stats.values(tail_from=L, tail="zero")
    mu = exact_stratum_means(prob, "neg_ce")
    _, tol = prefix_values(prob, np.arange(n), "neg_ce")
    assert_within(res.values, exact_shapley(prob, "neg_ce") - mu[:, L:].sum(axis=1) / n, res.stderr, z_allow(n), tol)
    est, se = stats.tail_contribution(L)
    assert np.all(np.isinf(se))  # nothing sampled there: the bias is unmeasured, and says so
    assert np.isinf(res.info["tail_bias_max_bound"])
    assert np.isinf(stats.values(tail_from=L, tail="sample").stderr).all()


def test_stratified_per_point_plan_and_per_test_values():
    from freeshap_ray.valuation import exact_shapley

    n = 8
    prob = make_problem(n, 6, seed=6)
    stats, plan = stratified_run(prob, "margin", seed=4, pooled=False, per_test=True)
    assert plan.counts.shape == (n, plan.strata)
    assert len({tuple(r) for r in plan.counts}) > 1  # per-point allocations differ
    res = stats.values()
    exact = exact_shapley(prob, "margin", per_test_point=True)
    assert res.values.shape == exact.shape == res.stderr.shape
    _, tol = prefix_values(prob, np.arange(n), "neg_ce")
    assert_within(res.values, exact, res.stderr, z_allow(exact.size), tol)


def test_neyman_allocation():
    from freeshap_ray.valuation.stratified import StrataPlan, StrataStats, allocate

    n = 20
    edges = np.array([0, 1, 3, 7, 15, 20])
    # pilot with known per-stratum standard deviations sigma = (0, 1, 2, 4, 1) for every point
    sig = np.array([0.0, 1.0, 2.0, 4.0, 1.0])
    P = 2 * edges.size - 2  # two samples per stratum
    sz = np.empty((P, n), dtype=np.int64)
    mg = np.empty((P, n))
    for h in range(5):
        sz[2 * h:2 * h + 2] = edges[h]
        mg[2 * h] = 10.0 + sig[h] / np.sqrt(2)
        mg[2 * h + 1] = 10.0 - sig[h] / np.sqrt(2)
    stats = StrataStats.from_records(edges, sz, mg)
    np.testing.assert_allclose(stats.variances_by_stratum(), np.tile(sig**2, (n, 1)), rtol=1e-12)
    cost = np.array([1.0, 1.0, 4.0, 16.0, 100.0])
    plan = allocate(stats, cost, per_cycle=200, min_count=1)
    w = np.diff(edges)
    share = w * sig / np.sqrt(cost)  # 0, 2, 4, 8, 0.5 -> of 14.5
    want = 1 + (200 - 5) * share / share.sum()
    assert plan.counts.sum() == 200
    assert np.all(np.abs(plan.counts - want) <= 1)
    assert plan.counts[0] == 1  # zero variance: only the floor
    cut = allocate(stats, cost, per_cycle=200, tail_from=7, tail="zero")
    assert cut.counts[3] == cut.counts[4] == 0 and cut.counts.sum() == 200
    thin = allocate(stats, cost, per_cycle=200, tail_from=7, tail="thin", min_count=2)
    assert thin.counts[3] == thin.counts[4] == 2 and thin.counts.sum() == 200
    body = w[:3] * sig[:3] / np.sqrt(cost[:3])  # 0, 2, 4: the body shares what is left above the floors
    assert np.all(np.abs(thin.counts[:3] - (2 + (200 - 10) * body / body.sum())) <= 1)
    # cycle: every slot names a stratum, occurrences 0..count-1 each once, interleaved
    small = StrataPlan(edges, np.array([1, 2, 4, 0, 1]), n)
    cyc = small.cycle
    assert len(cyc) == 8 and not np.any(cyc[:, 0] == 3)
    for h, c in enumerate([1, 2, 4, 0, 1]):
        assert sorted(cyc[cyc[:, 0] == h, 1].tolist()) == list(range(c))
    assert cyc[:4, 0].tolist().count(2) == 2  # stride scheduling: half of stratum 2's samples in the first half
    with pytest.raises(ValueError, match="edges"):
        StrataPlan(np.array([0, 3, 2, 20]), np.array([1, 1, 1]), n)
    with pytest.raises(ValueError, match="2 pilot samples"):
        allocate(StrataStats.from_records(edges, sz[:1], mg[:1]), cost)


# ---- control variate on permutations ---------------------------------------------------------------------


def permutation_samples(prob, utility, seed, count, sampler="permutation", per_test=False):
    """``(sample_ids, samples)`` of ``count`` permutations (pairs for antithetic) without truncation."""
    from freeshap_ray.valuation import full_utility, run_permutation, sampler_permutation, samples_from_marginals

    per = 2 if sampler == "antithetic" else 1
    vf = full_utility(prob, utility)
    ids = np.arange(count * per)
    marg = np.stack([run_permutation(prob, sampler_permutation(prob.n, seed, int(i), sampler), utility,
                                     truncation_tol=0, v_full=vf, per_test_point=per_test).marginals for i in ids])
    return samples_from_marginals(ids, marg, sampler)


@pytest.mark.parametrize("utility", UTILS3)
@pytest.mark.parametrize("sampler", ["permutation", "antithetic"])
def test_control_variate_matches_exact(utility, sampler):
    from freeshap_ray.valuation import exact_shapley
    from freeshap_ray.valuation.control_variate import CVStats, control_mean, sample_controls

    n = 8
    prob = make_problem(n, 14, seed=5)
    exact = exact_shapley(prob, utility)
    ids, samples = permutation_samples(prob, utility, 3, 500, sampler)
    z = sample_controls(n, 3, ids, sampler)
    stats = CVStats.from_samples(ids, samples, z, control_mean(n))
    res = stats.values()
    assert res.counts.tolist() == [500] * n
    assert res.stderr.max() < 0.1 * (exact.max() - exact.min())  # the comparison has power
    _, tol = prefix_values(prob, np.arange(n), "neg_ce")
    assert_within(res.values, exact, res.stderr, z_allow(n), tol)
    # halves merge exactly
    half = CVStats.from_samples(ids[:170], samples[:170], z[:170], control_mean(n)) + \
        CVStats.from_samples(ids[170:], samples[170:], z[170:], control_mean(n))
    again = half.values()
    scale = np.abs(samples).max()
    np.testing.assert_allclose(again.values, res.values, rtol=0, atol=1e3 * EPS * scale)
    np.testing.assert_allclose(again.stderr, res.stderr, rtol=1e-8)
    plain = stats.plain()
    np.testing.assert_allclose(plain.values, samples.mean(axis=0), rtol=0, atol=64 * EPS * scale)
    np.testing.assert_allclose(plain.stderr, samples.std(axis=0, ddof=1) / np.sqrt(500), rtol=1e-9)


def test_control_variate_per_test_and_an_additive_control_removes_nothing():
    from freeshap_ray.valuation import exact_shapley
    from freeshap_ray.valuation.control_variate import CVStats, control_mean, sample_controls

    n = 7
    prob = make_problem(n, 5, seed=8)
    ids, samples = permutation_samples(prob, "neg_ce", 1, 400, per_test=True)
    z = sample_controls(n, 1, ids)
    res = CVStats.from_samples(ids, samples, z, control_mean(n)).values()
    exact = exact_shapley(prob, "neg_ce", per_test_point=True)
    assert res.values.shape == exact.shape
    _, tol = prefix_values(prob, np.arange(n), "neg_ce")
    assert_within(res.values, exact, res.stderr, z_allow(exact.size), tol)
    # an additive surrogate g(S) = sum w_j has the constant marginal w_i: as a control it is a constant per point
    # (zero covariance with the marginals), so the estimate is the plain mean
    basis = (lambda p: np.full_like(p, 0.7),)
    flat = CVStats.from_samples(ids, samples, sample_controls(n, 1, ids, basis=basis), control_mean(n, basis))
    np.testing.assert_allclose(flat.values().values, flat.plain().values, rtol=0, atol=64 * EPS * np.abs(samples).max())
    assert np.all(flat.coefficients(0) == 0)


def test_size_bin_control_is_post_stratification():
    """Bin indicators as controls: an exactly size-determined game (marginal = f(position)) has zero corrected
    variance, while the plain mean keeps the between-size variance."""
    from freeshap_ray.valuation.control_variate import CVStats, control_mean, sample_controls, size_bin_basis

    n, seed = 12, 4
    edges = np.array([0, 1, 3, 6, 12])
    basis = size_bin_basis(edges)
    ids = np.arange(200)  # every bin seen by every point in each fold (else that bin is simply not corrected)
    z = sample_controls(n, seed, ids, basis=basis)
    assert z[ids % 2 == 0].sum(axis=0).min() > 0 and z[ids % 2 == 1].sum(axis=0).min() > 0
    np.testing.assert_array_equal(z.sum(axis=2), 1.0)
    np.testing.assert_allclose(control_mean(n, basis), np.diff(edges) / n, rtol=1e-15)
    level = np.array([3.0, -1.0, 0.5, 0.25])
    d = z @ level  # (P, n): depends on the bin of each point's position only
    stats = CVStats.from_samples(ids, d, z, control_mean(n, basis))
    res, plain = stats.values(), stats.plain()
    exact = np.full(n, level @ np.diff(edges) / n)
    np.testing.assert_allclose(res.values, exact, rtol=0, atol=1e3 * EPS)
    # corrected variance = m2_d - 2 c.c_zd + c.c_zz.c cancels to 0; rounding of those three terms (each <= m2_d) is
    # below 32 eps m2_d, so stderr^2 <= 32 eps m2_d / ((P_f - 1) P_f) per fold
    pf = len(ids) // 2
    floor = np.sqrt(32 * EPS * stats.m2_d.max() / ((pf - 1) * pf))
    assert res.stderr.max() <= floor and plain.stderr.min() > 1e5 * floor


# ---- MSR-Banzhaf ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("utility", UTILS3)
def test_msr_banzhaf_matches_exact(utility):
    from freeshap_ray.valuation import BanzhafStats, exact_banzhaf, run_msr

    n = 8
    prob = make_problem(n, 14, seed=5)
    exact = exact_banzhaf(prob, utility)
    samples = run_msr(prob, 2, range(3000), utility, per_test_point=True)
    pt = BanzhafStats.from_samples(n, samples)
    mean = BanzhafStats.from_records(np.stack([s.included(n) for s in samples]),
                                     np.array([s.utility.mean() for s in samples]))
    res = mean.values()
    assert res.counts.tolist() == [3000] * n
    assert res.stderr.max() < 0.1 * (exact.max() - exact.min())  # the comparison has power
    _, tol = prefix_values(prob, np.arange(n), "neg_ce")
    assert_within(res.values, exact, res.stderr, z_allow(n), tol)
    exact_pt = exact_banzhaf(prob, utility, per_test_point=True)
    res_pt = pt.values()
    assert_within(res_pt.values, exact_pt, res_pt.stderr, z_allow(exact_pt.size), tol)
    np.testing.assert_allclose(res_pt.values.mean(axis=1), res.values, rtol=0, atol=1e3 * EPS)


def test_msr_records_are_a_function_of_seed_and_id_and_merge():
    from freeshap_ray.valuation import BanzhafStats, msr_subset, run_msr

    n = 13  # not a multiple of 8: packing pads
    prob = make_problem(n, 6, seed=1)
    allr = run_msr(prob, 4, range(40), "margin")
    some = run_msr(prob, 4, [31, 2], "margin")
    for s in some:
        assert s.utility == allr[s.sample_id].utility
        np.testing.assert_array_equal(s.mask, allr[s.sample_id].mask)
        assert s.mask.dtype == np.uint8 and s.mask.shape == (2,)
        np.testing.assert_array_equal(s.included(n), msr_subset(n, 4, s.sample_id))
    masks = np.stack([msr_subset(n, 4, k) for k in range(400)])
    assert abs(masks.mean() - 0.5) < 3 * 0.5 / np.sqrt(masks.size)  # inclusion probability 1/2
    whole = BanzhafStats.from_samples(n, allr)
    merged = BanzhafStats.from_samples(n, allr[:15]) + BanzhafStats.from_samples(n, allr[15:])
    a, b = whole.values(), merged.values()
    scale = max(abs(s.utility) for s in allr)
    np.testing.assert_array_equal(a.counts, b.counts)
    np.testing.assert_allclose(b.values, a.values, rtol=0, atol=64 * EPS * scale)
    np.testing.assert_allclose(b.stderr, a.stderr, rtol=1e-9)
    # the two-sample standard error by hand for one point
    mk = np.stack([s.included(n) for s in allr])
    v = np.array([s.utility for s in allr])
    i = 5
    se = np.sqrt(v[mk[:, i]].var(ddof=1) / mk[:, i].sum() + v[~mk[:, i]].var(ddof=1) / (~mk[:, i]).sum())
    assert a.stderr[i] == pytest.approx(se, rel=1e-9)
    assert a.values[i] == pytest.approx(v[mk[:, i]].mean() - v[~mk[:, i]].mean(), abs=64 * EPS * scale)


def test_controls_are_a_function_of_seed_and_id():
    from freeshap_ray.valuation import sampler_permutation
    from freeshap_ray.valuation.control_variate import DEFAULT_BASIS, position_basis, sample_controls

    n = 9
    allz = sample_controls(n, 2, np.arange(10), "antithetic", DEFAULT_BASIS)
    np.testing.assert_array_equal(sample_controls(n, 2, np.array([7, 3]), "antithetic", DEFAULT_BASIS), allz[[7, 3]])
    # pair 3 = permutations 6 and 7 (the reverse): mean of the basis at the two positions
    p6 = np.argsort(sampler_permutation(n, 2, 6, "antithetic"))
    p7 = np.argsort(sampler_permutation(n, 2, 7, "antithetic"))
    np.testing.assert_array_equal(p7, n - 1 - p6)
    want = 0.5 * (position_basis(p6, DEFAULT_BASIS) + position_basis(p7, DEFAULT_BASIS))
    np.testing.assert_allclose(allz[3], want, rtol=0, atol=4 * EPS)
    plain = sample_controls(n, 2, np.array([4]), basis=DEFAULT_BASIS)
    np.testing.assert_array_equal(plain[0], position_basis(np.argsort(sampler_permutation(n, 2, 4)), DEFAULT_BASIS))
    bins = sample_controls(n, 2, np.array([4]))  # default: size-bin indicators, one per point
    np.testing.assert_array_equal(bins.sum(axis=2), 1.0)


def test_control_coefficient_guard():
    """Too few samples per control, or a control that explains nothing, leaves the plain mean (unbiased either way)."""
    from freeshap_ray.valuation.control_variate import MIN_PER_CONTROL, CVStats, control_mean, sample_controls

    n = 10
    rng = np.random.default_rng(3)
    ids = np.arange(400)
    z = sample_controls(n, 1, ids)
    q = z.shape[2]
    mu = control_mean(n)
    noise = rng.normal(size=(400, n))  # independent of the controls
    few = CVStats.from_samples(ids[:2 * MIN_PER_CONTROL * q - 2], noise[:2 * MIN_PER_CONTROL * q - 2],
                               z[:2 * MIN_PER_CONTROL * q - 2], mu)
    assert np.all(few.coefficients(0) == 0) and np.all(few.coefficients(1) == 0)
    np.testing.assert_allclose(few.values().values, few.plain().values, rtol=0, atol=64 * EPS)
    many = CVStats.from_samples(ids, noise, z, mu)
    kept = np.any(many.coefficients(0) != 0, axis=1)
    assert kept.mean() < 0.5  # chance fits are mostly refused (adjusted R^2 < 0.05)
    signal = noise + 5.0 * (z @ np.linspace(-1, 1, q))  # strongly size-driven marginals
    strong = CVStats.from_samples(ids, signal, z, mu)
    assert np.all(np.any(strong.coefficients(0) != 0, axis=1))
    assert strong.values().info["variance_ratio"] > 2
