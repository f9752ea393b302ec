"""Shapley stage on Ray: permutations fanned out as tasks; the driver streams them to a sink and stops.

The regression problem (kernel, targets) is put in the object store once and every task reads it from
there. Permutation ``k`` depends only on ``(seed, k, sampler)`` whichever task runs it, so results do not
depend on batching or on the number of workers, and a resumed run skips the ids its sink already holds.
Tasks are submitted lazily, at most ``2 ×`` the cluster's task slots at a time, so a convergence criterion
or the time budget stops the run without queuing work that would be thrown away. Every finished batch is
handed to the sink BEFORE the driver decides whether to stop, so nothing that was computed is lost; the
values are then computed from everything the sink holds (:func:`~freeshap_ray.valuation.aggregate.aggregate`).
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import ray
from tqdm.auto import tqdm

from ..errors import FreeShapError
from ..utility import RegressionProblem
from ..valuation import (
    DEFAULT_BLOCK_SIZE,
    run_permutation,
    sampler_permutation,
    samples_from_marginals,
)
from ..valuation.aggregate import Estimate, aggregate
from ..valuation.settings import ValuationSettings
from ..valuation.sinks import Batch, MarginalsSink
from ..values import ValuesResult

__all__ = ["ValuationRun", "run_valuation", "cluster_slots"]

log = logging.getLogger(__name__)


@dataclass
class ValuationRun(Estimate):
    """:class:`~freeshap_ray.valuation.aggregate.Estimate` of everything stored, whose ``info`` also says what
    this call did (resumed/new permutations, stop reason, timings, v(N), v(∅), sign agreement, task nodes)."""


def _batch(problem: RegressionProblem, perm_ids: list[int], settings: ValuationSettings, v_full: float) -> Batch:
    """Ray task body: the permutations ``perm_ids`` with BLAS threads = the CPUs the task reserved."""
    from threadpoolctl import threadpool_limits

    c = settings.config
    with threadpool_limits(limits=max(1, int(c.num_cpus_per_task))):
        return [(pid, run_permutation(
            problem, sampler_permutation(problem.n, c.seed, pid, c.sampler), settings.utility,
            truncation_tol=settings.truncation_tol, truncation_patience=c.truncation_patience, v_full=v_full,
            per_test_point=c.per_test_point, block_size=DEFAULT_BLOCK_SIZE)) for pid in perm_ids]


def _batch_on_node(problem, perm_ids, settings, v_full) -> tuple[str, Batch]:
    """``_batch`` plus the id of the node that ran it (recorded in the run info)."""
    return ray.get_runtime_context().get_node_id(), _batch(problem, perm_ids, settings, v_full)


def _todo_ids(count: int, skip: set[int], per_sample: int) -> Iterator[int]:
    """The ``count`` smallest permutation ids not in ``skip``, whole samples (antithetic pairs) only (lazy)."""
    made, unit = 0, 0
    while made < count:
        ids = range(unit * per_sample, (unit + 1) * per_sample)
        if not any(i in skip for i in ids):
            yield from ids
            made += per_sample
        unit += 1


def _chunks(ids: Iterator[int], size: int) -> Iterator[list[int]]:
    while chunk := list(itertools.islice(ids, size)):
        yield chunk


def batch_values(batch: Batch, sampler: str, per_test_point: bool) -> tuple[ValuesResult, ValuesResult | None]:
    """Overall (and per-test) running statistics of one batch of whole samples."""
    ids = np.array([pid for pid, _ in batch], dtype=np.int64)
    marg = np.stack([r.marginals for _, r in batch])  # (b, n) or (b, n, m)
    per_test = None
    if per_test_point:
        per_test = ValuesResult.from_marginals(samples_from_marginals(ids, marg, sampler)[1])
        marg = marg.mean(axis=2)
    return ValuesResult.from_marginals(samples_from_marginals(ids, marg, sampler)[1]), per_test


def cluster_slots(num_cpus_per_task: float, resources_per_task: dict[str, float] | None = None) -> int:
    """How many tasks of ``num_cpus_per_task`` CPUs (and ``resources_per_task``) the current Ray cluster runs
    at once (>= 1)."""
    total = ray.cluster_resources()
    slots = int(float(total.get("CPU", 1.0)) // num_cpus_per_task)
    for name, amount in (resources_per_task or {}).items():
        if amount > 0:
            slots = min(slots, int(float(total.get(name, 0.0)) // amount))
    return max(1, slots)


class _Progress:
    """Running estimates on the driver: what the stopping rule and the time budget look at."""

    def __init__(self, problem: RegressionProblem, settings: ValuationSettings, initial: Estimate | None):
        self.overall = ValuesResult.empty(problem.n)
        self.per_test = ValuesResult.empty(problem.n, problem.m) if settings.config.per_test_point else None
        self.resumed = initial is not None
        if initial is not None:
            self.overall = self.overall + initial.values
            if self.per_test is not None and initial.per_test is not None:
                self.per_test = self.per_test + initial.per_test
        self.rule = settings.stopping_rule()
        self.settings = settings
        self.done: list[int] = []

    def add(self, batch: Batch) -> None:
        c = self.settings.config
        b_overall, b_per_test = batch_values(batch, c.sampler, c.per_test_point)
        self.overall = self.overall + b_overall
        if self.per_test is not None and b_per_test is not None:
            self.per_test = self.per_test + b_per_test
        self.done += [pid for pid, _ in batch]

    def converged(self) -> str | None:
        return self.rule.check(self.overall)


def run_valuation(problem: RegressionProblem, settings: ValuationSettings, sink: MarginalsSink, *,
                  progress: bool = True, on_batch: Callable[[Batch], None] | None = None) -> ValuationRun:
    """Run the permutations ``settings`` asks for as Ray tasks (Ray must be initialised), streaming every
    finished batch to ``sink``; return the values of everything ``sink`` holds.

    ``shapley.n_permutations`` is the TOTAL wanted in the sink: a rerun keeps the stored permutations (whatever
    seed they used), runs only the missing ones with new ids (``shapley.seed``'s smallest unused ids), and
    recomputes the values from all of them, so no permutation is ever counted twice. ``shapley.resume: false``
    clears the sink first.

    Args:
        on_batch: extra hook called after each batch was kept (tests use it to interrupt a run).

    Raises:
        OutputError: the sink holds marginals of other settings (see :meth:`MarginalsStore.open`).
        KernelError (or another FreeShapError) raised inside a task, unwrapped.
    """
    c = settings.config
    sink.open(settings.run_key(problem.digest(), problem.n, problem.m, problem.lam), resume=c.resume)
    stored = sink.marginals(problem.n)
    pairs = set(zip(stored.seeds.tolist(), stored.perm_ids.tolist()))
    initial = None
    if pairs:
        initial = aggregate(sink, problem.n, problem.m, sampler=c.sampler, per_test_point=c.per_test_point,
                            sign_splits=1)
    unit = settings.per_sample
    n_todo = math.ceil(max(0, c.n_permutations - len(pairs)) / unit) * unit
    t0 = time.perf_counter()
    run = _fan_out(problem, settings, sink, _Progress(problem, settings, initial), n_todo,
                   skip={pid for sd, pid in pairs if sd == c.seed}, progress=progress, on_batch=on_batch)
    seconds = time.perf_counter() - t0
    est = aggregate(sink, problem.n, problem.m, sampler=c.sampler, per_test_point=c.per_test_point,
                    sign_splits=c.sign_splits, sign_seed=c.seed)
    n_new = len(run["done"])
    est.info.update(
        utility=settings.utility.name, sampler=c.sampler, v_full=run["v_full"], v_empty=run["v_empty"],
        n_resumed=len(pairs), n_new=n_new, stop_reason=run["stop_reason"], seconds=seconds,
        task_nodes=run["task_nodes"], seconds_per_permutation=seconds / n_new if n_new else float("nan"),
        max_stderr=float(np.max(est.values.stderr)) if est.values.n else float("nan"), **est.sign.as_info(),
    )
    est.info["convergence_metric"] = run["convergence_metric"]
    est.values.info.update(est.info)
    if est.per_test is not None:
        est.per_test.info.update(est.info)
    return ValuationRun(est.values, est.per_test, est.sign, est.info)


def _fan_out(problem: RegressionProblem, settings: ValuationSettings, sink: MarginalsSink, state: _Progress,
             n_todo: int, *, skip: set[int], progress: bool, on_batch) -> dict:
    """The one fan-out loop: submit lazily, keep each finished batch, stop on budget, time or convergence."""
    from ..valuation import empty_utility, full_utility

    c = settings.config
    v_full = float(np.mean(full_utility(problem, settings.utility)))
    v_empty = float(np.mean(empty_utility(problem, settings.utility)))
    resources = {k: float(v) for k, v in c.resources_per_task.items() if v}
    missing = [k for k in resources if k not in ray.cluster_resources()]
    if missing:
        log.warning("shapley.resources_per_task: no node of this cluster has %s yet; tasks wait until one joins",
                    missing)
    slots = cluster_slots(c.num_cpus_per_task, resources)
    unit = settings.per_sample
    per_task = max(1, min(c.permutations_per_task, math.ceil(n_todo / slots))) if n_todo else 1
    chunks = _chunks(_todo_ids(n_todo, skip, unit), math.ceil(per_task / unit) * unit)
    problem_ref = ray.put(problem) if n_todo else None
    task = ray.remote(num_cpus=c.num_cpus_per_task, resources=resources or None,
                      scheduling_strategy=c.placement)(_batch_on_node)
    stop_reason = "budget"
    task_nodes: dict[str, int] = {}
    pending: list = []

    def submit() -> bool:
        ids = next(chunks, None)
        if ids is not None:
            pending.append(task.remote(problem_ref, ids, settings, v_full))
        return ids is not None

    if state.resumed and (reason := state.converged()) is not None:  # the stored samples may already suffice
        stop_reason, chunks = reason, iter(())
    while len(pending) < 2 * slots and submit():
        pass
    t0 = time.perf_counter()
    bar = tqdm(total=n_todo, desc="shapley permutations", unit="perm", disable=not progress)
    try:
        while pending:
            left = None if c.max_seconds is None else max(0.0, c.max_seconds - (time.perf_counter() - t0))
            done, pending = ray.wait(pending, num_returns=1, timeout=left)
            if not done:
                stop_reason = f"time budget: {c.max_seconds:g} s"
                break
            try:
                node, batch = ray.get(done[0])
            except ray.exceptions.RayTaskError as err:
                cause = getattr(err, "cause", None)
                if isinstance(cause, FreeShapError):
                    raise cause from None
                raise
            task_nodes[node] = task_nodes.get(node, 0) + 1
            sink.write(batch, c.seed, c.sampler, c.per_test_point)
            if on_batch is not None:
                on_batch(batch)
            state.add(batch)
            bar.update(len(batch))
            if (reason := state.converged()) is not None:
                stop_reason = reason
                break
            if c.max_seconds is not None and time.perf_counter() - t0 >= c.max_seconds:
                stop_reason = f"time budget: {c.max_seconds:g} s"
                break
            submit()
    finally:
        for ref in pending:
            ray.cancel(ref)
        bar.close()
    return {"v_full": v_full, "v_empty": v_empty, "done": state.done, "stop_reason": stop_reason,
            "task_nodes": task_nodes, "convergence_metric": state.rule.last_metric}
