"""Pilot walks and ``shapley.solver: auto``: the expected walk length comes from where pilot walks truncate, and
the cheaper solver for that length is chosen (the dual's n×n only within the memory budget)."""

from __future__ import annotations

import numpy as np
import pytest

from freeshap_ray.utility import FeatureProblem, choose_solver
from freeshap_ray.valuation import full_utility, run_permutation, sampler_permutation
from freeshap_ray.valuation.estimators import estimator_for
from freeshap_ray.valuation.pilot import PILOT_WALKS, auto_solver, expected_prefix_length, truncation_point
from freeshap_ray.valuation.settings import ValuationSettings


def easy_problem(n: int = 3000, m: int = 50, D: int = 16, seed: int = 0) -> FeatureProblem:
    """Labels are the sign of the first feature: a few points already classify the test set, so truncated
    walks stop early."""
    rng = np.random.default_rng(seed)
    phi = rng.normal(size=(n + m, D)) * 30.0
    y = (phi[:, 0] > 0).astype(np.int64)
    return FeatureProblem.from_features(phi[:n], phi[n:], y[:n], y[n:], n_classes=2)


def settings(**kw) -> ValuationSettings:
    base = dict(utility="accuracy", truncation_tol=0.2, truncation_patience=1, estimator="tmc", seed=5)
    return ValuationSettings.of(**{**base, **kw})


def test_truncation_point_is_the_median_stop_of_the_pilot_walks_and_the_same_on_the_dual():
    prob = easy_problem(n=400, m=30)
    s = settings()
    v_full = float(full_utility(prob, "accuracy"))
    stops = [run_permutation(prob, sampler_permutation(prob.n, 5, 10**9 + k), "accuracy", truncation_tol=0.2,
                             truncation_patience=1, v_full=v_full).truncated_at for k in range(PILOT_WALKS)]
    assert max(stops) < prob.n  # the walks do truncate here
    assert truncation_point(prob, s, v_full) == int(np.median(stops))
    assert truncation_point(prob, s) == truncation_point(prob.to_dual(), s)  # v_full computed; dual walks agree
    # the stratified estimator's tail starts at the same point (one definition)
    st = ValuationSettings.of(utility="accuracy", truncation_tol=0.2, truncation_patience=1, seed=5,
                              estimator="stratified", stratified_tail="zero")
    assert estimator_for(st).context(prob, v_full).tail_from == truncation_point(prob, st, v_full)


@pytest.mark.parametrize("kw, expected", [
    (dict(estimator="msr_banzhaf"), 1500),
    (dict(sampler="permutation"), 3000),  # tmc with the untruncated sampler
    (dict(truncation_tol=0.0), 3000),
    (dict(estimator="stratified", stratified_tail="sample"), 3000),
])
def test_expected_prefix_length_without_pilot(kw, expected):
    k, how = expected_prefix_length(easy_problem(), settings(**kw))
    assert k == expected and "pilot" not in how


def test_auto_picks_the_dual_where_walks_truncate_early_and_the_primal_otherwise():
    prob = easy_problem()
    n, m, D = prob.n, prob.m, prob.dim
    assert choose_solver(n, m, D) == "primal"  # walked to n, the primal is cheaper
    solver, info = auto_solver(prob, settings(), memory_bytes=1e12)
    assert info["expected_prefix_len"] < n // 10 and "pilot" in info["expected_prefix_from"]
    assert solver == "dual" and info["dual_time"] < info["primal_time"]
    # the dual's n×n matrices must fit the memory budget
    solver, info = auto_solver(prob, settings(), memory_bytes=info["dual_bytes"] / 2)
    assert solver == "primal"
    # untruncated walks: the primal
    solver, info = auto_solver(prob, settings(sampler="permutation"), memory_bytes=1e12)
    assert solver == "primal" and info["expected_prefix_len"] == n
