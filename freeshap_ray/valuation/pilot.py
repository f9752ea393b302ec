"""Pilot walks: where TMC's truncation rule fires, and the solver ``shapley.solver: auto`` picks from it.

A permutation walk stops where the utility stays within ``truncation_tol`` of ``v(N)`` (often a few
thousand points at any ``n``), so what a sample costs depends on that stopping point, not on ``n``: the
dual's ``k³/3 + M·k²`` beats the primal's ``k·(2D² + 4DM)`` whenever walks stop early. Both the stratified
estimator (its tail) and ``auto`` read it from the same four seed-determined walks.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from ..utility.features import FeatureProblem
from ..utility.solver import Problem, Solver, choose_solver, solver_costs
from .samplers import effective_tolerance, sampler_permutation
from .settings import ValuationSettings
from .tmc import full_utility, run_permutation

__all__ = ["PILOT_WALKS", "truncation_point", "expected_prefix_length", "auto_solver", "dual_memory_budget"]

log = logging.getLogger(__name__)

#: Pilot permutations (ids ``10**9 + k`` of the run's seed, never sample ids of the run itself).
PILOT_WALKS = 4

#: Share of the machine's physical memory the dual's ``n×n`` kernel and factor may take under ``auto``.
DUAL_MEMORY_SHARE = 0.25


def truncation_point(problem: Problem, settings: ValuationSettings, v_full: float | None = None) -> int:
    """Median point (in ``[1, n]``) where TMC's truncation rule fires on :data:`PILOT_WALKS` pilot walks.

    Uses ``shapley.truncation_tol`` and ``truncation_patience`` (a zero tolerance counts as ``1e-12``: the walk
    stops only where the utility equals ``v(N)``). ``v_full``: mean utility of the full set (computed if None).
    """
    c = settings.config
    if v_full is None:
        v_full = float(np.mean(full_utility(problem, settings.utility)))
    with threadpool_limits(limits=1):  # as the tasks run them: a walk's small BLAS calls run 1.5-2x slower on 2
        pts = [run_permutation(problem, sampler_permutation(problem.n, c.seed, 10**9 + k), settings.utility,
                               truncation_tol=max(c.truncation_tol, 1e-12), truncation_patience=c.truncation_patience,
                               v_full=v_full).truncated_at for k in range(PILOT_WALKS)]
    return int(min(max(np.median(pts), 1), problem.n))


def expected_prefix_length(problem: Problem, settings: ValuationSettings) -> tuple[int, str]:
    """``(points a sample adds, how that was found)`` for the configured estimator.

    ``msr_banzhaf`` solves subsets of ``~n/2`` points; untruncated walks (sampler ``permutation``, a zero
    tolerance, or the stratified estimator with ``stratified_tail: sample``) reach ``n``; every other walk
    stops near :func:`truncation_point`.
    """
    c, n = settings.config, problem.n
    if c.estimator == "msr_banzhaf":
        return max(1, (n + 1) // 2), "msr_banzhaf subsets of ~n/2 points"
    if c.estimator == "stratified" and c.stratified_tail == "sample":
        return n, "stratified_tail: sample walks reach n"
    if c.estimator != "stratified" and effective_tolerance(c.sampler, c.truncation_tol) == 0:
        return n, "untruncated walks"
    return truncation_point(problem, settings), f"median truncation point of {PILOT_WALKS} pilot walks"


def dual_memory_budget() -> float | None:
    """Bytes ``auto`` lets the dual's ``n×n`` matrices take: :data:`DUAL_MEMORY_SHARE` of physical memory."""
    try:
        return DUAL_MEMORY_SHARE * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return None


def auto_solver(problem: FeatureProblem, settings: ValuationSettings, *,
                memory_bytes: float | None = None) -> tuple[Solver, dict[str, Any]]:
    """``shapley.solver: auto`` on projected features: the cheaper solver for the walks this run will make.

    Args:
        problem: the feature problem (the pilot walks run on it, in feature space: nothing ``n×n``).
        settings: the valuation settings (estimator, sampler, truncation, utility, seed).
        memory_bytes: the dual's ``n×n`` matrices must fit in this (default :func:`dual_memory_budget`).

    Returns:
        ``(solver, info)`` with the expected prefix length, its source and both cost estimates.
    """
    k, how = expected_prefix_length(problem, settings)
    budget = dual_memory_budget() if memory_bytes is None else memory_bytes
    D, g = problem.dim, problem.group
    solver = choose_solver(problem.n, problem.m, D, g, expected_prefix_len=k, memory_bytes=budget)
    costs = solver_costs(problem.n, problem.m, D, g, expected_prefix_len=k)
    info = {"solver": solver, "expected_prefix_len": k, "expected_prefix_from": how,
            "dual_time": costs["dual"]["time"], "primal_time": costs["primal"]["time"],
            "dual_bytes": costs["dual"]["bytes"], "memory_budget_bytes": budget}
    log.info("shapley.solver auto: %s (samples add ~%d of %d points: %s; cost dual %.3g vs primal %.3g "
             "dual-flop units; dual memory %.2f GB, budget %s)", solver, k, problem.n, how, info["dual_time"],
             info["primal_time"], info["dual_bytes"] / 1e9, "none" if budget is None else f"{budget / 1e9:.2f} GB")
    return solver, info
