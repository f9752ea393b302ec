"""Shapley stage on Ray: TMC permutations fanned out as tasks; the driver aggregates and streams results.

The regression problem (kernel, targets) is put in the object store once and every task reads it from
there. Permutation ``k`` is ``default_rng([seed, k]).permutation(n)`` whichever task runs it, so results
do not depend on how permutations are batched or on the number of workers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import ray
from tqdm.auto import tqdm

from ..valuation import PermutationResult, full_utility, permutation_for, run_permutation
from ..utility import RegressionProblem, UtilitySpec
from ..values import ValuesResult

__all__ = ["TMCRun", "run_tmc"]


@dataclass
class TMCRun:
    """Aggregated result of a TMC run.

    Attributes:
        values: overall values (n,) with stderr and counts.
        per_test: per-test-point values (n, m), or None.
        v_full: mean utility of the full training set; v_empty: of the empty set.
        truncated_at: (P,) points added before truncation, per permutation (in perm-id order).
        seconds: wall time of the permutation fan-out.
    """

    values: ValuesResult
    per_test: ValuesResult | None
    v_full: float
    v_empty: float
    truncated_at: np.ndarray
    seconds: float


def _batch(problem: RegressionProblem, perm_ids: list[int], seed: int, utility: UtilitySpec, tol: float,
           patience: int, v_full: float, per_test: bool) -> list[tuple[int, PermutationResult]]:
    out = []
    for pid in perm_ids:
        res = run_permutation(
            problem, permutation_for(problem.n, seed, pid), utility, truncation_tol=tol,
            truncation_patience=patience, v_full=v_full, per_test_point=per_test,
        )
        out.append((pid, res))
    return out


def run_tmc(
    problem: RegressionProblem,
    *,
    utility: UtilitySpec = "accuracy",
    n_permutations: int = 200,
    truncation_tol: float = 0.05,
    truncation_patience: int = 2,
    seed: int = 0,
    per_test_point: bool = False,
    permutations_per_task: int = 8,
    num_cpus_per_task: float = 1.0,
    on_batch: Callable[[list[tuple[int, PermutationResult]]], None] | None = None,
    progress: bool = True,
) -> TMCRun:
    """Run ``n_permutations`` TMC permutations as Ray tasks (Ray must be initialised).

    Args:
        problem: the kernel-regression problem.
        on_batch: called on the driver with each finished batch of ``(perm_id, result)`` (streaming sink).

    Returns:
        A :class:`TMCRun` with Welford-merged values.
    """
    t0 = time.perf_counter()
    v_full = float(np.mean(full_utility(problem, utility)))
    problem_ref = ray.put(problem)
    task = ray.remote(num_cpus=num_cpus_per_task)(_batch)
    ids = list(range(n_permutations))
    pending = [
        task.remote(problem_ref, ids[s : s + permutations_per_task], seed, utility, truncation_tol,
                    truncation_patience, v_full, per_test_point)
        for s in range(0, n_permutations, permutations_per_task)
    ]
    overall = ValuesResult.empty(problem.n)
    per_test = ValuesResult.empty(problem.n, problem.m) if per_test_point else None
    truncated_at = np.zeros(n_permutations, dtype=np.int64)
    v_empty = 0.0
    bar = tqdm(total=n_permutations, desc="shapley permutations", unit="perm", disable=not progress)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        batch = ray.get(done[0])
        marg = np.stack([r.marginals for _, r in batch])  # (b, n) or (b, n, m)
        if per_test_point:
            per_test = per_test + ValuesResult.from_marginals(marg)
            marg = marg.mean(axis=2)
        overall = overall + ValuesResult.from_marginals(marg)
        for pid, r in batch:
            truncated_at[pid] = r.truncated_at
            v_empty = r.v_empty
        if on_batch is not None:
            on_batch(batch)
        bar.update(len(batch))
    bar.close()
    overall.info.update(n_permutations=n_permutations, mean_truncated_at=float(truncated_at.mean()))
    return TMCRun(overall, per_test, v_full, v_empty, truncated_at, time.perf_counter() - t0)
