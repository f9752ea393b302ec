"""Schemas and atomic writers of the ReAGent job's tables (``attributions.parquet``, ``metrics.parquet``,
``prompts.parquet``) and its HTML heat map."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import OutputError
from .atomic import atomic_path, write_json_atomic, write_parquet_atomic

__all__ = [
    "ATTRIBUTIONS_SCHEMA",
    "METRICS_SCHEMA",
    "PROMPTS_SCHEMA",
    "REAGENT_SCHEMA_VERSION",
    "ReagentLayout",
    "attributions_table",
    "metrics_table",
    "prompts_table",
    "read_attributions",
    "write_reagent_outputs",
]

REAGENT_SCHEMA_VERSION = 1

# One row per (method, prompt, target token, source position).
ATTRIBUTIONS_SCHEMA = pa.schema(
    [
        ("method", pa.string()),  # reagent | input_x_gradient | integrated_gradients | attention | random
        ("prompt_id", pa.int64()),
        ("target_pos", pa.int64()),  # index of the target token in the full sequence (prompt + targets)
        ("target_id", pa.int64()),
        ("target_token", pa.string()),
        ("source_pos", pa.int64()),  # 0 .. target_pos - 1
        ("source_id", pa.int64()),
        ("source_token", pa.string()),
        ("is_special", pa.bool_()),  # special tokens are never replaced and score 0
        ("score", pa.float64()),  # importance; sums to 1 over a target's non-special sources
        ("converged", pa.bool_()),  # reagent: at least one probe met the stop rule (baselines: true)
        ("probes_converged", pa.int64()),
        ("note", pa.string()),  # "", short_context, single_position, no_replaceable
    ],
    metadata={"freeshap_ray.schema": f"reagent_attributions/{REAGENT_SCHEMA_VERSION}"},
)

# One row per (method, prompt, target token): faithfulness vs random importances.
METRICS_SCHEMA = pa.schema(
    [
        ("method", pa.string()),
        ("prompt_id", pa.int64()),
        ("target_pos", pa.int64()),
        ("soft_ns", pa.float64()),
        ("soft_nc", pa.float64()),
        ("soft_ns_random", pa.float64()),
        ("soft_nc_random", pa.float64()),
        ("log_soft_ns", pa.float64()),  # ln(soft_ns / soft_ns_random)
        ("log_soft_nc", pa.float64()),
    ],
    metadata={"freeshap_ray.schema": f"reagent_metrics/{REAGENT_SCHEMA_VERSION}"},
)

PROMPTS_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.int64()),
        ("prompt", pa.string()),
        ("target_text", pa.string()),  # given or greedily generated
        ("n_prompt_tokens", pa.int64()),
        ("n_targets", pa.int64()),
        ("generated", pa.bool_()),
    ],
    metadata={"freeshap_ray.schema": f"reagent_prompts/{REAGENT_SCHEMA_VERSION}"},
)


class ReagentLayout:
    """Files of a ReAGent job's output directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.attributions = self.root / "attributions.parquet"
        self.metrics = self.root / "metrics.parquet"
        self.prompts = self.root / "prompts.parquet"
        self.html = self.root / "attributions.html"
        self.manifest = self.root / "reagent_manifest.json"

    def all(self) -> list[Path]:
        return [self.attributions, self.metrics, self.prompts, self.html, self.manifest]


def attributions_table(records: dict[str, list] | list[dict[str, Any]]) -> pa.Table:
    if isinstance(records, list):
        return pa.Table.from_pylist(records, schema=ATTRIBUTIONS_SCHEMA)
    return pa.table(records, schema=ATTRIBUTIONS_SCHEMA)


def metrics_table(records: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(records, schema=METRICS_SCHEMA)


def prompts_table(records: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(records, schema=PROMPTS_SCHEMA)


def write_reagent_outputs(out_dir: str | Path, attributions: pa.Table, prompts: pa.Table, *,
                          metrics: pa.Table | None = None, html: str | None = None,
                          manifest: dict[str, Any] | None = None) -> ReagentLayout:
    """Write every table atomically; the manifest is written last (its presence marks a complete run)."""
    layout = ReagentLayout(out_dir)
    meta = {**ATTRIBUTIONS_SCHEMA.metadata, b"freeshap_ray.info": json.dumps(manifest or {}, default=str).encode()}
    write_parquet_atomic(attributions.cast(ATTRIBUTIONS_SCHEMA).replace_schema_metadata(meta), layout.attributions)
    write_parquet_atomic(prompts, layout.prompts)
    if metrics is not None:
        write_parquet_atomic(metrics, layout.metrics)
    if html is not None:
        with atomic_path(layout.html) as tmp:
            tmp.write_text(html, encoding="utf-8")
    write_json_atomic({"schema_version": REAGENT_SCHEMA_VERSION, **(manifest or {})}, layout.manifest)
    return layout


def read_attributions(out_dir: str | Path) -> pa.Table:
    path = ReagentLayout(out_dir).attributions
    if not path.is_file():
        raise OutputError(f"{path}: missing; run `freeshap-ray reagent CONFIG` first")
    return pq.read_table(path)
