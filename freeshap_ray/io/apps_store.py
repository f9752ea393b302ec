"""Schemas, paths, readers and writers of the dataset-cleaning outputs (``freeshap-ray clean`` / ``report``).

```
OUT/suspects.parquet                 training points from most to least suspicious (given labels)
OUT/clean/scores.parquet             per-point scores of FreeShap and every baseline (given labels)
OUT/clean/curves.parquet             removal / selection curves under the kernel surrogate
OUT/clean/noise/suspects.parquet     ranking after label-noise injection (with `flipped`, `original_label`)
OUT/clean/noise/scores.parquet       per-point scores on the noisy labels
OUT/clean/noise/detection.parquet    fraction of flipped points found vs fraction inspected, per method
OUT/clean/summary.json               settings, AUC / recall per method, full-set accuracy, timings; written last
OUT/report.html                      the self-contained report
```

Scores are "values": higher means more helpful, lower more suspicious, for every method.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import OutputError
from .atomic import write_parquet_atomic
from .layout import Layout

__all__ = [
    "APPS_SCHEMA_VERSION",
    "CURVES_SCHEMA",
    "DETECTION_SCHEMA",
    "SCORES_SCHEMA",
    "SUSPECTS_SCHEMA",
    "read_curves",
    "read_detection",
    "read_scores",
    "read_summary",
    "scores_table",
    "write_curves",
    "write_detection",
    "write_scores",
]

APPS_SCHEMA_VERSION = 1

SUSPECTS_SCHEMA = pa.schema(
    [
        ("rank", pa.int64()),  # 0 = most suspicious (lowest score)
        ("index", pa.int64()),  # training index (kernel row)
        ("id", pa.int64()),  # row in the source table
        ("text", pa.string()),
        ("label", pa.int64()),  # the label the values were computed with (noisy in the noise evaluation)
        ("label_name", pa.string()),
        ("value", pa.float64()),  # FreeShap value
        ("stderr", pa.float64()),
        ("score", pa.float64()),  # what the ranking sorts by: value, or its per-class z-score
        ("predicted_label", pa.int64()),  # leave-one-out kernel-surrogate prediction (null: not computed)
        ("predicted_label_name", pa.string()),
        ("loo_margin", pa.float64()),  # LOO prediction of the given label minus the best other class
        ("flipped", pa.bool_()),  # noise evaluation only (else null): this label was flipped
        ("original_label", pa.int64()),  # noise evaluation only (else null): label before flipping
    ],
    metadata={"freeshap_ray.schema": f"suspects/{APPS_SCHEMA_VERSION}"},
)

SCORES_SCHEMA = pa.schema(
    [
        ("method", pa.string()),  # freeshap | random | loo | influence | tracin | loo_margin
        ("index", pa.int64()),
        ("score", pa.float64()),  # higher = more helpful
        ("stderr", pa.float64()),  # Monte-Carlo standard error (freeshap only; else null)
    ],
    metadata={"freeshap_ray.schema": f"scores/{APPS_SCHEMA_VERSION}"},
)

CURVES_SCHEMA = pa.schema(
    [
        ("method", pa.string()),
        ("curve", pa.string()),  # remove_high | remove_low | keep_top
        ("fraction", pa.float64()),  # fraction removed (remove_*) or kept (keep_top)
        ("n_train", pa.int64()),  # training points the surrogate was fitted on
        ("accuracy", pa.float64()),  # test accuracy (mean over repeats for random)
        ("accuracy_std", pa.float64()),  # std over random repeats (0 for deterministic orders)
        ("neg_ce", pa.float64()),  # test negative cross-entropy of softmax(F) (NaN for finetune)
        ("evaluator", pa.string()),  # kernel (the surrogate, refitted exactly) | finetune (real fine-tuning)
    ],
    metadata={"freeshap_ray.schema": f"curves/{APPS_SCHEMA_VERSION}"},
)

DETECTION_SCHEMA = pa.schema(
    [
        ("method", pa.string()),
        ("fraction_inspected", pa.float64()),
        ("fraction_found", pa.float64()),  # flipped points among the inspected / all flipped points
    ],
    metadata={"freeshap_ray.schema": f"detection/{APPS_SCHEMA_VERSION}"},
)


def scores_table(scores: dict[str, np.ndarray], stderr: dict[str, np.ndarray] | None = None) -> pa.Table:
    """Long table (``SCORES_SCHEMA``) of ``{method: (n,) scores}`` with optional ``{method: (n,) stderr}``."""
    stderr = stderr or {}
    parts = []
    for method, s in scores.items():
        s = np.asarray(s, dtype=np.float64)
        se = stderr.get(method)
        parts.append(pa.table(
            {
                "method": pa.array([method] * s.size, pa.string()),
                "index": np.arange(s.size, dtype=np.int64),
                "score": s,
                "stderr": pa.nulls(s.size, pa.float64()) if se is None else pa.array(np.asarray(se, np.float64)),
            },
            schema=SCORES_SCHEMA,
        ))
    return pa.concat_tables(parts) if parts else SCORES_SCHEMA.empty_table()


def write_scores(path: Path, scores: dict[str, np.ndarray], stderr: dict[str, np.ndarray] | None = None) -> Path:
    return write_parquet_atomic(scores_table(scores, stderr), path)


def read_scores(path: Path) -> dict[str, np.ndarray]:
    """``{method: (n,) scores}`` from a scores table (rows in index order per method)."""
    t = _read(path, SCORES_SCHEMA, "scores")
    out: dict[str, np.ndarray] = {}
    methods = t.column("method").to_numpy(zero_copy_only=False)
    index = t.column("index").to_numpy()
    score = t.column("score").to_numpy()
    for m in dict.fromkeys(methods):
        sel = methods == m
        v = np.empty(int(sel.sum()))
        v[index[sel]] = score[sel]
        out[str(m)] = v
    return out


def write_curves(path: Path, rows: list[dict[str, Any]]) -> Path:
    rows = [{"evaluator": "kernel", **r} for r in rows]
    return write_parquet_atomic(pa.Table.from_pylist(rows, schema=CURVES_SCHEMA), path)


def read_curves(path: Path) -> pa.Table:
    return _read(path, CURVES_SCHEMA, "curves")


def write_detection(path: Path, curves: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    """``{method: (fraction_inspected, fraction_found)}`` as one long table."""
    parts = []
    for method, (x, y) in curves.items():
        x = np.asarray(x, dtype=np.float64)
        parts.append(pa.table({"method": pa.array([method] * x.size, pa.string()), "fraction_inspected": x,
                               "fraction_found": np.asarray(y, dtype=np.float64)}, schema=DETECTION_SCHEMA))
    table = pa.concat_tables(parts) if parts else DETECTION_SCHEMA.empty_table()
    return write_parquet_atomic(table, path)


def read_detection(path: Path) -> pa.Table:
    return _read(path, DETECTION_SCHEMA, "detection")


def read_summary(out_dir: str | Path) -> dict[str, Any] | None:
    """The cleaning summary of a run directory, or None if ``clean`` has not finished there."""
    path = Layout.of(out_dir).summary
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise OutputError(f"{path}: not valid JSON ({err}); rerun freeshap-ray clean --overwrite") from err


def _read(path: Path, schema: pa.Schema, what: str) -> pa.Table:
    if not Path(path).is_file():
        raise OutputError(f"{path}: missing; run freeshap-ray clean first")
    t = pq.read_table(path)
    missing = [n for n in schema.names if n not in t.column_names]
    if missing:
        raise OutputError(f"{path}: not a {what} table (missing columns {missing})")
    return t.select(schema.names)
