"""Split examples into blocks and kernel matrices into tiles; the signature of a plan (what tiles belong to)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..config import KernelConfig, ModelConfig, config_to_dict

__all__ = ["Tile", "blocks", "features_signature", "plan_signature", "tiles"]


@dataclass(frozen=True)
class Tile:
    """One kernel tile: rows from block ``row`` of ``row_set``, columns from train block ``col``."""

    matrix: str  # "train_train" or "test_train"
    row: int
    col: int

    @property
    def name(self) -> str:
        return f"tile-r{self.row:05d}-c{self.col:05d}"


def blocks(n: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) index ranges of consecutive blocks of at most ``size`` examples."""
    return [(s, min(n, s + size)) for s in range(0, n, size)]


def tiles(n_train_blocks: int, n_test_blocks: int) -> list[Tile]:
    """Lower-triangular train×train tiles (row ≥ col; the rest is the transpose) and all test×train tiles."""
    out = [Tile("train_train", i, j) for i in range(n_train_blocks) for j in range(i + 1)]
    out += [Tile("test_train", i, j) for i in range(n_test_blocks) for j in range(n_train_blocks)]
    return out


def plan_signature(train_texts, test_texts, model_cfg: ModelConfig, cfg: KernelConfig) -> str:
    """Hash of everything that determines the tiles' contents and layout (not resources)."""
    h = hashlib.sha256()
    h.update(json.dumps(config_to_dict(model_cfg), sort_keys=True).encode())
    h.update(json.dumps({"kind": cfg.kind, "block_size": cfg.block_size}).encode())
    if cfg.projection_dim:  # projected and exact tiles never mix (exact plans keep their old signature)
        h.update(json.dumps({"projection_dim": cfg.projection_dim, "projection_seed": cfg.projection_seed,
                             "projection_block": cfg.projection_block}).encode())
    for split in (train_texts, test_texts):
        h.update(str(len(split)).encode())
        for t in split:
            h.update(t.encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()


def features_signature(texts: Mapping[str, Sequence[str]], labels: Mapping[str, Sequence[int]], model_cfg: ModelConfig,
                       cfg: KernelConfig) -> str:
    """Hash of everything that determines a projected-features dataset's shards: the model, kind, projection,
    shard size and each split's texts and labels (in ``texts`` order; not resources, method or block size).

    Raises:
        ValueError: ``cfg.projection_dim`` is 0, or a split's labels do not match its texts.
    """
    if cfg.projection_dim <= 0:
        raise ValueError("kernel.projection_dim: features need a projection (> 0)")
    h = hashlib.sha256(b"features/1\0")
    h.update(json.dumps(config_to_dict(model_cfg), sort_keys=True).encode())
    h.update(json.dumps({"kind": cfg.kind, "projection_dim": cfg.projection_dim, "projection_seed": cfg.projection_seed,
                         "projection_block": cfg.projection_block, "shard_rows": cfg.feature_shard_rows}).encode())
    for split, split_texts in texts.items():
        split_labels = [int(x) for x in labels[split]]
        if len(split_labels) != len(split_texts):
            raise ValueError(f"{split}: {len(split_labels)} labels for {len(split_texts)} texts")
        h.update(f"{split}\0{len(split_texts)}\0".encode())
        for t in split_texts:
            h.update(t.encode("utf-8", "surrogatepass") + b"\0")
        h.update(json.dumps(split_labels).encode())
    return h.hexdigest()
