"""``OUT/explain/train_features/``: a cache of the training set's gradient blocks, for kernel rows of new texts.

One ``block-NNNNN.npz`` per training block of the kernel plan holds the block's
:class:`~freeshap_ray.grads.features.FeatureBlock` arrays (or its dense Jacobian) and a small JSON header
stored as bytes (numpy ``.npz``, read with ``allow_pickle=False``); ``key.json`` says what the blocks are
gradients OF (plan signature, method, projection, blocks). A cache of another key is discarded; every block
is validated when read (dtypes, shapes, token rows, finiteness).
"""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import OutputError
from ..grads.features import DenseColumns, EmbeddingFactors, FeatureBlock, LinearFactors
from .atomic import atomic_path, remove_path, write_json_atomic
from .layout import Layout

__all__ = ["FEATURE_CACHE_VERSION", "FeatureCache"]

log = logging.getLogger(__name__)

FEATURE_CACHE_VERSION = 1


def _meta_array(meta: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)


def _encode(block: FeatureBlock | np.ndarray) -> dict[str, np.ndarray]:
    """The arrays of a block (a JSON header as ``meta``)."""
    if isinstance(block, np.ndarray):
        return {"meta": _meta_array({"type": "jacobian"}), "jacobian": block}
    meta = {"type": "features", "n_examples": block.n_examples, "n_outputs": block.n_outputs,
            "spans": {k: list(v) for k, v in block.columns.spans.items()},
            "linear": [f.key for f in block.linear], "embedding": [e.key for e in block.embedding]}
    arrays = {"meta": _meta_array(meta), "dense": block.dense}
    for i, f in enumerate(block.linear):
        arrays.update({f"linear{i}_a": f.a, f"linear{i}_g": f.g, f"linear{i}_row": f.row})
    for i, e in enumerate(block.embedding):
        arrays.update({f"embedding{i}_ids": e.ids, f"embedding{i}_g": e.g, f"embedding{i}_row": e.row})
    return arrays


class _Bad(Exception):
    """A cached block that does not pass validation (the message says why)."""


def _array(z, name: str, dtype, ndim: int) -> np.ndarray:
    if name not in z.files:
        raise _Bad(f"array {name!r} missing")
    a = z[name]
    if a.dtype != dtype or a.ndim != ndim:
        raise _Bad(f"array {name!r} is {a.dtype} with {a.ndim} dims, expected {np.dtype(dtype)} with {ndim}")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise _Bad(f"array {name!r} has non-finite entries")
    return a


def _token_rows(row: np.ndarray, n: int, rows: int, name: str) -> None:
    if row.shape != (n,) or (n and (row.min() < 0 or row.max() >= rows or np.any(np.diff(row) < 0))):
        raise _Bad(f"{name}: token rows out of range or unsorted")


def _decode(z, examples: int) -> FeatureBlock | np.ndarray:
    """The block in the open npz ``z`` of ``examples`` examples, validated (raises :class:`_Bad`)."""
    try:
        meta = json.loads(_array(z, "meta", np.uint8, 1).tobytes().decode())
    except (ValueError, UnicodeDecodeError) as err:
        raise _Bad(f"unreadable header ({err})") from err
    if meta.get("type") == "jacobian":
        jac = _array(z, "jacobian", np.float32, 3)
        if jac.shape[0] != examples:
            raise _Bad(f"{jac.shape[0]} examples, expected {examples}")
        return jac
    if meta.get("type") != "features" or meta.get("n_examples") != examples:
        raise _Bad(f"header {meta!r} does not describe a feature block of {examples} examples")
    rows = examples * int(meta["n_outputs"])
    dense = _array(z, "dense", np.float32, 2)
    spans = {k: (int(s), int(e)) for k, (s, e) in meta["spans"].items()}
    if dense.shape[0] != rows or any(not 0 <= s <= e <= dense.shape[1] for s, e in spans.values()):
        raise _Bad(f"dense array of shape {dense.shape} does not fit {rows} rows and its column spans")
    linear, embedding = [], []
    for i, key in enumerate(meta["linear"]):
        a, g = _array(z, f"linear{i}_a", np.float32, 2), _array(z, f"linear{i}_g", np.float32, 2)
        row = _array(z, f"linear{i}_row", np.int64, 1)
        if g.shape[0] != a.shape[0]:
            raise _Bad(f"linear{i}: {a.shape[0]} inputs but {g.shape[0]} output-gradients")
        _token_rows(row, a.shape[0], rows, f"linear{i}")
        linear.append(LinearFactors(key, a, g, row))
    for i, key in enumerate(meta["embedding"]):
        ids, g = _array(z, f"embedding{i}_ids", np.int64, 1), _array(z, f"embedding{i}_g", np.float32, 2)
        row = _array(z, f"embedding{i}_row", np.int64, 1)
        if g.shape[0] != ids.shape[0]:
            raise _Bad(f"embedding{i}: {ids.shape[0]} ids but {g.shape[0]} output-gradients")
        _token_rows(row, ids.shape[0], rows, f"embedding{i}")
        embedding.append(EmbeddingFactors(key, ids, g, row))
    return FeatureBlock(examples, int(meta["n_outputs"]), dense, DenseColumns(spans), linear, embedding)


class FeatureCache:
    """The training set's gradient blocks on disk (a :class:`~freeshap_ray.kernel.rows.TrainFeatures` once
    every block is written): ``key.json`` and ``block-NNNNN.npz`` per block of the kernel plan.

    Args:
        layout: the run.
        bounds: ``[start, stop)`` of each training block (the kernel plan's).
    """

    def __init__(self, layout: Layout, bounds: list[tuple[int, int]]) -> None:
        self.dir = layout.train_features
        self.key_file = self.dir / "key.json"
        self._bounds = list(bounds)

    @property
    def bounds(self) -> list[tuple[int, int]]:
        return self._bounds

    def path(self, b: int) -> Path:
        return self.dir / f"block-{b:05d}.npz"

    def open(self, key: dict[str, Any]) -> None:
        """Keep the blocks stored for ``key``; discard a cache of another key (another plan, or unreadable)."""
        key = {"cache_version": FEATURE_CACHE_VERSION, "bounds": [list(b) for b in self._bounds], **key}
        stored = None
        if self.key_file.is_file():
            try:
                stored = json.loads(self.key_file.read_text())
            except (OSError, ValueError):
                stored = None
        if stored != key:
            if self.dir.exists():
                log.info("%s: discarding cached training gradients of another kernel plan", self.dir)
            remove_path(self.dir)
            write_json_atomic(key, self.key_file)

    def missing(self) -> list[int]:
        """Blocks not stored yet."""
        return [b for b in range(len(self._bounds)) if not self.path(b).is_file()]

    def write(self, b: int, block: FeatureBlock | np.ndarray) -> Path:
        """Store block ``b`` atomically."""
        path = self.path(b)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **_encode(block))
        return path

    def block(self, b: int) -> FeatureBlock | np.ndarray:
        """Block ``b``, validated.

        Raises:
            OutputError: missing, unreadable or inconsistent (the message names the file).
        """
        path = self.path(b)
        start, stop = self._bounds[b]
        try:
            with np.load(path, allow_pickle=False) as z:
                return _decode(z, stop - start)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, _Bad) as err:
            raise OutputError(f"{path}: not a valid cached gradient block ({err}); it is a cache: pass "
                              f"--overwrite (overwrite=True) to recompute it, or delete {self.dir}") from err
