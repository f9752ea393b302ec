"""The projected-features dataset's schema and plan: which shards exist and what they must contain.

One Parquet row per example: ``row_id`` (index in its split), ``split`` (``train`` | ``test``), ``label`` and
``features``, a ``fixed_size_list<float32>[D·C']`` holding the example's C' feature rows of D floats one
after another (C' = 1 for ``kernel.kind: first_logit``, C for ``full``; row-major, so reshaping a shard's
column to (rows·C', D) gives the example-major rows of :meth:`KernelWorker.features`). The schema's
metadata (``freeshap_ray.features``, JSON) records the plan: signature, kind, classes, projection
dim/seed/block, shard size, the writer's numpy version and :func:`~freeshap_ray.grads.projection.rng_checksum`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from ..config import KernelConfig, ModelConfig
from ..grads.projection import rng_checksum
from ..kernel.plan import blocks, features_signature

__all__ = ["FEATURES_SCHEMA_VERSION", "FEATURES_META_KEY", "SPLITS", "FeaturePlan", "ShardSpec", "features_schema"]

FEATURES_SCHEMA_VERSION = 1
FEATURES_META_KEY = b"freeshap_ray.features"
SPLITS = ("train", "test")


def features_schema(width: int, meta: Mapping[str, Any] | None = None) -> pa.Schema:
    """The shard schema for ``width`` = D·C' floats per example, with ``meta`` as its JSON metadata."""
    metadata = {b"freeshap_ray.schema": f"features/{FEATURES_SCHEMA_VERSION}".encode()}
    if meta is not None:
        metadata[FEATURES_META_KEY] = json.dumps(dict(meta), sort_keys=True).encode()
    return pa.schema([
        ("row_id", pa.int64()),  # index in its split (row of the kernel)
        ("split", pa.string()),
        ("label", pa.int64()),
        ("features", pa.list_(pa.float32(), width)),
    ], metadata=metadata)


@dataclass(frozen=True)
class ShardSpec:
    """Examples ``[start, stop)`` of ``split``: one shard file, one actor call, the unit of resume."""

    split: str
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"{self.split}-{self.start:08d}.parquet"

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class FeaturePlan:
    """What a features dataset holds (small and picklable: sent to every writer).

    Attributes:
        signature: :func:`~freeshap_ray.kernel.plan.features_signature` of texts, labels, model and settings.
        kind: ``first_logit`` or ``full``.
        n_classes: C.
        projection_dim, projection_seed, projection_block: the requested projection (the actual D ≤ dim is
            fixed by the model: see :class:`~freeshap_ray.grads.projection.ProjectionPlan`).
        shard_rows: examples per shard.
        sizes: ``((split, n), ...)`` in split order.
        rng_checksum: :func:`~freeshap_ray.grads.projection.rng_checksum` of the seed on the driver.
    """

    signature: str
    kind: str
    n_classes: int
    projection_dim: int
    projection_seed: int
    projection_block: int
    shard_rows: int
    sizes: tuple[tuple[str, int], ...]
    rng_checksum: str

    @classmethod
    def build(cls, texts: Mapping[str, Sequence[str]], labels: Mapping[str, Sequence[int]], model_cfg: ModelConfig,
              cfg: KernelConfig) -> FeaturePlan:
        """The plan of ``texts`` (``{"train": [...], "test": [...]}``, any subset of :data:`SPLITS`)."""
        unknown = [s for s in texts if s not in SPLITS]
        if unknown or set(labels) != set(texts):
            raise ValueError(f"features: splits must be among {SPLITS} with labels for each, got texts "
                             f"{sorted(texts)} and labels {sorted(labels)}")
        order = [s for s in SPLITS if s in texts]
        return cls(
            signature=features_signature({s: texts[s] for s in order}, labels, model_cfg, cfg),
            kind=cfg.kind, n_classes=len(model_cfg.label_words), projection_dim=cfg.projection_dim,
            projection_seed=cfg.projection_seed, projection_block=cfg.projection_block,
            shard_rows=cfg.feature_shard_rows, sizes=tuple((s, len(texts[s])) for s in order),
            rng_checksum=rng_checksum(cfg.projection_seed),
        )

    @property
    def outputs(self) -> int:
        """C': feature rows per example."""
        return 1 if self.kind == "first_logit" else self.n_classes

    def size(self, split: str) -> int:
        return dict(self.sizes)[split]

    def shards(self, split: str | None = None) -> list[ShardSpec]:
        """Every shard of ``split`` (default: all splits), in order."""
        return [ShardSpec(s, a, b) for s, n in self.sizes if split in (None, s) for a, b in blocks(n, self.shard_rows)]

    def record(self) -> dict[str, Any]:
        """JSON-able description (``_plan.json``, the manifest and each shard's metadata)."""
        rec = asdict(self)
        rec["sizes"] = dict(self.sizes)
        rec["outputs"] = self.outputs
        return rec

    def differs(self, stored: Mapping[str, Any]) -> str | None:
        """The first recorded key whose value differs from ``stored`` (``signature`` if only the data do), or None."""
        rec = self.record()
        for key in (*[k for k in rec if k != "signature"], "signature"):
            if stored.get(key) != rec[key]:
                return key
        return None

    def shard_meta(self, dim: int) -> dict[str, Any]:
        """A shard's metadata: the plan, the actual D, and this process's numpy version and RNG checksum."""
        return {**self.record(), "dim": int(dim), "numpy": np.__version__,
                "rng_checksum": rng_checksum(self.projection_seed)}
