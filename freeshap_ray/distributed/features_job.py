"""Projected features on Ray Data: one shard per call of an actor that holds the model, written by that actor.

``ray.data.from_items`` makes one row (one block) per missing shard — its split, rows and texts — and
``map_batches`` sends each, ``batch_size=1``, to a fixed pool of ``kernel.num_actors`` :class:`FeatureWriter`
actors (``kernel.num_cpus_per_actor`` / ``num_gpus_per_actor`` / ``resources_per_actor`` each; Ray Data spreads
them over the nodes, ``kernel.placement`` does not apply). A writer computes the shard's features with its
:class:`~freeshap_ray.kernel.worker.KernelWorker` and writes the shard to the store itself (a shared path or
an output URI: nothing goes through the driver), then returns one small status row (shard, rows, seconds,
node). The driver only counts the status rows (a progress bar with ETA) and, at the end, checks every
shard and writes the manifest.

Ray Data restarts a dead actor and retries its shards (``kernel.max_restarts``); if it gives up (an actor, worker
or node lost for good), the missing shards are run again, up to ``kernel.max_restarts`` times. An interrupted job
leaves only complete shards (each appears atomically), and a rerun computes only the missing ones.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from tqdm.auto import tqdm

from ..config import KernelConfig, ModelConfig
from ..errors import ConfigError, OutputError
from ..io import FeaturePlan, FeatureStore, ShardSpec
from ..kernel.worker import KernelWorker
from .kernel_job import KernelInputs

__all__ = ["FeatureWriter", "compute_features"]

log = logging.getLogger(__name__)

ACTOR_START_TIMEOUT_S = 900  # the whole pool must be up (model loaded) within this, else a ConfigError
TASKS_IN_FLIGHT = 2  # shards queued per actor: the next one is ready when the current one ends
# Losses that a rerun of the missing shards can repair (actor out of restarts, dead worker or node, lost object).
LOST = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
        ray.exceptions.ObjectLostError, ray.exceptions.LocalRayletDiedError)


class FeatureWriter:
    """A Ray Data callable class: loads the model once, then computes and writes one shard per call.

    Args:
        model_dir, model_cfg, cfg: as for :class:`~freeshap_ray.kernel.worker.KernelWorker` (whole selection).
        store: where the shards go.
        plan: the dataset's plan (checked into each shard's metadata).
    """

    def __init__(self, model_dir: str | Path, model_cfg: ModelConfig, cfg: KernelConfig, store: FeatureStore,
                 plan: FeaturePlan) -> None:
        self.worker = KernelWorker(model_dir, model_cfg, cfg)
        self.store, self.plan = store, plan
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        """One shard (a batch of one row: split, start, stop, texts, labels) → one status row (shard file name,
        rows, seconds, Ray node id and process id of this actor)."""
        if batch.num_rows != 1:
            raise RuntimeError(f"FeatureWriter: expected one shard per call, got {batch.num_rows}")
        row = batch.to_pylist()[0]
        spec = ShardSpec(row["split"], int(row["start"]), int(row["stop"]))
        t0 = time.perf_counter()
        feats = self.worker.features(list(row["texts"]))
        self.store.write_shard(self.plan, spec, row["labels"], feats)
        return {"shard": np.array([spec.name]), "rows": np.array([spec.rows]),
                "seconds": np.array([time.perf_counter() - t0]), "node": np.array([self.node]),
                "pid": np.array([os.getpid()])}


def _check(job: KernelInputs) -> None:
    cfg = job.kernel
    if cfg.projection_dim <= 0:
        raise ConfigError("kernel.projection_dim: the features dataset needs a projection (set it > 0)")
    if cfg.param_shards != 1:
        raise ConfigError(f"kernel.param_shards: every feature writer projects the whole selection; set it to 1 "
                          f"(got {cfg.param_shards})")


@contextlib.contextmanager
def _data_context() -> Iterator[None]:
    """Ray Data settings of this job (restored afterwards): no Ray Data progress bars (the driver shows its
    own), the original error of a failed shard, and a bounded wait for the whole actor pool."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    keys = ("enable_progress_bars", "raise_original_map_exception", "wait_for_min_actors_s")
    old = {k: getattr(ctx, k) for k in keys}
    ctx.enable_progress_bars, ctx.raise_original_map_exception, ctx.wait_for_min_actors_s = False, True, \
        ACTOR_START_TIMEOUT_S
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(ctx, k, v)


def _statuses(job: KernelInputs, store: FeatureStore, plan: FeaturePlan, todo: list[ShardSpec],
              texts: Mapping[str, Sequence[str]], labels: Mapping[str, Sequence[int]]) -> Iterator[dict[str, Any]]:
    """Run the Ray Data pipeline over the shards ``todo``; yield each shard's status row as it is written."""
    from ray.data import ActorPoolStrategy

    cfg = job.kernel
    items = [{"split": s.split, "start": s.start, "stop": s.stop, "texts": list(texts[s.split][s.start:s.stop]),
              "labels": [int(x) for x in labels[s.split][s.start:s.stop]]} for s in todo]
    with warnings.catch_warnings():
        # Ray 2.60 deprecates extra remote args (removal announced for 2.64); without max_restarts Ray Data
        # would restart a crashing actor (and retry its shard) without bound.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            FeatureWriter, fn_constructor_args=(str(job.model_dir), job.model, cfg, store, plan), batch_size=1,
            batch_format="pyarrow", num_cpus=cfg.num_cpus_per_actor, num_gpus=cfg.num_gpus_per_actor or None,
            compute=ActorPoolStrategy(size=min(cfg.num_actors, len(items)),
                                      max_tasks_in_flight_per_actor=TASKS_IN_FLIGHT),
            resources={k: v for k, v in cfg.resources_per_actor.items() if v} or None, max_restarts=cfg.max_restarts)
    try:
        yield from ds.iter_rows()
    except ray.exceptions.GetTimeoutError as err:
        raise ConfigError(f"kernel.num_actors: {cfg.num_actors} feature actors with {cfg.num_cpus_per_actor} CPU, "
                          f"{cfg.num_gpus_per_actor} GPU and {dict(cfg.resources_per_actor)} each did not start within "
                          f"{ACTOR_START_TIMEOUT_S} s (available: {ray.available_resources()})") from err


def compute_features(job: KernelInputs, store: FeatureStore, *, labels: Mapping[str, Sequence[int]],
                     overwrite: bool = False, progress: bool = True,
                     on_shard: Callable[[dict[str, Any], int], None] | None = None) -> dict[str, Any]:
    """Write the projected features of ``job``'s train and test texts to ``store``; only missing shards are computed.

    Args:
        job: texts, model and kernel settings (``kernel.projection_dim`` > 0, ``kernel.param_shards`` 1).
        store: the features directory (local shared path or URI).
        labels: ``{"train": (n,), "test": (m,)}`` integer labels, stored with the features.
        overwrite: discard whatever the directory holds and compute every shard (without it, features of
            another plan are an OutputError naming the file; :meth:`FeatureStore.check` tells before any work).
        progress: show a progress bar (rows, rate and ETA).
        on_shard: called on the driver with (status row, shards written so far) after each shard; tests use
            it to interrupt the job.

    Returns:
        Statistics (also in the manifest): ``shards_computed``, ``shards_skipped``, ``rows_computed``, ``seconds``
        (wall, and summed over shards), ``rows_per_second``, ``nodes`` (shards per Ray node id), ``reruns`` (passes
        repeated after a lost actor/worker/node), ``dim``.
    """
    _check(job)
    t0 = time.perf_counter()
    texts = {"train": job.train_texts, "test": job.test_texts}
    plan = FeaturePlan.build(texts, labels, job.model, job.kernel)
    finished = store.begin(plan, overwrite=overwrite)
    todo = store.missing_shards(plan)
    if finished and not todo:
        info = store.dataset_info()
        return {**info["stats"], "dim": info["dim"], "reused": True}
    skipped = len(plan.shards()) - len(todo)
    store.unfinish()
    rows = sum(s.rows for s in todo)
    nodes: dict[str, int] = {}
    busy, done, failures = 0.0, 0, 0
    t1 = time.perf_counter()
    with tqdm(total=rows, desc="features", unit="row", disable=not progress) as bar, _data_context():
        while todo:
            try:
                for status in _statuses(job, store, plan, todo, texts, labels):
                    done += 1
                    nodes[status["node"]] = nodes.get(status["node"], 0) + 1
                    busy += float(status["seconds"])
                    bar.update(int(status["rows"]))
                    if on_shard is not None:
                        on_shard(status, done)
            except LOST as err:  # Ray Data gave up on a shard: run the missing ones again
                failures += 1
                if failures > job.kernel.max_restarts:
                    raise
                log.warning("features: %s; rerunning the missing shards (%d of kernel.max_restarts=%d)",
                            type(err).__name__, failures, job.kernel.max_restarts)
                todo = store.missing_shards(plan)
                continue
            todo = store.missing_shards(plan)
            if todo:  # every call returned, yet the driver does not see the file
                raise OutputError(f"{store.where(todo[0].name)}: written by a feature actor but not visible here; a "
                                  "local output directory must be shared by every node (or use an output URI)")
    wall = time.perf_counter() - t1
    n_shards = len(plan.shards())
    stats = {"shards_computed": n_shards - skipped, "shards_skipped": skipped, "rows_computed": rows,
             "seconds": {"features": wall, "shard_sum": busy, "total": time.perf_counter() - t0},
             "rows_per_second": rows / max(wall, 1e-9), "nodes": nodes, "num_actors": job.kernel.num_actors,
             "reruns": failures}
    info = store.finish(plan, stats)
    return {**stats, "dim": info["dim"], "reused": False}
