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
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from tqdm.auto import tqdm

from ..config import KernelConfig, ModelConfig, config_to_dict
from ..errors import ConfigError, OutputError
from ..io import Layout, write_json_atomic, write_kernel_manifest, write_kernel_tile
from ..kernel import Tile, blocks, tiles
from ..kernel.shards import partition_params
from ..kernel.worker import KernelWorker

__all__ = ["KernelJobResult", "compute_kernel", "plan_signature", "check_resumable", "actor_nodes"]

log = logging.getLogger(__name__)

PLACEMENT_TIMEOUT_S = 120.0

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


@dataclass
class KernelJobResult:
    """What the kernel stage did (also written to ``kernel/manifest.json``)."""

    info: dict = field(default_factory=dict)


def plan_signature(train_texts, test_texts, model_cfg: ModelConfig, cfg: KernelConfig) -> str:
    """Hash of everything that determines the tiles' contents and layout (not resources)."""
    h = hashlib.sha256()
    h.update(json.dumps(config_to_dict(model_cfg), sort_keys=True).encode())
    h.update(json.dumps({"kind": cfg.kind, "block_size": cfg.block_size}).encode())
    if cfg.projection_dim:  # projected and exact tiles never mix (exact plans keep their old signature)
        h.update(json.dumps({"projection_dim": cfg.projection_dim, "projection_seed": cfg.projection_seed}).encode())
    for split in (train_texts, test_texts):
        h.update(str(len(split)).encode())
        for t in split:
            h.update(t.encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()


def check_resumable(layout: Layout, signature: str, overwrite: bool) -> bool:
    """Whether tiles already under ``layout`` belong to this plan (resume) or must be discarded.

    Raises:
        OutputError: an unfinished kernel of a different plan is there and ``overwrite`` is off.
    """
    if not layout.kernel_plan.is_file():
        return False
    try:
        old = json.loads(layout.kernel_plan.read_text()).get("signature")
    except (OSError, ValueError, AttributeError) as err:
        raise OutputError(f"output: {layout.kernel_plan} is unreadable ({err}); pass --overwrite to discard the "
                          "unfinished kernel") from err
    if old == signature:
        return not overwrite
    if not overwrite:
        raise OutputError(
            f"output: {layout.kernel_dir} holds an unfinished kernel of a different config/data; "
            "pass --overwrite to discard it"
        )
    return False


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
    threads = max(1, int(round(cfg.num_cpus_per_actor)))
    device = "cuda" if cfg.num_gpus_per_actor > 0 else "cpu"
    actors = []
    for a in range(cfg.num_actors):
        opts = {}
        if pg is not None:
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=a)
        actors.append(
            actor_cls.options(**opts).remote(
                str(model_dir), model_cfg, cfg.kind, param_names=shards[a % len(shards)], threads=threads, device=device,
                method=cfg.method, precision=cfg.precision, feature_memory_gb=cfg.feature_memory_gb,
                micro_batch_tokens=cfg.micro_batch_tokens, projection_dim=cfg.projection_dim,
                projection_seed=cfg.projection_seed,
            )
        )
    return actors


@_release_on_error
def compute_kernel(
    train_texts: list[str],
    test_texts: list[str],
    model_dir: Path,
    model_cfg: ModelConfig,
    cfg: KernelConfig,
    layout: Layout,
    *,
    param_names: list[str],
    param_sizes: list[int],
    resume: bool = False,
    progress: bool = True,
    on_tile: Callable[[list, int], None] | None = None,
) -> KernelJobResult:
    """Compute train×train and test×train eNTK tiles with Ray actors and write them under ``layout``.

    Args:
        param_names, param_sizes: the selected parameters (model order) and their sizes.
        resume: keep tiles already written for this plan and compute only the others.
        on_tile: called on the driver after each tile is written, with (actors, tiles written so far);
            tests use it to kill an actor mid-run.

    The kernel manifest is written last, so a kernel directory without it is incomplete.
    """
    t0 = time.perf_counter()
    zero3 = cfg.backend == "deepspeed"  # each ZeRO-3 rank is its own shard (its slice of every parameter)
    n_shards = cfg.num_actors if zero3 else cfg.param_shards
    if n_shards > cfg.num_actors:
        raise ConfigError(f"kernel.param_shards: {n_shards} shards need at least as many actors (kernel.num_actors)")
    shards = [list(param_names)] * n_shards if zero3 else partition_params(param_names, param_sizes, n_shards)
    train_blocks = blocks(len(train_texts), cfg.block_size)
    test_blocks = blocks(len(test_texts), cfg.block_size)
    plan = tiles(len(train_blocks), len(test_blocks))
    signature = plan_signature(train_texts, test_texts, model_cfg, cfg)
    if not resume:
        for p in (layout.kernel_dir / "train_train", layout.kernel_dir / "test_train"):
            for f in p.glob("*.parquet") if p.is_dir() else ():
                f.unlink()
    write_json_atomic({"signature": signature, "n_train": len(train_texts), "n_test": len(test_texts),
                       "block_size": cfg.block_size, "kind": cfg.kind}, layout.kernel_plan)
    todo = [t for t in plan if not layout.kernel_tile(t.matrix, t.name).is_file()]
    skipped = len(plan) - len(todo)

    def row_key(t: Tile) -> tuple[str, int]:
        return ("train" if t.matrix == "train_train" else "test", t.row)

    pg = _placement(cfg) if todo else None
    _own(pg)
    actors = _make_actors(model_dir, model_cfg, cfg, shards, pg) if todo else []
    _own(*actors)
    group = [[a for a in range(len(actors)) if a % n_shards == s] for s in range(n_shards)]
    texts = {"train": train_texts, "test": test_texts}
    bounds = {"train": train_blocks, "test": test_blocks}
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
    pending: dict[ray.ObjectRef, Tile] = {}
    for t in todo:
        for s in range(n_shards):
            rk, ck = (s, *row_key(t)), (s, "train", t.col)
            uses[rk] += 1
            uses[ck] += 1
            pending[actors[owner[rk]].tile.remote(jac[rk], jac[ck], cfg.chunk_params)] = t

    partial: dict[Tile, tuple[np.ndarray, int]] = {}
    jac_waiting = {ref: key for key, ref in jac.items()}
    jac_bar = tqdm(total=len(jac_waiting), desc="jacobian blocks", unit="block", disable=not progress)
    bar = tqdm(total=len(plan), initial=skipped, desc="kernel tiles", unit="tile", disable=not progress)
    t1 = time.perf_counter()
    written = 0
    while pending:
        done, _ = ray.wait(list(pending) + list(jac_waiting), num_returns=1, fetch_local=False)
        if done[0] in jac_waiting:
            del jac_waiting[done[0]]
            jac_bar.update(1)
            continue
        t = pending.pop(done[0])
        acc, count = partial.get(t, (None, 0))
        try:
            part = ray.get(done[0])
        except ray.exceptions.RayError as err:
            if not zero3:
                raise
            from .zero3_group import stop_group

            raise stop_group(err, actors, pg) from err
        acc = part if acc is None else acc + part
        count += 1
        if count < n_shards:
            partial[t] = (acc, count)
            continue
        partial.pop(t, None)
        r0 = bounds[row_key(t)[0]][t.row][0]
        write_kernel_tile(layout, t.matrix, t.name, r0, train_blocks[t.col][0], acc)
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
    elapsed = time.perf_counter() - t1
    nodes = actor_nodes(actors)
    for a in actors:
        ray.kill(a, no_restart=True)
    if pg is not None:
        remove_placement_group(pg)

    n, m = len(train_texts), len(test_texts)
    c = _n_classes(model_cfg)
    width = c * c if cfg.kind == "full" else 1
    computed_entries = sum(
        (bounds[row_key(t)[0]][t.row][1] - bounds[row_key(t)[0]][t.row][0])
        * (train_blocks[t.col][1] - train_blocks[t.col][0]) * width
        for t in todo
    )
    info: dict[str, Any] = {
        "kind": cfg.kind,
        "n_train": n,
        "n_test": m,
        "n_classes": c,
        "n_params": int(sum(param_sizes)),
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
        "tiles_skipped": skipped,
        "seconds": {"tiles": elapsed, "total": time.perf_counter() - t0},
        "entries_per_second": computed_entries / max(elapsed, 1e-9),
    }
    write_kernel_manifest(layout, info)
    return KernelJobResult(info=info)


def _n_classes(model_cfg: ModelConfig) -> int:
    return len(model_cfg.label_words)
