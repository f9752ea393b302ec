"""Kernel stage on Ray: actors hold the model, compute Jacobian blocks once, then the float64 tiles.

Schedule: every example block's Jacobian is computed once by one actor and kept in the object store
(spilled to disk by Ray when large); each tile is computed by the actor that produced its row block from
two object references, and written to Parquet as soon as it arrives. A Jacobian reference is dropped as
soon as the last tile needing it is done.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
from tqdm.auto import tqdm

from ..config import KernelConfig, ModelConfig
from ..io import Layout, write_kernel_manifest, write_kernel_tile
from ..kernel import Tile, blocks, condition_number, tiles
from ..kernel.worker import KernelWorker

__all__ = ["KernelJobResult", "compute_kernel"]

log = logging.getLogger(__name__)


@dataclass
class KernelJobResult:
    """What the kernel stage did (also written to ``kernel/manifest.json``)."""

    info: dict = field(default_factory=dict)


def _make_actors(model_dir: Path, model_cfg: ModelConfig, cfg: KernelConfig) -> list:
    use_gpu = cfg.num_gpus_per_actor > 0
    actor_cls = ray.remote(num_cpus=cfg.num_cpus_per_actor, num_gpus=cfg.num_gpus_per_actor)(KernelWorker)
    threads = max(1, int(round(cfg.num_cpus_per_actor)))
    return [
        actor_cls.remote(str(model_dir), model_cfg, cfg.kind, threads=threads, device="cuda" if use_gpu else "cpu")
        for _ in range(cfg.num_actors)
    ]


def compute_kernel(
    train_texts: list[str],
    test_texts: list[str],
    model_dir: Path,
    model_cfg: ModelConfig,
    cfg: KernelConfig,
    layout: Layout,
    *,
    progress: bool = True,
) -> KernelJobResult:
    """Compute train×train and test×train eNTK tiles with Ray actors and write them under ``layout``.

    The kernel manifest is written last, so a kernel directory without it is incomplete.
    """
    t0 = time.perf_counter()
    actors = _make_actors(model_dir, model_cfg, cfg)
    info = ray.get(actors[0].info.remote())
    t_load = time.perf_counter() - t0

    train_blocks = blocks(len(train_texts), cfg.block_size)
    test_blocks = blocks(len(test_texts), cfg.block_size)
    jac: dict[tuple[str, int], ray.ObjectRef] = {}
    owner: dict[tuple[str, int], int] = {}
    k = 0
    for split, texts, bl in (("train", train_texts, train_blocks), ("test", test_texts, test_blocks)):
        for b, (s, e) in enumerate(bl):
            owner[(split, b)] = k % len(actors)
            jac[(split, b)] = actors[owner[(split, b)]].jacobian.remote(list(texts[s:e]))
            k += 1

    plan = tiles(len(train_blocks), len(test_blocks))
    uses: dict[tuple[str, int], int] = {key: 0 for key in jac}
    for t in plan:
        uses[("train" if t.matrix == "train_train" else "test", t.row)] += 1
        uses[("train", t.col)] += 1
    pending: dict[ray.ObjectRef, Tile] = {}
    for t in plan:
        row_key = ("train" if t.matrix == "train_train" else "test", t.row)
        ref = actors[owner[row_key]].tile.remote(jac[row_key], jac[("train", t.col)], cfg.chunk_params)
        pending[ref] = t

    diag = np.zeros(len(train_texts))
    bar = tqdm(total=len(plan), desc="kernel tiles", unit="tile", disable=not progress)
    t1 = time.perf_counter()
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        t = pending.pop(done[0])
        tile = ray.get(done[0])
        row_blocks = train_blocks if t.matrix == "train_train" else test_blocks
        r0, c0 = row_blocks[t.row][0], train_blocks[t.col][0]
        write_kernel_tile(layout, t.matrix, t.name, r0, c0, tile)
        if t.matrix == "train_train" and t.row == t.col:
            d = np.diagonal(tile[..., 0, 0] if tile.ndim == 4 else tile)
            diag[r0 : r0 + len(d)] = d
        for key in (("train" if t.matrix == "train_train" else "test", t.row), ("train", t.col)):
            uses[key] -= 1
            if uses[key] == 0:
                del jac[key]  # frees the Jacobian block in the object store
        bar.update(1)
    bar.close()
    elapsed = time.perf_counter() - t1
    for a in actors:
        ray.kill(a)

    n, m = len(train_texts), len(test_texts)
    entries = (n * (n + 1) // 2 + m * n) * (info["n_classes"] ** 2 if cfg.kind == "full" else 1)
    out = {
        "kind": cfg.kind,
        "n_train": n,
        "n_test": m,
        "n_classes": info["n_classes"],
        "n_params": info["n_params"],
        "model_kind": info["model_kind"],
        "label_token_ids": info["label_token_ids"],
        "block_size": cfg.block_size,
        "num_actors": cfg.num_actors,
        "tiles": {
            "train_train": [t.name for t in plan if t.matrix == "train_train"],
            "test_train": [t.name for t in plan if t.matrix == "test_train"],
        },
        "diag_mean": float(diag.mean()) if n else 0.0,
        "seconds": {"load_model": t_load, "tiles": elapsed, "total": time.perf_counter() - t0},
        "entries_per_second": entries / max(elapsed, 1e-9),
    }
    write_kernel_manifest(layout, out)
    return KernelJobResult(info=out)
