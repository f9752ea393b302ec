"""Schemas and readers/writers of every table a run produces (Parquet readable by pandas, datasets, Ray Data)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import KernelError, OutputError
from .atomic import remove_path, write_json_atomic, write_parquet_atomic
from .layout import Layout
from .remote import local_root

__all__ = [
    "DUPLICATES_SCHEMA",
    "EXAMPLES_SCHEMA",
    "KERNEL_TILE_SCHEMA",
    "MARGINALS_SCHEMA",
    "MarginalsStore",
    "VALUES_SCHEMA",
    "SCHEMA_VERSION",
    "load_kernel",
    "read_duplicates",
    "read_examples",
    "read_values",
    "write_duplicates",
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

DUPLICATES_SCHEMA = pa.schema(
    [
        ("split", pa.string()),  # train | test: the source the dropped row comes from
        ("id", pa.int64()),  # the dropped row (as `id` in train/test.parquet)
        ("text", pa.string()),
        ("label", pa.int64()),
        ("label_name", pa.string()),
        ("reason", pa.string()),  # repeat | test_in_train
        ("kept_id", pa.int64()),  # the data.train row it repeats (kept)
        ("kept_text", pa.string()),
        ("kept_label", pa.int64()),
        ("kept_label_name", pa.string()),
        ("conflict", pa.bool_()),  # label != kept_label
    ],
    metadata={"freeshap_ray.schema": f"duplicates/{SCHEMA_VERSION}"},
)

KERNEL_TILE_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),  # global row index (train or test split)
        ("col_start", pa.int64()),  # global index of the first train column of the tile
        ("values", pa.list_(pa.float64())),  # tile width (× C·C for the full kernel, row-major (j, c, d))
    ],
    metadata={"freeshap_ray.schema": f"kernel_tile/{SCHEMA_VERSION}"},
)

MARGINALS_SCHEMA_VERSION = 2

MARGINALS_SCHEMA = pa.schema(
    [
        ("perm_id", pa.int64()),
        ("seed", pa.int64()),
        ("sampler", pa.string()),  # tmc | permutation | antithetic (see valuation.samplers)
        ("order", pa.list_(pa.int64())),  # training indices in the order they were added
        ("marginals", pa.list_(pa.float64())),  # marginal of order[k] at position k (mean utility)
        ("truncated_at", pa.int64()),  # points actually added; later marginals are 0
        ("v_full", pa.float64()),
        # per-test-point runs only (else null): truncated_at * m values, row k = marginals of order[k]
        ("marginals_per_test", pa.list_(pa.float64())),
    ],
    metadata={"freeshap_ray.schema": f"marginals/{MARGINALS_SCHEMA_VERSION}"},
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
        ("sign_agreement", pa.float64()),  # fraction of random half-splits with the same sign (nan: < 2 samples)
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
    try:
        return pq.read_table(path)
    except (OSError, pa.ArrowException) as err:
        raise OutputError(f"{path}: unreadable ({err}); rerun the kernel stage with --overwrite") from err


def write_duplicates(layout: Layout, dups: Any, label_names) -> Path:
    """Write the examples ``data.dedupe`` dropped (a :class:`~freeshap_ray.data.dedupe.Duplicates`)."""
    labels = np.asarray(dups.labels, dtype=np.int64)
    kept = np.asarray(dups.kept_labels, dtype=np.int64)
    table = pa.table(
        {
            "split": pa.array(list(dups.split), pa.string()),
            "id": np.asarray(dups.ids, dtype=np.int64),
            "text": pa.array(list(dups.texts), pa.string()),
            "label": labels,
            "label_name": pa.array([label_names[i] for i in labels], pa.string()),
            "reason": pa.array(list(dups.reason), pa.string()),
            "kept_id": np.asarray(dups.kept_ids, dtype=np.int64),
            "kept_text": pa.array(list(dups.kept_texts), pa.string()),
            "kept_label": kept,
            "kept_label_name": pa.array([label_names[i] for i in kept], pa.string()),
            "conflict": labels != kept,
        },
        schema=DUPLICATES_SCHEMA,
    )
    return write_parquet_atomic(table, layout.duplicates)


def read_duplicates(layout: Layout, *, conflicts_only: bool = False) -> pa.Table | None:
    """``duplicates.parquet`` (None if the run did not deduplicate); with ``conflicts_only`` just the rows
    of groups (same ``kept_id``) in which some label differs."""
    path = layout.duplicates
    if not path.is_file():
        return None
    try:
        names = pq.read_schema(path).names
        missing = [n for n in DUPLICATES_SCHEMA.names if n not in names]
        if missing:
            raise OutputError(f"{path}: not a duplicates table (missing columns {missing})")
        if not conflicts_only:
            return pq.read_table(path, columns=DUPLICATES_SCHEMA.names)
        flags = pq.read_table(path, columns=["kept_id", "conflict"])
        groups = pc.unique(pc.filter(flags.column("kept_id"), flags.column("conflict")))
        return pq.read_table(path, columns=DUPLICATES_SCHEMA.names, filters=pc.field("kept_id").isin(groups))
    except (OSError, pa.ArrowException) as err:
        raise OutputError(f"{path}: unreadable ({err}); rerun the kernel stage with --overwrite") from err


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
    try:
        table = pq.read_table(path)
        rows = table.column("row").to_numpy()
        col_start = int(table.column("col_start")[0].as_py())
        flat = np.asarray(table.column("values").combine_chunks().flatten().to_numpy(), dtype=np.float64)
    except (OSError, KeyError, IndexError, pa.ArrowException) as err:
        raise OutputError(f"{path}: missing or unreadable kernel tile ({err}); recompute the kernel "
                          "(--overwrite)") from err
    tail = out.shape[2:]
    width = flat.size // max(len(rows), 1) // max(int(np.prod(tail)), 1)
    if (not len(rows) or flat.size != len(rows) * width * int(np.prod(tail)) or rows[0] < 0
            or rows[-1] >= out.shape[0] or np.any(np.diff(rows) != 1) or col_start < 0
            or col_start + width > out.shape[1]):
        raise KernelError(f"{path}: tile shape does not fit the kernel of shape {out.shape} "
                          f"(rows {rows[:1].tolist()}..{rows[-1:].tolist()}, col_start {col_start}, width {width})")
    if not np.isfinite(flat).all():
        raise KernelError(f"{path}: {int(flat.size - np.isfinite(flat).sum())} non-finite (nan/inf) kernel entries")
    block = flat.reshape(len(rows), -1, *tail)
    cols = slice(col_start, col_start + block.shape[1])
    if symmetric and col_start == rows[0] and block.shape[0] == block.shape[1]:  # a diagonal tile
        mirrored = block.swapaxes(0, 1) if not tail else block.swapaxes(0, 1).swapaxes(2, 3)
        scale = float(np.abs(block).max())
        if float(np.abs(block - mirrored).max()) > 1e-6 * scale:
            raise KernelError(f"{path}: diagonal tile of the train x train kernel is not symmetric")
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
    try:
        info = json.loads(layout.kernel_manifest.read_text())
        n, m, c, kind = info["n_train"], info["n_test"], info["n_classes"], info["kind"]
        info["tiles"]["train_train"], info["tiles"]["test_train"]  # noqa: B018 - presence check
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise OutputError(f"{layout.kernel_manifest}: unreadable or incomplete kernel manifest ({err!r}); "
                          "recompute the kernel (--overwrite)") from err
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
    table = pa.Table.from_pylist([{"sampler": "tmc", "marginals_per_test": None, **r} for r in records],
                                 schema=MARGINALS_SCHEMA)
    return write_parquet_atomic(table, layout.marginals_part(part))


class MarginalsStore:
    """A resumable stream of per-permutation marginals: ``DIR/run.json`` + ``DIR/marginals/part-NNNNN.parquet``.

    Each part holds whole permutations (whole antithetic pairs) and is written atomically, so a killed
    driver leaves only complete parts (temp files start with ``.`` and are ignored). ``run.json``
    records what the marginals are marginals OF (problem digest, utility, sampler, truncation, ...);
    a run whose settings differ must not reuse them.
    """

    def __init__(self, directory: str | Path) -> None:
        self.dir = local_root(directory)  # a URI works in its staging copy (io.remote)
        self.parts_dir = self.dir / "marginals"
        self.run_file = self.dir / "run.json"

    def parts(self) -> list[Path]:
        """Complete part files in index order."""
        if not self.parts_dir.is_dir():
            return []
        return sorted(p for p in self.parts_dir.glob("part-*.parquet") if p.name[5:-8].isdigit())

    def next_part_index(self) -> int:
        parts = self.parts()
        return int(parts[-1].name[5:-8]) + 1 if parts else 0

    def read_run(self) -> dict[str, Any] | None:
        if not self.run_file.is_file():
            return None
        return json.loads(self.run_file.read_text())

    def write_run(self, info: dict[str, Any]) -> None:
        write_json_atomic(info, self.run_file)

    def clear(self) -> None:
        """Remove the run file and every part (a fresh start; under an output URI too)."""
        remove_path(self.parts_dir)
        remove_path(self.run_file)

    def write_part(self, records: list[dict[str, Any]] | pa.Table) -> Path:
        """Write ``records`` (``MARGINALS_SCHEMA`` rows, or a table of that schema) as the next part."""
        table = records if isinstance(records, pa.Table) else pa.Table.from_pylist(records, schema=MARGINALS_SCHEMA)
        return write_parquet_atomic(table, self.parts_dir / f"part-{self.next_part_index():05d}.parquet")

    def read(self, columns: list[str] | None = None) -> pa.Table:
        """All parts as one table (empty, with the schema, when there are none)."""
        parts = self.parts()
        cols = columns or MARGINALS_SCHEMA.names
        if not parts:
            return pa.schema([MARGINALS_SCHEMA.field(c) for c in cols]).empty_table()
        tables = []
        for p in parts:
            t = pq.read_table(p)
            missing = [c for c in cols if c not in t.column_names]
            if missing:
                raise OutputError(f"{p}: not a marginals part of this version (missing columns {missing}); "
                                  f"rerun with --overwrite or shapley.resume=false")
            tables.append(t.select(cols).cast(pa.schema([MARGINALS_SCHEMA.field(c) for c in cols])))
        return pa.concat_tables(tables)

    def iter_parts(self, columns: list[str] | None = None):
        """Yield each part's table (for streaming reads of large per-test marginals)."""
        cols = columns or MARGINALS_SCHEMA.names
        for p in self.parts():
            yield pq.read_table(p, columns=cols)


def write_values(
    layout: Layout,
    examples: pa.Table,
    values: np.ndarray,
    stderr: np.ndarray,
    counts: np.ndarray,
    *,
    per_test: tuple[np.ndarray, np.ndarray] | None = None,
    info: dict[str, Any] | None = None,
    sign_agreement: np.ndarray | None = None,
) -> Path:
    """Write ``values.parquet`` (one row per training example) and, given ``per_test`` = (values, stderr)
    of shape (n, m), ``values_per_test.parquet`` (one row per training × test pair). ``sign_agreement``
    (n,) fills the column of that name (nan when not given)."""
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
            "sign_agreement": (np.full(len(counts), np.nan) if sign_agreement is None
                               else np.asarray(sign_agreement, dtype=np.float64)),
        },
        schema=VALUES_SCHEMA.with_metadata(meta),
    )
    return write_parquet_atomic(table, layout.values)


def read_values(out_dir: str | Path) -> pa.Table:
    path = Layout.of(out_dir).values
    if not path.is_file():
        raise OutputError(f"{path}: missing; run the shapley stage first")
    return pq.read_table(path)
