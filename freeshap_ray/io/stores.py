"""Schemas and readers/writers of every table a run produces (Parquet readable by pandas, datasets, Ray Data)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import OutputError
from .atomic import write_json_atomic, write_parquet_atomic
from .layout import Layout

__all__ = [
    "EXAMPLES_SCHEMA",
    "KERNEL_TILE_SCHEMA",
    "MARGINALS_SCHEMA",
    "VALUES_SCHEMA",
    "SCHEMA_VERSION",
    "load_kernel",
    "read_examples",
    "read_values",
    "write_examples",
    "write_kernel_manifest",
    "write_kernel_tile",
    "write_marginals",
    "write_values",
]

SCHEMA_VERSION = 1

EXAMPLES_SCHEMA = pa.schema(
    [
        ("index", pa.int64()),  # position in this split (row/column of the kernel)
        ("id", pa.int64()),  # row in the source table
        ("text", pa.string()),
        ("label", pa.int64()),
        ("label_name", pa.string()),
    ],
    metadata={"freeshap_ray.schema": f"examples/{SCHEMA_VERSION}"},
)

KERNEL_TILE_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),  # global row index (train or test split)
        ("col_start", pa.int64()),  # global index of the first train column of the tile
        ("values", pa.list_(pa.float64())),  # tile width (× C·C for the full kernel, row-major (j, c, d))
    ],
    metadata={"freeshap_ray.schema": f"kernel_tile/{SCHEMA_VERSION}"},
)

MARGINALS_SCHEMA = pa.schema(
    [
        ("perm_id", pa.int64()),
        ("seed", pa.int64()),
        ("order", pa.list_(pa.int64())),  # training indices in the order they were added
        ("marginals", pa.list_(pa.float64())),  # marginal of order[k] at position k
        ("truncated_at", pa.int64()),  # points actually added; later marginals are 0
        ("v_full", pa.float64()),
    ],
    metadata={"freeshap_ray.schema": f"marginals/{SCHEMA_VERSION}"},
)

VALUES_SCHEMA = pa.schema(
    [
        ("index", pa.int64()),
        ("id", pa.int64()),
        ("text", pa.string()),
        ("label", pa.int64()),
        ("label_name", pa.string()),
        ("value", pa.float64()),
        ("stderr", pa.float64()),
        ("count", pa.int64()),
    ],
    metadata={"freeshap_ray.schema": f"values/{SCHEMA_VERSION}"},
)

VALUES_PER_TEST_SCHEMA = pa.schema(
    [
        ("index", pa.int64()),  # training index
        ("test_index", pa.int64()),
        ("value", pa.float64()),
        ("stderr", pa.float64()),
        ("count", pa.int64()),
    ],
    metadata={"freeshap_ray.schema": f"values_per_test/{SCHEMA_VERSION}"},
)


# --------------------------------------------------------------------------------------------------
# Examples


def write_examples(layout: Layout, split: str, texts, labels: np.ndarray, ids: np.ndarray, label_names) -> Path:
    """Write one split's examples (``split`` = ``train`` or ``test``)."""
    labels = np.asarray(labels, dtype=np.int64)
    table = pa.table(
        {
            "index": np.arange(len(texts), dtype=np.int64),
            "id": np.asarray(ids, dtype=np.int64),
            "text": list(texts),
            "label": labels,
            "label_name": [label_names[i] for i in labels],
        },
        schema=EXAMPLES_SCHEMA,
    )
    return write_parquet_atomic(table, layout.examples(split))


def read_examples(layout: Layout, split: str) -> pa.Table:
    path = layout.examples(split)
    if not path.is_file():
        raise OutputError(f"{path}: missing; run the kernel stage first (freeshap-ray kernel CONFIG)")
    return pq.read_table(path)


# --------------------------------------------------------------------------------------------------
# Kernel


def write_kernel_tile(layout: Layout, matrix: str, name: str, row_start: int, col_start: int, tile: np.ndarray) -> Path:
    """Write one float64 tile (rows × cols [× C × C]) of ``matrix``."""
    rows = tile.shape[0]
    flat = np.ascontiguousarray(tile, dtype=np.float64).reshape(rows, -1)
    width = flat.shape[1]
    values = pa.ListArray.from_arrays(pa.array(np.arange(0, rows * width + 1, width, dtype=np.int32)), pa.array(flat.ravel()))
    table = pa.table(
        {
            "row": np.arange(row_start, row_start + rows, dtype=np.int64),
            "col_start": np.full(rows, col_start, dtype=np.int64),
            "values": values,
        },
        schema=KERNEL_TILE_SCHEMA,
    )
    return write_parquet_atomic(table, layout.kernel_tile(matrix, name))


def write_kernel_manifest(layout: Layout, info: dict[str, Any]) -> Path:
    """Mark the kernel complete: written last, after every tile."""
    return write_json_atomic({"schema_version": SCHEMA_VERSION, **info}, layout.kernel_manifest)


def _fill(out: np.ndarray, path: Path, symmetric: bool) -> None:
    table = pq.read_table(path)
    rows = table.column("row").to_numpy()
    col_start = int(table.column("col_start")[0].as_py())
    flat = np.asarray(table.column("values").combine_chunks().flatten().to_numpy(), dtype=np.float64)
    tail = out.shape[2:]
    block = flat.reshape(len(rows), -1, *tail)
    cols = slice(col_start, col_start + block.shape[1])
    out[rows[0] : rows[-1] + 1, cols] = block
    if symmetric:
        mirrored = block.swapaxes(0, 1)
        if tail:
            mirrored = mirrored.swapaxes(2, 3)
        out[cols, rows[0] : rows[-1] + 1] = mirrored


def load_kernel(out_dir: str | Path) -> dict[str, Any]:
    """Assemble the kernel written by a run.

    Returns:
        ``{"train_train": (n, n), "test_train": (m, n)}`` float64 arrays for the first-logit kernel, or
        ``{"train_train_full": (n, n, C, C), "test_train_full": (m, n, C, C)}`` for the full kernel, plus
        ``"kind"`` and ``"manifest"``.
    """
    layout = Layout.of(out_dir)
    if not layout.kernel_manifest.is_file():
        raise OutputError(f"{layout.kernel_manifest}: missing; the kernel stage has not finished in {out_dir}")
    info = json.loads(layout.kernel_manifest.read_text())
    n, m, c, kind = info["n_train"], info["n_test"], info["n_classes"], info["kind"]
    tail = () if kind == "first_logit" else (c, c)
    suffix = "" if kind == "first_logit" else "_full"
    result: dict[str, Any] = {"kind": kind, "manifest": info}
    for matrix, rows in (("train_train", n), ("test_train", m)):
        out = np.full((rows, n, *tail), np.nan)
        for name in info["tiles"][matrix]:
            _fill(out, layout.kernel_tile(matrix, name), symmetric=matrix == "train_train")
        if np.isnan(out).any():
            raise OutputError(f"{layout.kernel_dir / matrix}: tiles missing; recompute the kernel")
        result[matrix + suffix] = out
    return result


# --------------------------------------------------------------------------------------------------
# Shapley


def write_marginals(layout: Layout, part: int, records: list[dict[str, Any]]) -> Path:
    """Write one chunk of per-permutation records (see ``MARGINALS_SCHEMA``)."""
    table = pa.Table.from_pylist(records, schema=MARGINALS_SCHEMA)
    return write_parquet_atomic(table, layout.marginals_part(part))


def write_values(
    layout: Layout,
    examples: pa.Table,
    values: np.ndarray,
    stderr: np.ndarray,
    counts: np.ndarray,
    *,
    per_test: tuple[np.ndarray, np.ndarray] | None = None,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write ``values.parquet`` (one row per training example) and, given ``per_test`` = (values, stderr)
    of shape (n, m), ``values_per_test.parquet`` (one row per training × test pair)."""
    counts = np.asarray(counts, dtype=np.int64)
    if per_test is not None:
        pv, ps = (np.asarray(a, dtype=np.float64) for a in per_test)
        n, m = pv.shape
        table = pa.table(
            {
                "index": np.repeat(np.arange(n, dtype=np.int64), m),
                "test_index": np.tile(np.arange(m, dtype=np.int64), n),
                "value": pv.ravel(),
                "stderr": ps.ravel(),
                "count": np.repeat(counts, m),
            },
            schema=VALUES_PER_TEST_SCHEMA,
        )
        write_parquet_atomic(table, layout.values_per_test)
    meta = {**VALUES_SCHEMA.metadata, b"freeshap_ray.info": json.dumps(info or {}, default=str).encode()}
    table = pa.table(
        {
            "index": examples.column("index"),
            "id": examples.column("id"),
            "text": examples.column("text"),
            "label": examples.column("label"),
            "label_name": examples.column("label_name"),
            "value": np.asarray(values, dtype=np.float64),
            "stderr": np.asarray(stderr, dtype=np.float64),
            "count": counts,
        },
        schema=VALUES_SCHEMA.with_metadata(meta),
    )
    return write_parquet_atomic(table, layout.values)


def read_values(out_dir: str | Path) -> pa.Table:
    path = Layout.of(out_dir).values
    if not path.is_file():
        raise OutputError(f"{path}: missing; run the shapley stage first")
    return pq.read_table(path)
