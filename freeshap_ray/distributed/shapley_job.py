"""Shapley stage on Ray: permutations fanned out as tasks; the driver aggregates, streams and stops.

The regression problem (kernel, targets) is put in the object store once and every task reads it
from there. Permutation ``k`` depends only on ``(seed, k, sampler)`` whichever task runs it, so
results do not depend on batching or on the number of workers, and a resumed run can skip the ids it
already has. Tasks are submitted lazily, at most ``max_in_flight`` at a time (default: twice the
cluster's task slots), so a convergence criterion or the time budget stops the run without queuing
work that would be thrown away. Every finished batch is handed to ``on_batch`` (the streaming
sink) BEFORE the driver decides whether to stop, so nothing that was computed is lost.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import ray
from tqdm.auto import tqdm

from ..errors import FreeShapError, OutputError
from ..io.stores import MARGINALS_SCHEMA, MARGINALS_SCHEMA_VERSION, MarginalsStore
from ..utility import RegressionProblem, UtilitySpec
from ..valuation import (
    DEFAULT_BLOCK_SIZE,
    PermutationResult,
    StoppingRule,
    check_sampler,
    effective_tolerance,
    empty_utility,
    full_utility,
    permutations_per_sample,
    run_permutation,
    sampler_permutation,
    samples_from_marginals,
    sign_agreement,
    SignReport,
)
from ..utility.metrics import resolve_utility
from ..values import ValuesResult

__all__ = ["TMCRun", "run_tmc", "Batch", "StreamedRun", "run_resumable", "values_from_store", "run_settings"]

log = logging.getLogger(__name__)

#: One finished task: ``[(perm_id, PermutationResult), ...]`` in id order.
Batch = list[tuple[int, PermutationResult]]


@dataclass
class TMCRun:
    """Aggregated result of the permutations run by one call of :func:`run_tmc`.

    Attributes:
        values: overall values (n,) with stderr and counts (merged with ``initial`` if given).
        per_test: per-test-point values (n, m), or None.
        v_full: mean utility of the full training set; v_empty: of the empty set.
        perm_ids: (P,) ids of the permutations run in this call, sorted.
        truncated_at: (P,) points added before truncation, aligned with ``perm_ids``.
        seconds: wall time of the fan-out.
        stop_reason: ``budget`` (all requested permutations ran), ``time budget ...`` or ``converged: ...``.
    """

    values: ValuesResult
    per_test: ValuesResult | None
    v_full: float
    v_empty: float
    perm_ids: np.ndarray
    truncated_at: np.ndarray
    seconds: float
    stop_reason: str = "budget"
    info: dict = field(default_factory=dict)


def _batch(problem: RegressionProblem, perm_ids: list[int], seed: int, utility: UtilitySpec, sampler: str,
           tol: float, patience: int, v_full: float, per_test: bool, block_size: int, threads: int = 1) -> Batch:
    from threadpoolctl import threadpool_limits

    out = []
    with threadpool_limits(limits=max(1, threads)):  # BLAS threads = the CPUs this task reserved
        for pid in perm_ids:
            res = run_permutation(
                problem, sampler_permutation(problem.n, seed, pid, sampler), utility, truncation_tol=tol,
                truncation_patience=patience, v_full=v_full, per_test_point=per_test, block_size=block_size,
            )
            out.append((pid, res))
    return out


def _batch_on_node(*args) -> tuple[str, Batch]:
    """Ray task body: ``_batch`` plus the id of the node that ran it (recorded in the run info)."""
    return ray.get_runtime_context().get_node_id(), _batch(*args)


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
    while True:
        chunk = list(itertools.islice(ids, size))
        if not chunk:
            return
        yield chunk


def batch_values(batch: Batch, sampler: str, per_test_point: bool) -> tuple[ValuesResult, ValuesResult | None]:
    """Overall (and per-test) statistics of one batch of whole samples."""
    ids = np.array([pid for pid, _ in batch], dtype=np.int64)
    marg = np.stack([r.marginals for _, r in batch])  # (b, n) or (b, n, m)
    per_test = None
    if per_test_point:
        _, samples = samples_from_marginals(ids, marg, sampler)
        per_test = ValuesResult.from_marginals(samples)
        marg = marg.mean(axis=2)
    _, samples = samples_from_marginals(ids, marg, sampler)
    return ValuesResult.from_marginals(samples), per_test


def cluster_slots(num_cpus_per_task: float, resources_per_task: dict[str, float] | None = None) -> int:
    """How many tasks of ``num_cpus_per_task`` CPUs (and ``resources_per_task``) the current Ray cluster runs
    at once (>= 1)."""
    total = ray.cluster_resources()
    cpus = float(total.get("CPU", 1.0))
    slots = int(cpus // num_cpus_per_task) if num_cpus_per_task > 0 else int(cpus)
    for name, amount in (resources_per_task or {}).items():
        if amount > 0:
            slots = min(slots, int(float(total.get(name, 0.0)) // amount))
    return max(1, slots)


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
    on_batch: Callable[[Batch], None] | None = None,
    progress: bool = True,
    sampler: str = "tmc",
    max_seconds: float | None = None,
    stopping: StoppingRule | None = None,
    skip_ids: Iterable[int] = (),
    initial: tuple[ValuesResult, ValuesResult | None] | None = None,
    max_in_flight: int | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    resources_per_task: dict[str, float] | None = None,
    placement: str = "DEFAULT",
) -> TMCRun:
    """Run up to ``n_permutations`` permutations as Ray tasks (Ray must be initialised).

    Args:
        problem: the kernel-regression problem.
        n_permutations: permutations to run in this call (rounded up to whole antithetic pairs).
        sampler: ``tmc``, ``permutation`` (never truncated) or ``antithetic`` (see ``valuation.samplers``).
        on_batch: called on the driver with each finished batch (streaming sink), before stopping is decided.
        max_seconds: time budget of this call; pending tasks are cancelled when it runs out.
        stopping: convergence criterion checked after each batch (on the merged running estimates).
        skip_ids: permutation ids already done (e.g. read back from disk); never run again.
        initial: running estimates of those ids, merged in before the first check.
        max_in_flight: tasks submitted at once (default: 2 x the cluster's task slots).
        block_size: points per level-3 incremental update.
        resources_per_task: custom Ray resources each task reserves.
        placement: ``DEFAULT`` (Ray's scheduler) or ``SPREAD`` (tasks spread over the nodes).

    Returns:
        A :class:`TMCRun` with Welford-merged values.

    Raises:
        KernelError (or another FreeShapError) raised inside a task, unwrapped.
    """
    check_sampler(sampler)
    if n_permutations < 0:
        raise ValueError(f"n_permutations: must be >= 0, got {n_permutations}")
    if permutations_per_task < 1:
        raise ValueError(f"permutations_per_task: must be >= 1, got {permutations_per_task}")
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds: must be > 0, got {max_seconds}")
    t0 = time.perf_counter()
    unit = permutations_per_sample(sampler)
    tol = effective_tolerance(sampler, truncation_tol)
    v_full = float(np.mean(full_utility(problem, utility)))
    v_empty = float(np.mean(empty_utility(problem, utility)))
    n_todo = math.ceil(n_permutations / unit) * unit
    todo = _todo_ids(n_todo, set(int(i) for i in skip_ids), unit)
    if placement not in ("DEFAULT", "SPREAD"):
        raise ValueError(f"placement: must be 'DEFAULT' or 'SPREAD', got {placement!r}")
    resources = {k: float(v) for k, v in (resources_per_task or {}).items() if v}
    missing = [k for k in resources if k not in ray.cluster_resources()]
    if missing:
        log.warning("resources_per_task: no node of this cluster has %s yet; tasks wait until one joins", missing)
    slots = cluster_slots(num_cpus_per_task, resources)
    per_task = max(1, min(permutations_per_task, math.ceil(n_todo / slots))) if n_todo else 1
    per_task = math.ceil(per_task / unit) * unit
    in_flight = max_in_flight or 2 * slots
    chunks = _chunks(todo, per_task)

    overall = ValuesResult.empty(problem.n)
    per_test = ValuesResult.empty(problem.n, problem.m) if per_test_point else None
    if initial is not None:
        overall = overall + initial[0]
        if per_test is not None and initial[1] is not None:
            per_test = per_test + initial[1]
    done_ids: list[int] = []
    truncated: list[int] = []
    stop_reason = "budget"
    problem_ref = ray.put(problem) if n_todo else None
    task = ray.remote(num_cpus=num_cpus_per_task, resources=resources or None,
                      scheduling_strategy=placement)(_batch_on_node)
    task_nodes: dict[str, int] = {}

    def submit() -> bool:
        ids = next(chunks, None)
        if ids is None:
            return False
        pending.append(task.remote(problem_ref, ids, seed, utility, sampler, tol, truncation_patience, v_full,
                                   per_test_point, block_size, int(num_cpus_per_task)))
        return True

    pending: list = []
    if stopping is not None and initial is not None:
        reason = stopping.check(overall)
        if reason is not None:
            stop_reason, chunks = reason, iter(())
    while len(pending) < in_flight and submit():
        pass
    bar = tqdm(total=n_todo, desc="shapley permutations", unit="perm", disable=not progress)
    try:
        while pending:
            timeout = None
            if max_seconds is not None:
                timeout = max(0.0, max_seconds - (time.perf_counter() - t0))
            done, pending = ray.wait(pending, num_returns=1, timeout=timeout)
            if not done:
                stop_reason = f"time budget: {max_seconds:g} s"
                break
            try:
                node, batch = ray.get(done[0])
            except ray.exceptions.RayTaskError as err:
                cause = getattr(err, "cause", None)
                if isinstance(cause, FreeShapError):
                    raise cause from None
                raise
            task_nodes[node] = task_nodes.get(node, 0) + 1
            if on_batch is not None:
                on_batch(batch)
            b_overall, b_per_test = batch_values(batch, sampler, per_test_point)
            overall = overall + b_overall
            if per_test is not None and b_per_test is not None:
                per_test = per_test + b_per_test
            for pid, r in batch:
                done_ids.append(pid)
                truncated.append(r.truncated_at)
            bar.update(len(batch))
            reason = stopping.check(overall) if stopping is not None else None
            if reason is not None:
                stop_reason = reason
                break
            if max_seconds is not None and time.perf_counter() - t0 >= max_seconds:
                stop_reason = f"time budget: {max_seconds:g} s"
                break
            submit()
    finally:
        for ref in pending:
            ray.cancel(ref)
        bar.close()
    order = np.argsort(np.array(done_ids, dtype=np.int64), kind="stable")
    perm_ids = np.array(done_ids, dtype=np.int64)[order]
    truncated_at = np.array(truncated, dtype=np.int64)[order]
    overall.info.update(n_permutations=int(perm_ids.size),
                        mean_truncated_at=float(truncated_at.mean()) if truncated_at.size else float("nan"))
    return TMCRun(overall, per_test, v_full, v_empty, perm_ids, truncated_at, time.perf_counter() - t0,
                  stop_reason, {"permutations_per_task": per_task, "max_in_flight": in_flight, "slots": slots,
                                "task_nodes": task_nodes})


# --------------------------------------------------------------------------------------------------
# Resumable, streamed runs


def run_settings(problem: RegressionProblem, *, utility: UtilitySpec, sampler: str, truncation_tol: float,
                 truncation_patience: int, per_test_point: bool) -> dict:
    """What a stream of marginals is marginals OF; a resumed run must match it exactly (seeds may differ)."""
    return {
        "marginals_schema": MARGINALS_SCHEMA_VERSION,
        "problem": problem.digest(),
        "n": problem.n,
        "m": problem.m,
        "lam": problem.lam,
        "utility": resolve_utility(utility).name,
        "sampler": sampler,
        "truncation_tol": effective_tolerance(sampler, truncation_tol),
        "truncation_patience": int(truncation_patience),
        "per_test_point": bool(per_test_point),
    }


@dataclass
class StreamedRun:
    """Values recomputed from every stored permutation, plus what this call did.

    Attributes:
        values: overall values (n,).
        per_test: per-test values (n, m) or None.
        sign: sign robustness across independent halves of the samples.
        info: manifest-ready summary (counts, timings, stop reason, v(N), v(empty), sign agreement).
    """

    values: ValuesResult
    per_test: ValuesResult | None
    sign: SignReport
    info: dict


def _list_array(rows: list[np.ndarray], dtype) -> pa.Array:
    """Arrow ``list<dtype>`` array from numpy rows without going through Python lists."""
    lengths = np.array([r.size for r in rows], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32 if lengths.sum() < 2**31 else np.int64)
    values = np.concatenate([np.asarray(r, dtype=dtype).ravel() for r in rows]) if rows else np.zeros(0, dtype)
    if offsets.dtype == np.int64:
        return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values)).cast(
            pa.list_(pa.from_numpy_dtype(np.dtype(dtype))))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def batch_table(batch: Batch, seed: int, sampler: str, per_test_point: bool) -> pa.Table:
    """One batch as a ``MARGINALS_SCHEMA`` table (per-test marginals only for the first ``truncated_at`` positions)."""
    perms = [r.permutation for _, r in batch]
    means = [(r.marginals.mean(axis=1) if r.marginals.ndim == 2 else r.marginals)[r.permutation] for _, r in batch]
    cols = {
        "perm_id": pa.array([int(pid) for pid, _ in batch], pa.int64()),
        "seed": pa.array([int(seed)] * len(batch), pa.int64()),
        "sampler": pa.array([sampler] * len(batch), pa.string()),
        "order": _list_array(perms, np.int64),
        "marginals": _list_array(means, np.float64),
        "truncated_at": pa.array([int(r.truncated_at) for _, r in batch], pa.int64()),
        "v_full": pa.array([float(r.v_full) for _, r in batch], pa.float64()),
    }
    if per_test_point:
        cols["marginals_per_test"] = _list_array(
            [r.marginals[r.permutation[: r.truncated_at]] for _, r in batch], np.float64)
    else:
        cols["marginals_per_test"] = pa.nulls(len(batch), pa.list_(pa.float64()))
    return pa.table(cols, schema=MARGINALS_SCHEMA)


def _scatter(orders: np.ndarray, by_position: np.ndarray) -> np.ndarray:
    """``out[r, orders[r, k]] = by_position[r, k]`` (position order -> point order)."""
    out = np.zeros_like(by_position)
    rows = np.arange(orders.shape[0])[:, None]
    out[rows, orders] = by_position
    return out


def _samples_by_seed(seeds: np.ndarray, ids: np.ndarray, marg: np.ndarray, sampler: str):
    """Independent samples, grouped by seed then sorted by sample id."""
    out = []
    for sd in np.unique(seeds):
        sel = seeds == sd
        out.append(samples_from_marginals(ids[sel], marg[sel], sampler)[1])
    if not out:
        return marg[:0]
    return np.concatenate(out, axis=0)


def values_from_store(store: MarginalsStore, n: int, m: int, sampler: str, per_test_point: bool,
                      sign_splits: int = 100, sign_seed: int = 0) -> tuple[ValuesResult, ValuesResult | None,
                                                                             SignReport, dict]:
    """Values from every stored permutation (each ``(seed, perm_id)`` counted once).

    Overall values are computed in one pass over all samples in (seed, id) order, so they are
    bitwise independent of how the permutations were batched, interrupted or resumed.
    """
    table = store.read(["perm_id", "seed", "order", "marginals", "truncated_at"])
    ids = table.column("perm_id").to_numpy().astype(np.int64)
    seeds = table.column("seed").to_numpy().astype(np.int64)
    key = np.stack([seeds, ids], axis=1) if ids.size else np.zeros((0, 2), dtype=np.int64)
    _, first = np.unique(key, axis=0, return_index=True)
    duplicates = ids.size - first.size
    if duplicates:
        log.warning("%s: %d duplicate permutation rows ignored", store.parts_dir, duplicates)
    keep = np.sort(first)
    if ids.size:
        orders = np.asarray(table.column("order").combine_chunks().flatten().to_numpy(), dtype=np.int64)
        margs = np.asarray(table.column("marginals").combine_chunks().flatten().to_numpy(), dtype=np.float64)
        orders, margs = orders.reshape(len(ids), n)[keep], margs.reshape(len(ids), n)[keep]
    else:
        orders, margs = np.zeros((0, n), dtype=np.int64), np.zeros((0, n))
    ids, seeds = ids[keep], seeds[keep]
    truncated = table.column("truncated_at").to_numpy()[keep] if ids.size else np.zeros(0, dtype=np.int64)
    samples = _samples_by_seed(seeds, ids, _scatter(orders, margs), sampler)
    overall = ValuesResult.from_marginals(samples) if samples.shape[0] else ValuesResult.empty(n)
    sign = sign_agreement(samples, n_splits=sign_splits, seed=sign_seed)
    per_test = None
    if per_test_point:
        per_test = ValuesResult.empty(n, m)
        seen: set[tuple[int, int]] = set()
        for part in store.iter_parts(["perm_id", "seed", "order", "truncated_at", "marginals_per_test"]):
            p_ids = part.column("perm_id").to_numpy().astype(np.int64)
            p_seeds = part.column("seed").to_numpy().astype(np.int64)
            p_orders = np.asarray(part.column("order").combine_chunks().flatten().to_numpy(),
                                  dtype=np.int64).reshape(len(p_ids), n)
            p_trunc = part.column("truncated_at").to_numpy()
            p_marg = part.column("marginals_per_test").combine_chunks()
            rows, arrs = [], []
            for r in range(len(p_ids)):
                k = (int(p_seeds[r]), int(p_ids[r]))
                if k in seen:
                    continue
                cell = p_marg[r]
                if not cell.is_valid:
                    raise OutputError(f"{store.parts_dir}: permutation {k[1]} has no per-test marginals")
                seen.add(k)
                full = np.zeros((n, m))
                t = int(p_trunc[r])
                full[p_orders[r, :t]] = np.asarray(cell.values.to_numpy(zero_copy_only=False)).reshape(t, m)
                rows.append(r)
                arrs.append(full)
            if rows:
                sel = np.array(rows)
                part_samples = _samples_by_seed(p_seeds[sel], p_ids[sel], np.stack(arrs), sampler)
                if part_samples.shape[0]:
                    per_test = per_test + ValuesResult.from_marginals(part_samples)
    info = {
        "n_permutations": int(ids.size),
        "n_samples": int(samples.shape[0]),
        "seeds": sorted(int(x) for x in np.unique(seeds)),
        "mean_truncated_at": float(np.mean(truncated)) if ids.size else float("nan"),
        "duplicate_rows_ignored": int(duplicates),
    }
    return overall, per_test, sign, info


def run_resumable(
    problem: RegressionProblem,
    store: MarginalsStore,
    *,
    utility: UtilitySpec = "accuracy",
    sampler: str = "tmc",
    n_permutations: int = 200,
    truncation_tol: float = 0.05,
    truncation_patience: int = 2,
    seed: int = 0,
    per_test_point: bool = False,
    permutations_per_task: int = 8,
    num_cpus_per_task: float = 1.0,
    max_seconds: float | None = None,
    stopping: StoppingRule | None = None,
    resume: bool = True,
    discard_mismatched: bool = False,
    sign_splits: int = 100,
    progress: bool = True,
    on_batch: Callable[[Batch], None] | None = None,
    resources_per_task: dict[str, float] | None = None,
    placement: str = "DEFAULT",
) -> StreamedRun:
    """Run permutations with every finished batch streamed to ``store``; resume what is there.

    ``n_permutations`` is the TOTAL wanted in the store: a rerun reads the stored permutations
    (whatever seed they used), runs only the missing ones with new ids (``seed``'s smallest unused
    ids), and recomputes the values from all of them, so no permutation is ever counted twice.

    Args:
        resume: reuse stored permutations; False clears the store first.
        discard_mismatched: when the stored run's settings differ, clear instead of raising.
        on_batch: extra hook called after each batch was written (e.g. for tests).

    Raises:
        OutputError: stored marginals were made with different settings (and not ``discard_mismatched``).
    """
    check_sampler(sampler)
    expected = run_settings(problem, utility=utility, sampler=sampler, truncation_tol=truncation_tol,
                            truncation_patience=truncation_patience, per_test_point=per_test_point)
    if not resume:
        store.clear()
    stored = store.read_run()
    if stored is None and store.parts():
        if not discard_mismatched:
            raise OutputError(f"{store.parts_dir}: marginals without {store.run_file.name} (an older or foreign run) "
                              f"cannot be checked; pass --overwrite (or set shapley.resume=false) to discard them")
        store.clear()
    if stored is not None and stored != expected:
        if store.parts() and not discard_mismatched:
            diff = [k for k in [*expected, *stored] if stored.get(k) != expected.get(k)][0]
            raise OutputError(
                f"{store.run_file}: the stored marginals were computed with {diff}={stored.get(diff)!r}, this run "
                f"has {diff}={expected.get(diff)!r}; pass --overwrite (or set shapley.resume=false) to discard them")
        log.warning("%s: discarding stored marginals made with different settings", store.dir)
        store.clear()
    store.write_run(expected)
    existing = store.read(["perm_id", "seed"])
    ex_ids = existing.column("perm_id").to_numpy().astype(np.int64)
    ex_seeds = existing.column("seed").to_numpy().astype(np.int64)
    n_existing = len({(int(a), int(b)) for a, b in zip(ex_seeds, ex_ids)})
    done_this_seed = set(ex_ids[ex_seeds == seed].tolist())
    initial = None
    if n_existing:
        init_overall, init_pt, _, _ = values_from_store(store, problem.n, problem.m, sampler, per_test_point,
                                                        sign_splits=1)
        initial = (init_overall, init_pt)
    unit = permutations_per_sample(sampler)
    remaining = max(0, n_permutations - n_existing)
    remaining = math.ceil(remaining / unit) * unit

    def sink(batch: Batch) -> None:
        store.write_part(batch_table(batch, seed, sampler, per_test_point))
        if on_batch is not None:
            on_batch(batch)

    run = run_tmc(
        problem, utility=utility, n_permutations=remaining, truncation_tol=truncation_tol,
        truncation_patience=truncation_patience, seed=seed, per_test_point=per_test_point,
        permutations_per_task=permutations_per_task, num_cpus_per_task=num_cpus_per_task, on_batch=sink,
        progress=progress, sampler=sampler, max_seconds=max_seconds, stopping=stopping,
        skip_ids=done_this_seed, initial=initial, resources_per_task=resources_per_task, placement=placement,
    )
    overall, per_test, sign, info = values_from_store(store, problem.n, problem.m, sampler, per_test_point,
                                                      sign_splits=sign_splits, sign_seed=seed)
    info.update(
        utility=expected["utility"], sampler=sampler, v_full=run.v_full, v_empty=run.v_empty,
        n_resumed=int(n_existing), n_new=int(run.perm_ids.size), stop_reason=run.stop_reason,
        seconds=run.seconds, task_nodes=run.info["task_nodes"],
        seconds_per_permutation=run.seconds / run.perm_ids.size if run.perm_ids.size else float("nan"),
        max_stderr=float(np.max(overall.stderr)) if overall.n else float("nan"),
        **sign.as_info(),
    )
    if stopping is not None:
        info["convergence_metric"] = stopping.last_metric
    overall.info.update(info)
    if per_test is not None:
        per_test.info.update(info)
    return StreamedRun(overall, per_test, sign, info)
