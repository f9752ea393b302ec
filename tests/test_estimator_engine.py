"""Every ``shapley.estimator`` through the engine on Ray: matches exact enumeration, streams, resumes, and
stops on split-half stability."""

from __future__ import annotations

import numpy as np
import pytest

import freeshap_ray
from freeshap_ray.io import MarginalsStore
from freeshap_ray.utility import RegressionProblem
from freeshap_ray.valuation import exact_banzhaf, exact_shapley

from .helpers import run_resumable
from .test_shapley_resume import Interrupt, interrupt_after, kernels

KW = dict(lam=0.5, kernel_divisor=1.0, num_cpus_per_task=0.5, permutations_per_task=25, convergence="none")


def _problem(n=7, m=15):
    k, kt, y, yt = kernels(n=n, m=m)
    return (k, kt, y, yt), RegressionProblem.from_kernels(k, kt, y, yt, lam=0.5, kernel_divisor=1.0)


@pytest.mark.parametrize("estimator,utility,budget", [
    ("cv", "neg_ce", 600), ("stratified", "neg_ce", 600), ("stratified", "margin", 600),
    ("msr_banzhaf", "neg_ce", 1500), ("msr_banzhaf", "accuracy", 1500)])
def test_estimator_matches_exact_enumeration(ray_local, estimator, utility, budget):
    """n = 7: within 3 stderr of exact Shapley (Banzhaf for msr_banzhaf); 7 comparisons, so a correct estimator
    fails with probability < 2 %; ``tmc``'s own checks are in test_api_shapley / test_shapley_math."""
    (k, kt, y, yt), prob = _problem()
    exact = exact_banzhaf(prob, utility) if estimator == "msr_banzhaf" else exact_shapley(prob, utility)
    assert np.abs(exact).max() > 1e-3, "degenerate test problem"
    res = freeshap_ray.shapley(k, kt, y, yt, utility=utility, estimator=estimator, n_permutations=budget,
                               truncation_tol=0.0, seed=3, **KW)
    assert res.info["estimator"] == estimator and res.info["n_permutations"] == budget
    z = np.abs(res.values - exact) / res.stderr
    assert np.all(np.isfinite(res.stderr)) and z.max() < 3.0, (res.values, exact, res.stderr)
    assert 0.0 <= res.info["sign_agreement_mean"] <= 1.0 and np.isfinite(res.info["stability_spearman"])


@pytest.mark.parametrize("estimator", ["cv", "stratified", "msr_banzhaf"])
def test_estimator_resumes_to_the_uninterrupted_result(ray_local, tmp_path, estimator):
    _, prob = _problem(n=9, m=12)
    kw = dict(utility="neg_ce", estimator=estimator, n_permutations=120, seed=5, truncation_tol=0.0,
              permutations_per_task=10, num_cpus_per_task=0.5)
    whole = run_resumable(prob, MarginalsStore(tmp_path / "whole"), **kw)
    store = MarginalsStore(tmp_path / "killed")
    with pytest.raises(Interrupt):
        run_resumable(prob, store, on_batch=interrupt_after(3), **kw)
    resumed = run_resumable(prob, store, **kw)
    assert resumed.info["n_resumed"] > 0 and resumed.info["n_resumed"] + resumed.info["n_new"] == 120
    np.testing.assert_array_equal(resumed.values.values, whole.values.values)
    np.testing.assert_array_equal(resumed.values.stderr, whole.values.stderr)
    again = run_resumable(prob, store, **kw)
    assert again.info["n_new"] == 0
    np.testing.assert_array_equal(again.values.values, whole.values.values)


def test_stratified_records_its_plans_and_a_mismatched_estimator_is_refused(ray_local, tmp_path):
    from freeshap_ray.errors import OutputError

    _, prob = _problem(n=9, m=12)
    store = MarginalsStore(tmp_path / "s")
    run_resumable(prob, store, estimator="stratified", n_permutations=200, seed=1, truncation_tol=0.0,
                  permutations_per_task=10, num_cpus_per_task=0.5)
    plans = store.read_run()["extra"]["plans"]
    assert [p[0] for p in plans][0] == 0 and len(plans) == 2  # the pilot, then the allocation from its end
    with pytest.raises(OutputError, match="estimator"):
        run_resumable(prob, store, estimator="msr_banzhaf", n_permutations=10, seed=1, truncation_tol=0.0,
                      num_cpus_per_task=0.5)


def test_spearman_rule_stops_once_halves_agree(ray_local):
    (k, kt, y, yt), _ = _problem(n=10, m=20)
    res = freeshap_ray.shapley(k, kt, y, yt, utility="neg_ce", n_permutations=20000, truncation_tol=0.0, seed=2,
                               estimator="tmc", convergence_target=0.9, min_permutations=10,
                               **{**KW, "permutations_per_task": 20, "convergence": "spearman"})
    assert res.info["stop_reason"].startswith("converged: split-half Spearman")
    assert res.info["n_permutations"] < 20000 and res.info["convergence_metric"] >= 0.9


@pytest.mark.parametrize("estimator", ["tmc", "stratified", "msr_banzhaf"])
def test_per_test_values_report_their_stability_and_trace(ray_local, estimator):
    (k, kt, y, yt), _ = _problem(n=8, m=6)
    res = freeshap_ray.shapley(k, kt, y, yt, utility="neg_ce", estimator=estimator, n_permutations=200,
                               truncation_tol=0.0, seed=4, per_test_point=True, **{**KW, "permutations_per_task": 20})
    assert res.values.shape == (8, 6)
    rho = res.info["per_test_stability_spearman"]
    assert -1.0 <= rho <= 1.0 and rho > 0.5  # 200 samples of an 8-point game: halves clearly agree
    trace = res.info["stability_trace"]
    assert trace and all(len(t) == 3 for t in trace) and trace[-1][1] == 200 and res.info["cpu_seconds"] > 0
    assert [t[0] for t in trace] == sorted(t[0] for t in trace)  # CPU seconds accumulate


@pytest.mark.parametrize("tail", ["zero", "thin"])
def test_stratified_truncated_tail_is_explicit(ray_local, tail):
    """zero: the sizes from the truncation point on are never sampled; thin: sampled only to measure the bias,
    which is reported; both say where the tail starts."""
    (k, kt, y, yt), _ = _problem(n=10, m=12)
    res = freeshap_ray.shapley(k, kt, y, yt, utility="margin", estimator="stratified", stratified_tail=tail,
                               n_permutations=200, truncation_tol=0.2, seed=1, **{**KW, "permutations_per_task": 20})
    assert res.info["tail"] == "zero" and 1 <= res.info["tail_from"] <= 10
    if tail == "thin":
        assert np.isfinite(res.info["tail_bias_mean_abs"]) and np.isfinite(res.info["tail_bias_max_bound"])


def test_stratified_on_features_matches_exact_enumeration(ray_local, tmp_path):
    """The feature-space (primal QR) problem runs the stratified estimator through the engine (pilot, optimum
    allocation from the primal cost model, walk with branch/leave-one-out updates) and lands within 3 stderr
    of exact Shapley of the equivalent kernel problem."""
    from freeshap_ray.utility import FeatureProblem

    rng = np.random.default_rng(11)
    n, m, d = 7, 15, 5
    x, xt = rng.normal(size=(n, d)), rng.normal(size=(m, d))
    w = rng.normal(size=d)
    y = (x @ w + 0.8 * rng.normal(size=n) > 0).astype(int)
    yt = (xt @ w > 0).astype(int)
    fp = FeatureProblem.from_features(x, xt, y, yt, n_classes=2, lam=0.5, kernel_divisor=1.0)
    exact = exact_shapley(fp.to_dual(), "neg_ce")
    assert np.abs(exact).max() > 1e-3, "degenerate test problem"
    res = run_resumable(fp, MarginalsStore(tmp_path / "f"), utility="neg_ce", estimator="stratified",
                        n_permutations=600, seed=3, truncation_tol=0.0, permutations_per_task=25,
                        num_cpus_per_task=0.5)
    assert res.info["estimator"] == "stratified" and res.info["n_permutations"] == 600
    z = np.abs(res.values.values - exact) / res.values.stderr
    assert np.all(np.isfinite(res.values.stderr)) and z.max() < 3.0, (res.values.values, exact)


def test_defaults_stop_on_split_half_spearman(ray_local):
    """The public defaults (stratified on neg_ce, stop at split-half Spearman 0.9) stop early and say why."""
    (k, kt, y, yt), prob = _problem(n=10, m=20)
    res = freeshap_ray.shapley(k, kt, y, yt, lam=0.5, kernel_divisor=1.0, num_cpus_per_task=0.5)
    assert res.info["estimator"] == "stratified" and res.info["utility"] == "neg_ce"
    assert res.info["stop_reason"].startswith("converged: split-half Spearman"), res.info["stop_reason"]
    assert res.info["n_permutations"] < 100_000 and res.info["convergence_metric"] >= 0.9
    exact = exact_shapley(prob, "neg_ce")
    z = np.abs(res.values - exact) / res.stderr
    assert z.max() < 4.0, (res.values, exact, res.stderr)
