"""Parquet schemas of the ``stratified`` and ``msr_banzhaf`` estimators' records (permutation records keep
``MARGINALS_SCHEMA``); a store holds the records of one estimator (its ``run.json`` says which).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ..errors import OutputError
from ..valuation.banzhaf import MSRSample
from ..valuation.stratified import StratifiedSample

__all__ = ["MSR_SCHEMA", "STRATIFIED_SCHEMA", "read_sample_table", "sample_table"]

SAMPLES_SCHEMA_VERSION = 1

STRATIFIED_SCHEMA = pa.schema(
    [
        ("sample_id", pa.int64()),
        ("seed", pa.int64()),
        ("sizes", pa.list_(pa.int64())),  # (n,) coalition size of each point's marginal; -1 = not taking part
        ("marginals", pa.list_(pa.float64())),  # (n,) or (n·m,) per test point (point-major)
        ("walked", pa.int64()),  # prefix length the permutation was walked to
    ],
    metadata={"freeshap_ray.schema": f"stratified/{SAMPLES_SCHEMA_VERSION}"},
)

MSR_SCHEMA = pa.schema(
    [
        ("sample_id", pa.int64()),
        ("seed", pa.int64()),
        ("mask", pa.binary()),  # np.packbits of the (n,) inclusion mask
        ("utility", pa.list_(pa.float64())),  # [v(S)], or (m,) per test point
    ],
    metadata={"freeshap_ray.schema": f"msr/{SAMPLES_SCHEMA_VERSION}"},
)

_SCHEMAS = {"stratified": STRATIFIED_SCHEMA, "msr": MSR_SCHEMA}


def _lists(rows: list[np.ndarray], dtype) -> pa.Array:
    lengths = np.array([r.size for r in rows], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = np.concatenate([np.asarray(r, dtype=dtype).ravel() for r in rows]) if rows else np.zeros(0, dtype)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def sample_table(family: str, seed: int, records: list) -> pa.Table:
    """One batch of records as a table of the family's schema."""
    ids = pa.array([int(r.sample_id) for r in records], pa.int64())
    seeds = pa.array([int(seed)] * len(records), pa.int64())
    if family == "stratified":
        cols = [ids, seeds, _lists([r.sizes for r in records], np.int64),
                _lists([np.asarray(r.marginals) for r in records], np.float64),
                pa.array([int(r.walked) for r in records], pa.int64())]
    else:
        cols = [ids, seeds, pa.array([bytes(np.asarray(r.mask, dtype=np.uint8)) for r in records], pa.binary()),
                _lists([np.atleast_1d(np.asarray(r.utility, dtype=np.float64)) for r in records], np.float64)]
    return pa.Table.from_arrays(cols, schema=_SCHEMAS[family])


def read_sample_table(family: str, table: pa.Table, n: int, m: int | None, path: Path) -> list[tuple[int, Any]]:
    """``(seed, record)`` of every row of a part (an error naming the file if it is not of ``family``);
    ``m``: test points of per-test records, None for records of the mean utility."""
    missing = [c for c in _SCHEMAS[family].names if c not in table.column_names]
    if missing:
        raise OutputError(f"{path}: not a {family} samples part (missing columns {missing}); rerun with "
                          "--overwrite or shapley.resume=false")
    out = []
    d = table.to_pydict()
    for k in range(table.num_rows):
        seed, sid = int(d["seed"][k]), int(d["sample_id"][k])
        if family == "stratified":
            marg = np.asarray(d["marginals"][k], dtype=np.float64)
            marg = marg.reshape(n, m) if m is not None else marg
            out.append((seed, StratifiedSample(sid, np.asarray(d["sizes"][k], dtype=np.int64), marg,
                                               int(d["walked"][k]))))
        else:
            u = np.asarray(d["utility"][k], dtype=np.float64)
            out.append((seed, MSRSample(sid, np.frombuffer(d["mask"][k], dtype=np.uint8).copy(),
                                        u if m is not None else float(u[0]))))
    return out
