"""``OUT/explanations.parquet``: long format, one row per explained text and training example, rewritten
atomically (temp file, then rename) as texts are added."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import OutputError
from .atomic import write_parquet_atomic
from .layout import Layout

__all__ = ["EXPLANATIONS_SCHEMA", "explanations_table", "read_explanations", "write_explanations"]

EXPLANATIONS_SCHEMA_VERSION = 1

EXPLANATIONS_SCHEMA = pa.schema(
    [
        ("text_id", pa.int64()),  # explained text: 0, 1, ... in the order texts were first stored
        ("text", pa.string()),
        ("settings", pa.string()),  # JSON: what decides the values (explain.* keys, run identity)
        ("utility", pa.string()),  # prob | margin
        ("label", pa.int64()),  # the explained class
        ("label_name", pa.string()),
        ("predicted_label", pa.int64()),  # argmax of the surrogate trained on every example
        ("predicted_label_name", pa.string()),
        ("prediction", pa.list_(pa.float64())),  # softmax of the surrogate's scores, (C,)
        ("u_full", pa.float64()),  # U(N) of the one-point game
        ("u_empty", pa.float64()),  # U(∅)
        ("index", pa.int64()),  # training example (row/column of the kernel)
        ("id", pa.int64()),  # its id (as in train.parquet)
        ("train_label", pa.int64()),
        ("train_label_name", pa.string()),
        ("train_loo_label", pa.int64()),  # what the surrogate fitted on all OTHER training examples predicts for it
        ("kernel", pa.float64()),  # k(text, example), unscaled (first logit)
        ("value", pa.float64()),
        ("stderr", pa.float64()),
        ("count", pa.int64()),
        ("rank", pa.int64()),  # 1 = most helpful ... n = most harmful, per text
    ],
    metadata={"freeshap_ray.schema": f"explanations/{EXPLANATIONS_SCHEMA_VERSION}"},
)


def explanations_table(columns: dict[str, Any]) -> pa.Table:
    """An :data:`EXPLANATIONS_SCHEMA` table from equal-length columns (``prediction``: (rows, C) array)."""
    cols = dict(columns)
    pred = np.asarray(cols.pop("prediction"), dtype=np.float64)
    offsets = np.arange(0, pred.size + 1, max(pred.shape[1], 1), dtype=np.int32)
    cols["prediction"] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(pred.ravel()))
    return pa.table({f.name: cols[f.name] for f in EXPLANATIONS_SCHEMA}, schema=EXPLANATIONS_SCHEMA)


def read_explanations(layout: Layout) -> pa.Table | None:
    """``explanations.parquet`` (None if there is none).

    Raises:
        OutputError: unreadable, or not an explanations table of this version (names the file).
    """
    path = layout.explanations
    if not path.is_file():
        return None
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as err:
        raise OutputError(f"{path}: unreadable ({err}); delete it or pass --overwrite") from err
    missing = [n for n in EXPLANATIONS_SCHEMA.names if n not in table.column_names]
    if missing:
        raise OutputError(f"{path}: not an explanations table (missing columns {missing}); delete it or pass "
                          "--overwrite")
    return table.select(EXPLANATIONS_SCHEMA.names).cast(EXPLANATIONS_SCHEMA)


def write_explanations(layout: Layout, table: pa.Table) -> Path:
    """Write ``explanations.parquet`` atomically (temp file, then rename)."""
    return write_parquet_atomic(table.cast(EXPLANATIONS_SCHEMA), layout.explanations)
