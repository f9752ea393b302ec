"""Shapley stage on Ray: samples fanned out as tasks; the driver streams them to a sink and stops.

The regression problem (kernel or features, targets) is put in the object store once and every task reads it
from there. Sample ``k`` depends only on ``(seed, k)`` (and the run's recorded plan) whichever task runs it, so
results do not depend on batching or on the number of workers, and a resumed run skips the ids its sink already
holds. Tasks are submitted lazily, at most ``2 ×`` the cluster's task slots at a time, so a stopping rule or
the time budget stops the run without queuing work that would be thrown away. Every finished batch is handed
to the sink BEFORE the driver decides whether to stop, so nothing that was computed is lost; the values are
then computed from everything the sink holds for the seed (:func:`~freeshap_ray.valuation.aggregate.aggregate`).
The estimator (``shapley.estimator``, :mod:`freeshap_ray.valuation.estimators`) decides what a sample is.
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
from ..valuation import empty_utility, full_utility
from ..valuation.aggregate import Estimate, _spearman, _stored_permutations, aggregate
from ..valuation.estimators import Context, Estimator, Stats, estimator_for
from ..valuation.settings import ValuationSettings
from ..valuation.sinks import MarginalsSink

__all__ = ["ValuationRun", "run_valuation", "cluster_slots"]

log = logging.getLogger(__name__)


@dataclass
class ValuationRun(Estimate):
    """:class:`~freeshap_ray.valuation.aggregate.Estimate` of everything stored for the seed, whose ``info`` also
    says what this call did (resumed/new samples, stop reason, timings, v(N), v(∅), sign agreement, task nodes)."""


def _batch(problem: RegressionProblem, ids: list[int], est: Estimator, ctx: Context) -> list:
    """Task body: the samples ``ids`` with BLAS threads = the CPUs the task reserved."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=max(1, int(est.settings.config.num_cpus_per_task))):
        return est.run(problem, ids, ctx)


def _batch_on_node(problem, ids, est, ctx) -> tuple[str, float, list]:
    """``_batch`` plus the id of the node that ran it (recorded in the run info) and its CPU seconds."""
    t = time.process_time()
    records = _batch(problem, ids, est, ctx)
    return ray.get_runtime_context().get_node_id(), time.process_time() - t, records


def _todo_ids(count: int, skip: set[int], per_sample: int, start: int = 0) -> Iterator[int]:
    """The ``count`` smallest ids from ``start`` on not in ``skip``, whole samples (antithetic pairs) only (lazy)."""
    made, unit = 0, start // per_sample
    while made < count:
        ids = range(unit * per_sample, (unit + 1) * per_sample)
        if not any(i in skip for i in ids):
            yield from ids
            made += per_sample
        unit += 1


def _chunks(ids: Iterator[int], size: int) -> Iterator[list[int]]:
    while chunk := list(itertools.islice(ids, size)):
        yield chunk


def cluster_slots(num_cpus_per_task: float, resources_per_task: dict[str, float] | None = None) -> int:
    """How many tasks of ``num_cpus_per_task`` CPUs (and ``resources_per_task``) the current Ray cluster runs
    at once (>= 1)."""
    total = ray.cluster_resources()
    slots = int(float(total.get("CPU", 1.0)) // num_cpus_per_task)
    for name, amount in (resources_per_task or {}).items():
        if amount > 0:
            slots = min(slots, int(float(total.get(name, 0.0)) // amount))
    return max(1, slots)


def _record_ids(est: Estimator, records: list) -> list[int]:
    return [pid for pid, _ in records] if est.family == "permutation" else [r.sample_id for r in records]


class _Progress:
    """Running estimates on the driver (all samples and the two independent halves): what the stopping rule and
    the time budget look at."""

    def __init__(self, problem: RegressionProblem, est: Estimator, ctx: Context):
        self.problem, self.est, self.ctx = problem, est, ctx
        self.total, self.halves = Stats(est.name), [Stats(est.name), Stats(est.name)]
        self.rule = est.settings.stopping_rule()
        self.done: list[int] = []
        self.metric = float("nan")
        self.cpu_seconds = 0.0
        self.trace: list[tuple[float, int, float]] = []  # (CPU seconds, samples, split-half Spearman)

    def add(self, records: list, *, new: bool = True) -> None:
        n = self.problem.n
        self.total = self.total + self.est.stats(records, n, self.ctx)
        for h in (0, 1):
            part = [r for r, i in zip(records, _record_ids(self.est, records)) if self.est.half(i, self.ctx) == h]
            self.halves[h] = self.halves[h] + self.est.stats(part, n, self.ctx)
        if new:
            self.done += _record_ids(self.est, records)

    def stability(self) -> float:
        """Spearman between the values of the two independent halves (recorded against CPU seconds)."""
        n = self.problem.n
        rho = _spearman(*(self.est.values(h, n).values for h in self.halves))
        self.trace.append((self.cpu_seconds, len(self.done), rho))
        return rho

    def converged(self) -> str | None:
        c = self.est.settings.config
        n = self.problem.n
        values = self.est.values(self.total, n)
        rho = self.stability()
        if c.convergence != "spearman":
            reason = self.rule.check(values)
            self.metric = self.rule.last_metric
            return reason
        self.metric = rho
        if values.counts.size and int(values.counts.min()) >= c.min_permutations and rho >= c.convergence_target:
            return f"converged: split-half Spearman {rho:.4f} >= {c.convergence_target:g}"
        return None

    def trace_info(self, points: int = 50) -> list[list[float]]:
        """At most ``points`` (CPU seconds, new samples, split-half Spearman) triples, evenly spaced."""
        t = self.trace
        keep = range(len(t)) if len(t) <= points else sorted({round(k * (len(t) - 1) / (points - 1)) for k in range(points)})
        return [[float(t[k][0]), int(t[k][1]), float(t[k][2])] for k in keep]


def _stored_records(sink: MarginalsSink, est: Estimator, problem: RegressionProblem) -> tuple[list, set[int]]:
    """The stored records of the settings' seed (as tasks return them; permutations as (id, marginals) rows for
    the running estimates) and their ids."""
    c = est.settings.config
    if est.family == "permutation":
        seeds, ids, marg, trunc, _ = _stored_permutations(sink, problem.n)
        mine = seeds == c.seed
        from ..valuation.tmc import PermutationResult

        rows = [(int(i), PermutationResult(np.arange(problem.n), mm, int(t), float("nan"), float("nan")))
                for i, mm, t in zip(ids[mine], marg[mine], trunc[mine])]
        return rows, set(ids[mine].tolist())
    mine = {r.sample_id: r for sd, r in sink.samples(est.family, problem.n, None) if sd == c.seed}
    return [mine[k] for k in sorted(mine)], set(mine)


def run_valuation(problem: RegressionProblem, settings: ValuationSettings, sink: MarginalsSink, *,
                  progress: bool = True, on_batch: Callable[[list], None] | None = None) -> ValuationRun:
    """Run the samples ``settings`` asks for as Ray tasks (Ray must be initialised), streaming every finished
    batch to ``sink``; return the values of everything ``sink`` holds for ``shapley.seed``.

    ``shapley.n_permutations`` is the number of samples of the seed wanted in the sink: a rerun keeps the stored
    ones, runs only the missing ids, and recomputes the values from all of them, so no sample is ever counted
    twice. Samples of other seeds stay in the sink as independent replicates (reported, never mixed in).
    ``shapley.resume: false`` clears the sink first.

    Args:
        on_batch: extra hook called after each batch was kept (tests use it to interrupt a run).

    Raises:
        OutputError: the sink holds samples of other settings (see :meth:`MarginalsStore.open`).
        KernelError (or another FreeShapError) raised inside a task, unwrapped.
    """
    c = settings.config
    est = estimator_for(settings)
    extra = sink.open(settings.run_key(problem.digest(), problem.n, problem.m, problem.lam), resume=c.resume)
    v_full = float(np.mean(full_utility(problem, settings.utility)))
    v_empty = float(np.mean(empty_utility(problem, settings.utility)))
    stored, done_ids = _stored_records(sink, est, problem)
    ctx = est.context(problem, v_full, stored, extra)
    state = _Progress(problem, est, ctx)
    if stored:
        state.add(stored, new=False)
    t0 = time.perf_counter()
    fan = _FanOut(problem, est, sink, state, progress=progress, on_batch=on_batch)
    stop_reason = "budget"
    if est.name == "stratified" and len(ctx.plans) == 1:  # the pilot, then the allocation fitted to it
        pilot = est.pilot_size(ctx)
        stop_reason = fan.run(ctx, min(pilot, c.n_permutations) - len(done_ids & set(range(pilot))), done_ids,
                              t0, check=False)
        if stop_reason == "budget" and c.n_permutations > pilot:
            pilot_records = [r for r in _stored_records(sink, est, problem)[0] if r.sample_id < pilot]
            ctx = est.allocated(ctx, est.stats(pilot_records, problem.n, ctx), problem)
            state.ctx = fan.ctx = ctx
        sink.annotate({"plans": [[a, p.describe()] for a, p in ctx.plans], "tail_from": ctx.tail_from})
    elif est.name == "stratified":
        sink.annotate({"plans": [[a, p.describe()] for a, p in ctx.plans], "tail_from": ctx.tail_from})
    if stop_reason == "budget":
        held = len(_stored_records(sink, est, problem)[1])
        want = math.ceil(max(0, c.n_permutations - held) / est.unit) * est.unit
        stop_reason = fan.run(ctx, want, done_ids | set(state.done), t0)
    seconds = time.perf_counter() - t0
    result = aggregate(sink, problem.n, problem.m, est, ctx, sign_splits=c.sign_splits)
    n_new = len(state.done)
    result.info.update(
        utility=settings.utility.name, sampler=c.sampler, v_full=v_full, v_empty=v_empty,
        n_resumed=len(done_ids), n_new=n_new, stop_reason=stop_reason, seconds=seconds,
        task_nodes=fan.task_nodes, seconds_per_permutation=seconds / n_new if n_new else float("nan"),
        max_stderr=float(np.max(result.values.stderr)) if result.values.n else float("nan"),
        **result.sign.as_info(),
    )
    result.info["convergence_metric"] = state.metric
    result.info["cpu_seconds"] = state.cpu_seconds
    result.info["stability_trace"] = state.trace_info()
    if c.estimator != "tmc":
        result.info["estimator"] = c.estimator
    result.values.info.update(result.info)
    if result.per_test is not None:
        result.per_test.info.update(result.info)
    return ValuationRun(result.values, result.per_test, result.sign, result.info)


class _FanOut:
    """The one fan-out loop: submit lazily, keep each finished batch, stop on budget, time or convergence."""

    def __init__(self, problem: RegressionProblem, est: Estimator, sink: MarginalsSink, state: _Progress, *,
                 progress: bool, on_batch) -> None:
        c = est.settings.config
        self.problem, self.est, self.sink, self.state, self.ctx = problem, est, sink, state, state.ctx
        self.progress, self.on_batch = progress, on_batch
        self.resources = {k: float(v) for k, v in c.resources_per_task.items() if v}
        missing = [k for k in self.resources if k not in ray.cluster_resources()]
        if missing:
            log.warning("shapley.resources_per_task: no node of this cluster has %s yet; tasks wait until one joins",
                        missing)
        self.slots = cluster_slots(c.num_cpus_per_task, self.resources)
        self.task_nodes: dict[str, int] = {}
        self._ref = None

    def run(self, ctx: Context, n_todo: int, skip: set[int], t0: float, *, check: bool = True) -> str:
        """Run ``n_todo`` more ids (whole samples); returns the stop reason (``budget`` when all ran)."""
        c = self.est.settings.config
        if n_todo <= 0:
            return "budget"
        if check and self.state.total.inner is not None and (reason := self.state.converged()) is not None:
            return reason  # the stored samples already suffice
        unit = self.est.unit
        per_task = max(1, min(c.permutations_per_task, math.ceil(n_todo / self.slots)))
        chunks = _chunks(_todo_ids(n_todo, skip, unit), math.ceil(per_task / unit) * unit)
        if self._ref is None:
            self._ref = ray.put(self.problem)
        task = ray.remote(num_cpus=c.num_cpus_per_task, resources=self.resources or None,
                          scheduling_strategy=c.placement)(_batch_on_node)
        pending: list = []

        def submit() -> bool:
            ids = next(chunks, None)
            if ids is not None:
                pending.append(task.remote(self._ref, ids, self.est, ctx))
            return ids is not None

        while len(pending) < 2 * self.slots and submit():
            pass
        stop_reason = "budget"
        bar = tqdm(total=n_todo, desc="shapley samples", unit="sample", disable=not self.progress)
        try:
            while pending:
                left = None if c.max_seconds is None else max(0.0, c.max_seconds - (time.perf_counter() - t0))
                done, pending = ray.wait(pending, num_returns=1, timeout=left)
                if not done:
                    stop_reason = f"time budget: {c.max_seconds:g} s"
                    break
                try:
                    node, cpu, records = ray.get(done[0])
                except ray.exceptions.RayTaskError as err:
                    cause = getattr(err, "cause", None)
                    if isinstance(cause, FreeShapError):
                        raise cause from None
                    raise
                self.task_nodes[node] = self.task_nodes.get(node, 0) + 1
                self.state.cpu_seconds += cpu
                if self.est.family == "permutation":
                    self.sink.write(records, c.seed, c.sampler, c.per_test_point)
                else:
                    self.sink.write_samples(self.est.family, c.seed, records)
                if self.on_batch is not None:
                    self.on_batch(records)
                self.state.add(records)
                bar.update(len(records))
                if not check:
                    self.state.stability()
                elif (reason := self.state.converged()) is not None:
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
        return stop_reason
