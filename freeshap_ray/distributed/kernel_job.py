"""Kernel stage on Ray: actors own parameter shards, compute Jacobian blocks once, then partial tiles.

Schedule (per parameter shard s, served by the actors ``a`` with ``a % S == s``):

1. every example block that an unfinished tile needs gets its shard-s Jacobian computed ONCE, by one
   actor of the shard, and kept in the Ray object store (spilled to disk by Ray when large);
2. each tile's shard-s partial ``J_row J_colᵀ`` (float64) is computed by the actor that produced the
   row block's Jacobian, from two object references — so a row band's gradient work is shared by all
   of its tiles;
3. the driver (the reducer) sums the S partials of a tile and writes the tile to Parquet before
   counting it; a Jacobian reference is dropped once the last tile that needs it is reduced.

Restart and resume: finished tiles are files (written atomically), so a rerun with the same plan
skips them; actors have ``max_restarts``/``max_task_retries`` so a killed actor is replaced and its
unfinished calls are redone. Actors are placed with a placement group (PACK or SPREAD).

With ``kernel.backend: deepspeed`` the actors are the ranks of one ZeRO-3 group and each rank is its own
shard (see :mod:`freeshap_ray.distributed.zero3_group`); they are never restarted: a failed rank stops
the group and fails the job, and a rerun resumes from the finished tiles.
"""

from __future__ import annotations

import contextvars
import functools
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from tqdm.auto import tqdm

from ..config import KernelConfig, ModelConfig
from ..errors import ConfigError
from ..io import KernelStore
from ..kernel import Tile, blocks, tiles
from ..kernel.plan import plan_signature
from ..kernel.shards import partition_params
from ..kernel.worker import KernelWorker

__all__ = ["KernelInputs", "compute_kernel", "actor_nodes"]

log = logging.getLogger(__name__)

PLACEMENT_TIMEOUT_S = 120.0

#: Tile tasks queued per actor at a time (the rest are submitted as these finish).
MAX_TILES_IN_FLIGHT_PER_ACTOR = 8

# Actors and placement group of the kernel job running in this context, released if it fails.
_OWNED: contextvars.ContextVar[list | None] = contextvars.ContextVar("freeshap_ray_kernel_owned", default=None)


def _own(*resources) -> None:
    owned = _OWNED.get()
    if owned is not None:
        owned.extend(r for r in resources if r is not None)


def _release_on_error(fn):
    """A kernel job that raises (an actor out of restarts, a lost node without a replacement, Ctrl-C, a hook)
    kills its actors and removes its placement group, so a long-lived driver (notebook, API) does not keep
    their CPUs/GPUs reserved; a rerun resumes from the finished tiles."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        owned: list = []
        token = _OWNED.set(owned)
        try:
            return fn(*args, **kwargs)
        except BaseException:
            for r in reversed(owned):  # actors first, then their placement group
                try:
                    if isinstance(r, ray.actor.ActorHandle):
                        ray.kill(r, no_restart=True)
                    else:
                        remove_placement_group(r)
                except Exception as err:  # noqa: BLE001 - best effort; the original error matters
                    log.debug("releasing %r after a failed kernel job: %s", r, err)
            raise
        finally:
            _OWNED.reset(token)

    return wrapper


@dataclass(frozen=True)
class KernelInputs:
    """What a kernel job computes: the texts, the model and the selected parameters (model order)."""

    train_texts: list[str]
    test_texts: list[str]
    model_dir: Path
    model: ModelConfig
    kernel: KernelConfig
    param_names: list[str]
    param_sizes: list[int]

    @property
    def signature(self) -> str:
        return plan_signature(self.train_texts, self.test_texts, self.model, self.kernel)


def _placement(cfg: KernelConfig):
    if cfg.placement == "none":
        return None
    bundle = {"CPU": cfg.num_cpus_per_actor}
    if cfg.num_gpus_per_actor:
        bundle["GPU"] = cfg.num_gpus_per_actor
    bundle.update({k: v for k, v in cfg.resources_per_actor.items() if v})
    pg = placement_group([dict(bundle) for _ in range(cfg.num_actors)], strategy=cfg.placement)
    ready, _ = ray.wait([pg.ready()], timeout=PLACEMENT_TIMEOUT_S)
    if not ready:
        remove_placement_group(pg)
        raise ConfigError(
            f"kernel.num_actors: cannot place {cfg.num_actors} actors with {bundle} each "
            f"({cfg.placement}) on this cluster (available: {ray.available_resources()})"
        )
    return pg


def _node_of(_worker) -> str:
    return ray.get_runtime_context().get_node_id()


def actor_nodes(actors: list, timeout: float = 60.0) -> list[str | None]:
    """Ray node id each actor runs on now (after any restart); None for an actor that cannot answer."""
    refs = [a.__ray_call__.remote(_node_of) for a in actors]
    out: list[str | None] = []
    for ref in refs:
        try:
            out.append(ray.get(ref, timeout=timeout))
        except (ray.exceptions.RayError, TimeoutError):
            out.append(None)
    return out


def _make_actors(model_dir: Path, model_cfg: ModelConfig, cfg: KernelConfig, shards: list[list[str]], pg) -> list:
    if cfg.backend == "deepspeed":  # the actors are the ranks of one ZeRO-3 group, rank = actor index
        from .zero3_group import make_zero3_actors

        return make_zero3_actors(model_dir, model_cfg, cfg, pg)
    actor_cls = ray.remote(
        num_cpus=cfg.num_cpus_per_actor,
        num_gpus=cfg.num_gpus_per_actor,
        resources={k: v for k, v in cfg.resources_per_actor.items() if v} or None,
        max_restarts=cfg.max_restarts,
        max_task_retries=cfg.max_restarts,
    )(KernelWorker)
    actors = []
    for a in range(cfg.num_actors):
        opts = {}
        if pg is not None:
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=a)
        actors.append(actor_cls.options(**opts).remote(str(model_dir), model_cfg, cfg, param_names=shards[a % len(shards)]))
    return actors


@_release_on_error
def compute_kernel(job: KernelInputs, store: KernelStore, *, resume: bool = False, progress: bool = True,
                   on_tile: Callable[[list, int], None] | None = None) -> dict[str, Any]:
    """Compute train×train and test×train eNTK tiles with Ray actors; each tile goes to ``store`` as it is reduced.

    Args:
        resume: keep tiles already in ``store`` for this plan and compute only the others.
        on_tile: called on the driver after each tile is written, with (actors, tiles written so far);
            tests use it to kill an actor mid-run.

    Returns:
        The kernel's statistics (sizes, parameter count, tile list, timings, entries/s, actor nodes): what the
        caller records in the kernel manifest once the kernel is complete.
    """
    t0 = time.perf_counter()
    cfg = job.kernel
    zero3 = cfg.backend == "deepspeed"  # each ZeRO-3 rank is its own shard (its slice of every parameter)
    n_shards = cfg.num_actors if zero3 else cfg.param_shards
    shards = [list(job.param_names)] * n_shards if zero3 else partition_params(job.param_names, job.param_sizes,
                                                                               n_shards)
    bounds = {"train": blocks(len(job.train_texts), cfg.block_size), "test": blocks(len(job.test_texts), cfg.block_size)}
    plan = tiles(len(bounds["train"]), len(bounds["test"]))
    signature = job.signature
    store.begin({"signature": signature, "n_train": len(job.train_texts), "n_test": len(job.test_texts),
                 "block_size": cfg.block_size, "kind": cfg.kind}, resume=resume)
    todo = [t for t in plan if not store.has_tile(t.matrix, t.name)]
    pg = _placement(cfg) if todo else None
    _own(pg)
    actors = _make_actors(job.model_dir, job.model, cfg, shards, pg) if todo else []
    _own(*actors)
    t1 = time.perf_counter()
    _reduce_tiles(job, store, _Schedule(actors, pg, n_shards, bounds, todo, len(plan)), progress=progress,
                  on_tile=on_tile)
    elapsed = time.perf_counter() - t1
    nodes = actor_nodes(actors)
    for a in actors:
        ray.kill(a, no_restart=True)
    if pg is not None:
        remove_placement_group(pg)
    c = len(job.model.label_words)
    width = c * c if cfg.kind == "full" else 1
    rows = {"train_train": "train", "test_train": "test"}
    computed_entries = sum(_size(bounds[rows[t.matrix]][t.row]) * _size(bounds["train"][t.col]) * width for t in todo)
    return {
        "kind": cfg.kind,
        "n_train": len(job.train_texts),
        "n_test": len(job.test_texts),
        "n_classes": c,
        "n_params": int(sum(job.param_sizes)),
        "param_shards": [len(s) for s in shards],
        "block_size": cfg.block_size,
        "num_actors": cfg.num_actors,
        "placement": cfg.placement,
        "backend": cfg.backend,
        "actor_nodes": nodes,
        "signature": signature,
        "tiles": {
            "train_train": [t.name for t in plan if t.matrix == "train_train"],
            "test_train": [t.name for t in plan if t.matrix == "test_train"],
        },
        "tiles_computed": len(todo),
        "tiles_skipped": len(plan) - len(todo),
        "seconds": {"tiles": elapsed, "total": time.perf_counter() - t0},
        "entries_per_second": computed_entries / max(elapsed, 1e-9),
    }


def _size(bound: tuple[int, int]) -> int:
    return bound[1] - bound[0]


@dataclass(frozen=True)
class _Schedule:
    """Who computes what: the actors (and their placement group), S parameter shards, the example blocks of each
    split (``{"train": [(start, stop), ...], "test": ...}``), the tiles still to compute, and the plan's size."""

    actors: list
    pg: Any
    n_shards: int
    bounds: dict[str, list[tuple[int, int]]]
    todo: list[Tile]
    n_plan: int


def _reduce_tiles(job: KernelInputs, store: KernelStore, sched: _Schedule, *, progress: bool, on_tile) -> None:
    """Schedule each needed block's Jacobian once per shard and each tile's shard partials; sum and store tiles."""
    cfg, texts = job.kernel, {"train": job.train_texts, "test": job.test_texts}
    actors, pg, n_shards, bounds, todo, n_plan = (sched.actors, sched.pg, sched.n_shards, sched.bounds, sched.todo,
                                                  sched.n_plan)

    def row_key(t: Tile) -> tuple[str, int]:
        return ("train" if t.matrix == "train_train" else "test", t.row)

    group = [[a for a in range(len(actors)) if a % n_shards == s] for s in range(n_shards)]
    needed = sorted({row_key(t) for t in todo} | {("train", t.col) for t in todo})
    jac: dict[tuple[int, str, int], ray.ObjectRef] = {}
    owner: dict[tuple[int, str, int], int] = {}
    for s in range(n_shards):
        for i, (split, b) in enumerate(needed):
            a = group[s][i % len(group[s])]
            start, stop = bounds[split][b]
            owner[(s, split, b)] = a
            jac[(s, split, b)] = actors[a].jacobian.remote(list(texts[split][start:stop]))
    uses = {key: 0 for key in jac}
    for t in todo:
        for s in range(n_shards):
            uses[(s, *row_key(t))] += 1
            uses[(s, "train", t.col)] += 1
    # Tile tasks are submitted as earlier ones finish, at most MAX_TILES_IN_FLIGHT_PER_ACTOR per actor at a time:
    # the n²/block² tiles of a large n (~20,000 at n = 6,000) would otherwise all wait in Ray's queues at once.
    work = ((t, s) for t in todo for s in range(n_shards))
    pending: dict[ray.ObjectRef, Tile] = {}
    in_flight = MAX_TILES_IN_FLIGHT_PER_ACTOR * len(actors)

    def submit() -> None:
        """Top ``pending`` up to ``in_flight`` tasks from the work not yet submitted."""
        for t, s in itertools.islice(work, max(0, in_flight - len(pending))):
            rk, ck = (s, *row_key(t)), (s, "train", t.col)
            pending[actors[owner[rk]].tile.remote(jac[rk], jac[ck], cfg.chunk_params)] = t

    submit()
    partial: dict[Tile, tuple[np.ndarray, int]] = {}
    jac_waiting = {ref: key for key, ref in jac.items()}
    jac_bar = tqdm(total=len(jac_waiting), desc="jacobian blocks", unit="block", disable=not progress)
    bar = tqdm(total=n_plan, initial=n_plan - len(todo), desc="kernel tiles", unit="tile", disable=not progress)
    written = 0
    while pending:
        done, _ = ray.wait(list(pending) + list(jac_waiting), num_returns=1, fetch_local=False)
        if done[0] in jac_waiting:
            del jac_waiting[done[0]]
            jac_bar.update(1)
            continue
        t = pending.pop(done[0])
        submit()
        acc, count = partial.get(t, (None, 0))
        try:
            part = ray.get(done[0])
        except ray.exceptions.RayError as err:
            if cfg.backend != "deepspeed":
                raise
            from .zero3_group import stop_group

            raise stop_group(err, actors, pg) from err
        acc = part if acc is None else acc + part
        count += 1
        if count < n_shards:
            partial[t] = (acc, count)
            continue
        partial.pop(t, None)
        store.write_tile(t.matrix, t.name, bounds[row_key(t)[0]][t.row][0], bounds["train"][t.col][0], acc)
        written += 1
        for s in range(n_shards):
            for key in ((s, *row_key(t)), (s, "train", t.col)):
                uses[key] -= 1
                if uses[key] == 0:
                    del jac[key]  # frees the Jacobian block in the object store
        bar.update(1)
        if on_tile is not None:
            on_tile(actors, written)
    bar.close()
    jac_bar.close()
