"""Shapley engine: exact prefix utilities (also on rank-deficient kernels), samplers, stopping, sign robustness."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from freeshap_ray.config import ShapleyConfig
from freeshap_ray.errors import ConfigError, KernelError
from freeshap_ray.utility import UTILITIES, IncrementalRegressor, RegressionProblem
from freeshap_ray.utility._blas import HAVE_RAW_TRSM, trsm_lower_inplace
from freeshap_ray.valuation import (
    StoppingRule,
    empty_utility,
    exact_shapley,
    full_utility,
    run_permutation,
    sampler_permutation,
    samples_from_marginals,
    sign_agreement,
)
from freeshap_ray.valuation.reference_schemes import ResolveBaseline, SchurFloat32Baseline
from freeshap_ray.values import ValuesResult

from .helpers import EPS, solve_tol, utility_tol
from .test_shapley_math import make_problem


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    """Many tiny solves: BLAS threads only add contention on the shared 2-core machine."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        yield


def low_rank_problem(n: int, m: int, rank: int, seed: int = 0) -> RegressionProblem:
    """Rank-``rank`` kernel with a decaying spectrum at the reference scaling (divisor 1e4, lam 1e-6)."""
    rng = np.random.default_rng(seed)
    phi = rng.normal(size=(n + m, rank)) * (np.arange(1, rank + 1) ** -0.5) * 100.0
    y = np.argmax(phi @ rng.normal(size=(rank, 2)) + 0.3 * rng.normal(size=(n + m, 2)), axis=1)
    k = phi @ phi.T
    return RegressionProblem.from_kernels(k[:n, :n], k[n:, :n], y[:n], y[n:], n_classes=2)


def direct_prefix_utilities(prob, perm, utility, per_test=False):
    """Utilities of every prefix by direct solves, and the tolerance for other evaluations of them."""
    u = UTILITIES[utility]
    out = [empty_utility(prob, utility, per_test)]
    scale = 0.0
    for k in range(1, len(perm) + 1):
        pred = prob.predict(perm[:k])
        scale = max(scale, float(np.abs(pred).max()))
        out.append(u.per_test(pred, prob.y_test) if per_test else u(pred, prob.y_test))
    return np.array(out), utility_tol(prob, scale)


# ---- the incremental factor ------------------------------------------------------------------------


def test_raw_trsm_on_leading_block_matches_scipy():
    assert HAVE_RAW_TRSM, "the copy-free BLAS binding should be available with SciPy's bundled BLAS"
    rng = np.random.default_rng(0)
    big = np.asfortranarray(np.tril(rng.normal(size=(50, 50))) + 10 * np.eye(50))
    b = np.asfortranarray(rng.normal(size=(31, 4)))
    want = scipy.linalg.solve_triangular(big[:31, :31], b, lower=True)
    got = trsm_lower_inplace(big, 31, b.copy(order="F"))
    # two backward-stable triangular solves: ≤ 2 · k · cond(L) · eps relative (Higham, Thm 8.5)
    tol = 2 * 31 * np.linalg.cond(big[:31, :31]) * EPS * np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=0, atol=tol)
    # fallback path (C-ordered right-hand side) gives the same
    np.testing.assert_allclose(trsm_lower_inplace(big, 31, np.ascontiguousarray(b)), want, rtol=0, atol=tol)


@pytest.mark.parametrize("utility", ["accuracy", "neg_ce"])
@pytest.mark.parametrize("kind", ["first_logit", "full"])
def test_every_prefix_utility_matches_direct_solve(utility, kind):
    """All n prefix utilities of a permutation (default block size, several blocks) vs float64 direct solves."""
    n = 150 if kind == "first_logit" else 45  # more than two default blocks / several blocks of C rows
    prob = make_problem(n, 20, kind=kind, seed=21, lam=1e-2)
    perm = sampler_permutation(n, 3, 0)
    res = run_permutation(prob, perm, utility, truncation_tol=0)
    ref, tol = direct_prefix_utilities(prob, perm, utility)
    # the cumulative sum of n marginals adds n roundings of the utilities' size
    tol += n * EPS * np.abs(ref).max()
    np.testing.assert_allclose(np.cumsum(res.marginals[perm]) + ref[0], ref[1:], rtol=0, atol=tol)
    pt = run_permutation(prob, perm, utility, truncation_tol=0, per_test_point=True, block_size=17)
    ref_pt, tol_pt = direct_prefix_utilities(prob, perm, utility, per_test=True)
    tol_pt += n * EPS * np.abs(ref_pt).max()
    np.testing.assert_allclose(np.cumsum(pt.marginals[perm], axis=0) + ref_pt[0], ref_pt[1:], rtol=0, atol=tol_pt)


def test_rank_deficient_reference_scaling_stays_exact_and_reference_scheme_breaks():
    """Rank 40 << n = 240 at lam = 1e-6 / divisor 1e4: cond(K_SS + lam I) ~ 4e8.

    Ours (float64 incremental Cholesky) agrees with a float64 direct solve on every prefix to within the
    conditioning bound (both are backward stable, so they may differ by ~cond * eps relative); the
    reference float32 Schur scheme has no correct digit to keep (cond * eps32 ~ 24 >> 1): its error is
    orders of magnitude beyond that bound and its test accuracy falls far below the exact one. How far
    it blows up depends on the BLAS kernel and CPU (train losses of 4e2-4e3 were seen), so only the
    comparison with the bound and the accuracy collapse are asserted.
    """
    n = 240
    prob = low_rank_problem(n, 100, rank=40)
    eig = np.linalg.eigvalsh(prob.K)
    cond = (eig[-1] + prob.lam) / prob.lam
    assert cond > 1e7 and np.sum(eig > 1e-8 * eig[-1]) <= 40
    perm = sampler_permutation(n, 0, 0)
    preds = IncrementalRegressor(prob).extend(perm)
    tol = solve_tol(prob)  # the rows · cond · eps forward-error bound
    worst = 0.0
    for k in range(n):
        want = prob.predict(perm[: k + 1])
        worst = max(worst, np.abs(preds[k] - want).max() / np.abs(want).max())
    assert worst <= tol, (worst, tol)
    # utilities: accuracy identical on every prefix, values finite and meaningful
    acc = UTILITIES["accuracy"]
    ours = acc.batch(preds, prob.y_test)
    direct = np.array([acc(prob.predict(perm[: k + 1]), prob.y_test) for k in range(0, n, 7)])
    np.testing.assert_array_equal(ours[::7], direct)
    assert ours[-1] > 0.85 and np.all(np.isfinite(ours))
    res = run_permutation(prob, perm, "neg_ce", truncation_tol=0)
    assert np.all(np.isfinite(res.marginals))
    # the reference scheme (float32 Schur updates, refresh every 500 > n: never refreshed here)
    ref = SchurFloat32Baseline(prob, perm, start=500, refresh=500, faithful_order=False)
    exact = prob.predict()
    schur = ref.predict(n)
    assert np.abs(schur - exact).max() / np.abs(exact).max() > 1e3 * tol  # ours is within tol on every prefix
    exact_full, schur_full = acc(exact, prob.y_test), acc(schur, prob.y_test)
    assert schur_full < exact_full - 0.2, (schur_full, exact_full)


def test_reference_scheme_is_faithful_on_a_well_conditioned_kernel():
    """On a benign kernel the float32 Schur baseline and the re-solve baseline agree with ours."""
    prob = make_problem(60, 10, seed=2, lam=1.0)
    perm = sampler_permutation(60, 1, 0)
    preds = IncrementalRegressor(prob).extend(perm)
    resolve = ResolveBaseline(prob, perm)
    for faithful in (True, False):
        schur = SchurFloat32Baseline(prob, perm, start=20, refresh=15, faithful_order=faithful)
        for k in (1, 5, 19, 20, 21, 34, 35, 36, 60):
            scale = np.abs(preds[k - 1]).max()
            np.testing.assert_allclose(resolve.predict(k), preds[k - 1], atol=1e-10 * scale)
            np.testing.assert_allclose(schur.predict(k), preds[k - 1], atol=1e-3 * scale)


def test_non_psd_kernel_clear_error():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(12, 12))
    k = a + a.T  # symmetric, indefinite
    prob = RegressionProblem.from_kernels(k, rng.normal(size=(3, 12)), rng.integers(0, 2, 12), [0, 1, 0],
                                          lam=1e-6, kernel_divisor=1.0)
    with pytest.raises(KernelError, match="not positive semi-definite"):
        run_permutation(prob, np.arange(12), v_full=0.5, truncation_tol=0)


# ---- samplers --------------------------------------------------------------------------------------


def test_antithetic_permutations_and_pairing():
    a, b = sampler_permutation(9, 4, 6, "antithetic"), sampler_permutation(9, 4, 7, "antithetic")
    np.testing.assert_array_equal(b, a[::-1])
    np.testing.assert_array_equal(a, sampler_permutation(9, 4, 3, "tmc"))
    np.testing.assert_array_equal(sampler_permutation(9, 4, 5, "permutation"), sampler_permutation(9, 4, 5))
    ids = np.array([5, 0, 1, 4, 2])  # pair 2 incomplete (3 missing) -> dropped
    marg = np.arange(5, dtype=float)[:, None] * np.ones((5, 2))
    sid, samples = samples_from_marginals(ids, marg, "antithetic")
    np.testing.assert_array_equal(sid, [0, 2])
    np.testing.assert_allclose(samples[:, 0], [(1 + 2) / 2, (3 + 0) / 2])
    with pytest.raises(ConfigError, match="^shapley.sampler"):  # validated once, by the settings' config
        ShapleyConfig(sampler="bogus")


@pytest.mark.parametrize("utility", ["accuracy", "neg_ce"])
def test_antithetic_and_plain_permutation_match_exact(utility):
    n, m = 7, 15
    prob = make_problem(n, m, seed=5)
    exact = exact_shapley(prob, utility)
    exact_pt = exact_shapley(prob, utility, per_test_point=True)
    vf = full_utility(prob, utility)
    _, tol = direct_prefix_utilities(prob, np.arange(n), "neg_ce")
    for sampler, count in (("antithetic", 1200), ("permutation", 1200)):
        ids = np.arange(count)
        runs = [run_permutation(prob, sampler_permutation(n, 9, int(i), sampler), utility, truncation_tol=0,
                                v_full=vf, per_test_point=True) for i in ids]
        pt = np.stack([r.marginals for r in runs])
        for per_test, marg, want in ((False, pt.mean(axis=2), exact), (True, pt, exact_pt)):
            _, samples = samples_from_marginals(ids, marg, sampler)
            res = ValuesResult.from_marginals(samples)
            assert res.counts[0] == (count // 2 if sampler == "antithetic" else count)
            ok = res.stderr > 0
            np.testing.assert_allclose(res.values[~ok], want[~ok], atol=tol)
            z = np.abs(res.values[ok] - want[ok]) / res.stderr[ok]
            assert z.max() < (3.5 if per_test else 3.0), (sampler, per_test, z.max())  # 105 per-test comparisons


def test_permutation_sampler_never_truncates():
    from freeshap_ray.valuation import effective_tolerance

    assert effective_tolerance("permutation", 0.3) == 0.0
    assert effective_tolerance("tmc", 0.3) == effective_tolerance("antithetic", 0.3) == 0.3


# ---- stopping ----------------------------------------------------------------------------------------


def test_stderr_rule():
    rule = StoppingRule("stderr", tol=0.1, min_samples=5)
    rng = np.random.default_rng(0)
    base = np.array([0.0, 1.0, 2.0, 3.0])
    noisy = ValuesResult.from_marginals(base + rng.normal(scale=5.0, size=(6, 4)))
    assert rule.check(noisy) is None and rule.last_metric > 0.1
    calm = ValuesResult.from_marginals(base + rng.normal(scale=0.01, size=(6, 4)))
    assert rule.check(calm).startswith("converged")
    few = ValuesResult.from_marginals(base + rng.normal(scale=0.01, size=(4, 4)))
    assert rule.check(few) is None  # below min_samples
    assert StoppingRule("none").check(calm) is None
    with pytest.raises(ConfigError, match="^shapley.convergence"):
        ShapleyConfig(convergence="bogus")


def test_rank_rule_needs_patience():
    rule = StoppingRule("rank", top_k=2, patience=2, min_samples=2)
    a = ValuesResult.from_marginals(np.array([[5.0, 4, 0, 1, -3, -4]] * 3))
    b = ValuesResult.from_marginals(np.array([[4.0, 5, 1, 0, -4, -3]] * 3))  # same top/bottom sets
    c = ValuesResult.from_marginals(np.array([[0.0, 5, 4, 1, -4, -3]] * 3))  # top set changes
    assert rule.check(a) is None
    assert rule.check(b) is None
    assert rule.check(c) is None  # streak reset
    assert rule.check(c) is None
    assert rule.check(c).startswith("converged")


# ---- sign robustness ---------------------------------------------------------------------------------


def test_sign_agreement():
    rng = np.random.default_rng(1)
    s = 200
    samples = np.stack([
        1.0 + 0.1 * rng.normal(size=s),  # clearly positive
        -1.0 + 0.1 * rng.normal(size=s),  # clearly negative
        rng.normal(size=s),  # zero mean: sign is a coin flip between halves
        np.zeros(s),  # always 0 (e.g. always truncated): agrees with itself
    ], axis=1)
    rep = sign_agreement(samples, n_splits=400, seed=3)
    assert rep.per_point.shape == (4,)
    np.testing.assert_array_equal(rep.per_point[[0, 1, 3]], 1.0)
    assert 0.3 < rep.per_point[2] < 0.7
    assert rep.halves in (0.75, 1.0)
    assert rep.mean == pytest.approx(rep.per_point.mean())
    one = sign_agreement(samples[:1])
    assert np.isnan(one.halves) and np.all(np.isnan(one.per_point))
    again = sign_agreement(samples, n_splits=400, seed=3)
    np.testing.assert_array_equal(again.per_point, rep.per_point)


def test_efficiency_of_every_sampler_sample():
    prob = make_problem(20, 9, seed=4)
    vf, ve = full_utility(prob, "neg_ce"), empty_utility(prob, "neg_ce")
    ids = np.arange(6)
    marg = np.stack([run_permutation(prob, sampler_permutation(20, 2, int(i), "antithetic"), "neg_ce",
                                     truncation_tol=0, v_full=vf).marginals for i in ids])
    _, samples = samples_from_marginals(ids, marg, "antithetic")
    _, tol = direct_prefix_utilities(prob, sampler_permutation(20, 2, 0, "antithetic"), "neg_ce")
    np.testing.assert_allclose(samples.sum(axis=1), vf - ve, atol=tol + 20 * EPS * abs(vf))
