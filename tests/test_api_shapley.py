"""Public `freeshap_ray.shapley` on Ray against exact enumeration, and `load_kernel`."""

from __future__ import annotations

import numpy as np
import pytest

import freeshap_ray
from freeshap_ray.valuation import exact_shapley
from freeshap_ray.utility import RegressionProblem

TMC = dict(estimator="tmc", convergence="none", max_seconds=None)  # exact sample counts (no early stop)


def _kernels(n=6, m=16, d=4, seed=3, c=2):
    rng = np.random.default_rng(seed)
    x, xt = rng.normal(size=(n, d)), rng.normal(size=(m, d))
    w = rng.normal(size=(d, c))
    y = np.argmax(x @ w + 0.8 * rng.normal(size=(n, c)), axis=1)
    yt = np.argmax(xt @ w, axis=1)
    return x @ x.T, xt @ x.T, y, yt


@pytest.mark.parametrize("utility", ["accuracy", "neg_ce"])
def test_tmc_on_ray_matches_exact(ray_local, utility):
    k, kt, y, yt = _kernels()
    kw = dict(lam=0.5, kernel_divisor=1.0)
    res = freeshap_ray.shapley(k, kt, y, yt, utility=utility, n_permutations=1500, truncation_tol=0.0, seed=1,
                               permutations_per_task=250, **TMC, **kw)
    exact = exact_shapley(RegressionProblem.from_kernels(k, kt, y, yt, **kw), utility)
    assert res.values.shape == (6,) and (res.counts == 1500).all()
    assert np.abs(exact).max() > 1e-3, "degenerate test problem"
    z = np.abs(res.values - exact) / res.stderr
    assert z.max() < 3.0, (res.values, exact, res.stderr)
    # efficiency: sum of values = v(N) − v(∅) exactly for untruncated permutations
    assert res.values.sum() == pytest.approx(res.info["v_full"] - res.info["v_empty"], abs=1e-9)


def test_per_test_point_on_ray(ray_local):
    k, kt, y, yt = _kernels(m=5)
    kw = dict(lam=0.5, kernel_divisor=1.0)
    res = freeshap_ray.shapley(k, kt, y, yt, utility="neg_ce", n_permutations=800, truncation_tol=0.0, seed=2,
                               per_test_point=True, permutations_per_task=200, **TMC, **kw)
    exact = exact_shapley(RegressionProblem.from_kernels(k, kt, y, yt, **kw), "neg_ce", per_test_point=True)
    assert res.values.shape == (6, 5)
    z = np.abs(res.values - exact) / res.stderr
    assert z.max() < 3.0


def test_batching_does_not_change_values(ray_local):
    k, kt, y, yt = _kernels()
    a = freeshap_ray.shapley(k, kt, y, yt, n_permutations=20, seed=4, permutations_per_task=1, **TMC)
    b = freeshap_ray.shapley(k, kt, y, yt, n_permutations=20, seed=4, permutations_per_task=7, **TMC)
    np.testing.assert_allclose(a.values, b.values, atol=1e-12)
    np.testing.assert_allclose(a.stderr, b.stderr, atol=1e-12)


def test_bad_kernel_is_rejected(ray_local):
    k, kt, y, yt = _kernels()
    bad = k.copy()
    bad[0, 1] = np.nan
    with pytest.raises(freeshap_ray.FreeShapError, match="k_train"):
        freeshap_ray.shapley(bad, kt, y, yt, n_permutations=2)
