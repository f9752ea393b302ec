"""Result schemas and atomic Parquet/JSON I/O: the only place that knows the on-disk layout."""

from __future__ import annotations

from .atomic import atomic_path, remove_path, write_json_atomic, write_parquet_atomic
from .feature_plan import FeaturePlan, ShardSpec, features_schema
from .features import FeatureStore
from .layout import Layout
from .manifest import RunManifest, StageEntry, versions
from .stores import (
    Kernel,
    KernelStore,
    MarginalsStore,
    load_kernel,
    read_duplicates,
    read_kernel,
    read_examples,
    read_values,
    write_duplicates,
    write_examples,
    write_kernel_tile,
    marginals_table,
    write_values,
)

__all__ = [
    "FeaturePlan",
    "FeatureStore",
    "Layout",
    "ShardSpec",
    "features_schema",
    "RunManifest",
    "StageEntry",
    "versions",
    "Kernel",
    "KernelStore",
    "MarginalsStore",
    "read_kernel",
    "atomic_path",
    "load_kernel",
    "read_duplicates",
    "read_examples",
    "read_values",
    "remove_path",
    "write_duplicates",
    "write_examples",
    "write_json_atomic",
    "write_kernel_tile",
    "marginals_table",
    "write_parquet_atomic",
    "write_values",
]
