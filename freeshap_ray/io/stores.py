"""Schemas and readers/writers of every table a run produces (Parquet readable by pandas, datasets, Ray Data)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
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
from ..utility import RegressionProblem
from ..valuation.sinks import Batch, StoredMarginals
from .samples import read_sample_table, sample_table

log = logging.getLogger(__name__)

__all__ = [
    "DUPLICATES_SCHEMA",
    "EXAMPLES_SCHEMA",
    "Kernel",
    "read_kernel",
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
    "KernelStore",
    "write_kernel_tile",
    "marginals_table",
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


@dataclass(frozen=True, eq=False)
class Kernel:
    """A finished kernel stage (what ``kernel/`` holds), assembled in memory.

    Attributes:
        train_train: ``(n, n)`` float64 for ``first_logit``, ``(n, n, C, C)`` for ``full``.
        test_train: ``(m, n)`` or ``(m, n, C, C)``.
        kind: ``first_logit`` or ``full``.
        n_classes: C.
        manifest: the kernel manifest (sizes, parameter count, tiles, timings, condition number).
    """

    train_train: np.ndarray
    test_train: np.ndarray
    kind: str
    n_classes: int
    manifest: dict[str, Any]

    @property
    def n_params(self) -> int:
        return int(self.manifest.get("n_params", 0))

    @property
    def condition_number(self) -> float | None:
        """Of the first-logit train×train kernel (recorded by the kernel stage); None when it is numerically
        singular (``manifest["numerical_rank_first_logit"]`` says how far) or was not recorded."""
        return self.manifest.get("condition_number_first_logit")

    @property
    def first_logit_train(self) -> np.ndarray:
        """``(n, n)``: the train×train kernel of the first label logit (for ``full``, its (0, 0) blocks)."""
        return self.train_train if self.kind == "first_logit" else self.train_train[..., 0, 0]

    def problem(self, y_train: np.ndarray, y_test: np.ndarray, *, lam: float, kernel_divisor: float) -> RegressionProblem:
        """The kernel-regression problem of this kernel with these labels."""
        return RegressionProblem.from_kernels(self.train_train, self.test_train, y_train, y_test,
                                              n_classes=self.n_classes, lam=lam, kernel_divisor=kernel_divisor)

    def as_mapping(self) -> dict[str, Any]:
        """The mapping :func:`load_kernel` returns (``train_train``/``test_train``, or ``..._full``, + kind, manifest)."""
        suffix = "" if self.kind == "first_logit" else "_full"
        return {"kind": self.kind, "manifest": self.manifest, "train_train" + suffix: self.train_train,
                "test_train" + suffix: self.test_train}


class KernelStore:
    """The kernel stage's files: ``plan.json``, the tiles (written as they are reduced), the manifest (last).

    A kernel directory without its manifest is unfinished; its tiles belong to the plan in ``plan.json``.
    """

    def __init__(self, layout: Layout) -> None:
        self.layout = layout

    def begin(self, plan: dict[str, Any], *, resume: bool) -> None:
        """Record the plan the tiles belong to; without ``resume`` remove the tiles of an earlier plan first."""
        if not resume:
            for matrix in ("train_train", "test_train"):
                d = self.layout.kernel_dir / matrix
                for f in d.glob("*.parquet") if d.is_dir() else ():
                    f.unlink()
        write_json_atomic(plan, self.layout.kernel_plan)

    def resumable(self, signature: str, overwrite: bool) -> bool:
        """Whether the tiles already here belong to the plan ``signature`` (resume) or must be discarded.

        Raises:
            OutputError: an unfinished kernel of a different plan is there and ``overwrite`` is off.
        """
        plan = self.layout.kernel_plan
        if not plan.is_file():
            return False
        try:
            old = json.loads(plan.read_text()).get("signature")
        except (OSError, ValueError, AttributeError) as err:
            raise OutputError(f"output: {plan} is unreadable ({err}); pass --overwrite to discard the "
                              "unfinished kernel") from err
        if old == signature:
            return not overwrite
        if not overwrite:
            raise OutputError(f"output: {self.layout.kernel_dir} holds an unfinished kernel of a different "
                              "config/data; pass --overwrite to discard it")
        return False

    def finished_signature(self) -> str | None:
        """The plan signature of a finished kernel here (None: no finished kernel).

        Raises:
            OutputError: the manifest is unreadable.
        """
        path = self.layout.kernel_manifest
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text()).get("signature")
        except (OSError, ValueError, AttributeError) as err:
            raise OutputError(f"output: {path} is unreadable ({err}); pass --overwrite to recompute the kernel") from err

    def has_tile(self, matrix: str, name: str) -> bool:
        return self.layout.kernel_tile(matrix, name).is_file()

    def write_tile(self, matrix: str, name: str, row_start: int, col_start: int, tile: np.ndarray) -> Path:
        return write_kernel_tile(self.layout, matrix, name, row_start, col_start, tile)

    def assemble(self, info: dict[str, Any]) -> Kernel:
        """The kernel whose tiles ``info`` lists (sizes, kind, classes, ``tiles``), every tile checked."""
        n, m, c, kind = info["n_train"], info["n_test"], info["n_classes"], info["kind"]
        tail = () if kind == "first_logit" else (c, c)
        out = {}
        for matrix, rows in (("train_train", n), ("test_train", m)):
            arr = np.full((rows, n, *tail), np.nan)
            for name in info["tiles"][matrix]:
                _fill(arr, self.layout.kernel_tile(matrix, name), symmetric=matrix == "train_train")
            if np.isnan(arr).any():
                raise OutputError(f"{self.layout.kernel_dir / matrix}: tiles missing; recompute the kernel")
            out[matrix] = arr
        return Kernel(out["train_train"], out["test_train"], kind, int(c), info)

    def finish(self, info: dict[str, Any]) -> Path:
        """Mark the kernel complete: the manifest, written last, after every tile."""
        return write_json_atomic({"schema_version": SCHEMA_VERSION, **info}, self.layout.kernel_manifest)

    def read(self) -> Kernel:
        """The finished kernel (errors name the manifest or tile file). For a projected run (features, no tiles)
        it is ``⟨φ(x), φ(x')⟩`` of the stored features, formed here: n×n, for small n or explicit use."""
        info = self.manifest()
        if info.get("representation") == "features":
            return _kernel_of_features(self.layout, info)
        return self.assemble(info)

    def manifest(self) -> dict[str, Any]:
        """The finished kernel's manifest (an error naming it when missing, unreadable or incomplete)."""
        path = self.layout.kernel_manifest
        if not path.is_file():
            raise OutputError(f"{path}: missing; the kernel stage has not finished in {self.layout.root}")
        try:
            info = json.loads(path.read_text())
            info["n_train"], info["n_test"], info["n_classes"], info["kind"]  # noqa: B018 - presence check
            info["tiles"]["train_train"], info["tiles"]["test_train"]  # noqa: B018
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise OutputError(f"{path}: unreadable or incomplete kernel manifest ({err!r}); "
                              "recompute the kernel (--overwrite)") from err
        return info


def rows_per_example(info: dict[str, Any]) -> int:
    """Feature rows (and kernel rows) per example of a kernel manifest: ``C`` for the full kernel, else 1."""
    return int(info["n_classes"]) if info["kind"] == "full" else 1


def _kernel_of_features(layout: Layout, info: dict[str, Any]) -> Kernel:
    from .features import FeatureStore

    from ..kernel.ntk import feature_kernel

    fs = FeatureStore.of(layout.root)
    c = rows_per_example(info)
    (a, _), (b, _) = fs.read_matrix("train"), fs.read_matrix("test")
    return Kernel(feature_kernel(a, a, c), feature_kernel(b, a, c), info["kind"], int(info["n_classes"]), info)


def read_kernel(out_dir: str | Path) -> Kernel:
    """Assemble the kernel a run wrote under ``out_dir`` (every tile checked; errors name the file)."""
    return KernelStore(Layout.of(out_dir)).read()


def load_kernel(out_dir: str | Path) -> dict[str, Any]:
    """Assemble the kernel written by a run, as a mapping (kept for existing users; :func:`read_kernel` returns
    the typed :class:`Kernel`, the preferred call).

    Returns:
        ``{"train_train": (n, n), "test_train": (m, n)}`` float64 arrays for the first-logit kernel, or
        ``{"train_train_full": (n, n, C, C), "test_train_full": (m, n, C, C)}`` for the full kernel, plus
        ``"kind"`` and ``"manifest"``.
    """
    return read_kernel(out_dir).as_mapping()


# --------------------------------------------------------------------------------------------------
# Shapley


def _list_array(rows: list[np.ndarray], dtype) -> pa.Array:
    """Arrow ``list<dtype>`` array from numpy rows without going through Python lists."""
    lengths = np.array([r.size for r in rows], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32 if lengths.sum() < 2**31 else np.int64)
    values = np.concatenate([np.asarray(r, dtype=dtype).ravel() for r in rows]) if rows else np.zeros(0, dtype)
    if offsets.dtype == np.int64:
        return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values)).cast(
            pa.list_(pa.from_numpy_dtype(np.dtype(dtype))))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def marginals_table(batch: Batch, seed: int, sampler: str, per_test_point: bool) -> pa.Table:
    """One batch as a ``MARGINALS_SCHEMA`` table (per-test marginals only for the first ``truncated_at`` positions)."""
    perms = [r.permutation for _, r in batch]
    means = [(r.marginals.mean(axis=1) if r.marginals.ndim == 2 else r.marginals)[r.permutation] for _, r in batch]
    cols = {
        "perm_id": pa.array([int(pid) for pid, _ in batch], pa.int64()),
        "seed": pa.array([int(seed)] * len(batch), pa.int64()),
        "sampler": pa.array([sampler] * len(batch), pa.string()),
        "order": _list_array(perms, np.int64),
        "marginals": _list_array(means, np.float64),
        "truncated_at": pa.array([int(r.truncated_at) for _, r in batch], pa.int64()),
        "v_full": pa.array([float(r.v_full) for _, r in batch], pa.float64()),
    }
    if per_test_point:
        cols["marginals_per_test"] = _list_array(
            [r.marginals[r.permutation[: r.truncated_at]] for _, r in batch], np.float64)
    else:
        cols["marginals_per_test"] = pa.nulls(len(batch), pa.list_(pa.float64()))
    return pa.table(cols, schema=MARGINALS_SCHEMA)


def _flat(column: pa.ChunkedArray, dtype) -> np.ndarray:
    return np.asarray(column.combine_chunks().flatten().to_numpy(), dtype=dtype)


class MarginalsStore:
    """A resumable stream of per-permutation marginals on disk: ``DIR/run.json`` + ``DIR/marginals/part-NNNNN.parquet``.

    A :class:`~freeshap_ray.valuation.sinks.MarginalsSink`. Each part holds whole permutations (whole antithetic
    pairs) and is written atomically, so a killed driver leaves only complete parts (temp files start with ``.``
    and are ignored). ``run.json`` records what the marginals are marginals OF (problem digest, utility, sampler,
    truncation, ...); a run whose settings differ must not reuse them: :meth:`open` refuses it, or discards the
    stored marginals when the store was made with ``discard_mismatched`` (``--overwrite``).
    """

    def __init__(self, directory: str | Path, *, discard_mismatched: bool = False) -> None:
        self.dir = local_root(directory)  # a URI works in its staging copy (io.remote)
        self.parts_dir = self.dir / "marginals"
        self.run_file = self.dir / "run.json"
        self.discard_mismatched = discard_mismatched

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

    def clear(self) -> None:
        """Remove the run file and every part (a fresh start; under an output URI too)."""
        remove_path(self.parts_dir)
        remove_path(self.run_file)

    def open(self, key: dict[str, Any], *, resume: bool) -> dict[str, Any]:
        """Start or resume the run of ``key``; stored samples of another key are refused (or discarded).

        Returns:
            The run's annotations (``run.json``'s ``"extra"``: e.g. the stratified plans), or ``{}``.
        """
        key = {"marginals_schema": MARGINALS_SCHEMA_VERSION, **key}
        if not resume:
            self.clear()
        stored = self.read_run()
        extra = stored.pop("extra", {}) if stored is not None else {}
        if stored is None and self.parts():
            if not self.discard_mismatched:
                raise OutputError(f"{self.parts_dir}: marginals without {self.run_file.name} (an older or foreign "
                                  "run) cannot be checked; pass --overwrite (or set shapley.resume=false) to discard them")
            self.clear()
        if stored is not None and stored != key:
            if self.parts() and not self.discard_mismatched:
                diff = [k for k in [*key, *stored] if stored.get(k) != key.get(k)][0]
                raise OutputError(
                    f"{self.run_file}: the stored marginals were computed with {diff}={stored.get(diff)!r}, this "
                    f"run has {diff}={key.get(diff)!r}; pass --overwrite (or set shapley.resume=false) to discard them")
            log.warning("%s: discarding stored marginals made with different settings", self.dir)
            self.clear()
            extra = {}
        self._key = key
        write_json_atomic({**key, "extra": extra} if extra else key, self.run_file)
        return extra

    def annotate(self, extra: dict[str, Any]) -> None:
        """Record ``extra`` in ``run.json`` (not part of the key: what the sample ids mean)."""
        stored = self.read_run() or {}
        write_json_atomic({**getattr(self, "_key", stored), "extra": {**stored.get("extra", {}), **extra}},
                          self.run_file)

    def write_samples(self, family: str, seed: int, records: list) -> None:
        """Write one batch of ``stratified`` or ``msr`` records as the next part."""
        self.write_part(sample_table(family, seed, records))

    def samples(self, family: str, n: int, m: int | None) -> list[tuple[int, Any]]:
        """Every stored ``(seed, record)`` of ``family``, part by part."""
        out = []
        for path in self.parts():
            out += read_sample_table(family, pq.read_table(path), n, m, path)
        return out

    def write(self, batch: Batch, seed: int, sampler: str, per_test_point: bool) -> None:
        """Write one batch as the next part."""
        self.write_part(marginals_table(batch, seed, sampler, per_test_point))

    def write_part(self, table: pa.Table) -> Path:
        """Write a ``MARGINALS_SCHEMA`` table as the next part."""
        return write_parquet_atomic(table, self.parts_dir / f"part-{self.next_part_index():05d}.parquet")

    def read(self, columns: list[str] | None = None) -> pa.Table:
        """All permutation parts as one table (empty, with the schema, when there are none)."""
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

    def marginals(self, n: int) -> StoredMarginals:
        """Every stored permutation (rows in part order)."""
        t = self.read(["perm_id", "seed", "order", "marginals", "truncated_at"])
        if not t.num_rows:
            return StoredMarginals.empty(n)
        p = t.num_rows
        return StoredMarginals(
            seeds=t.column("seed").to_numpy().astype(np.int64),
            perm_ids=t.column("perm_id").to_numpy().astype(np.int64),
            orders=_flat(t.column("order"), np.int64).reshape(p, n),
            marginals=_flat(t.column("marginals"), np.float64).reshape(p, n),
            truncated_at=t.column("truncated_at").to_numpy().astype(np.int64),
        )

    def per_test_parts(self, n: int, m: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per-test marginals part by part (a part's rows scattered to ``(b, n, m)`` by point index)."""
        for path in self.parts():
            part = pq.read_table(path, columns=["perm_id", "seed", "order", "truncated_at", "marginals_per_test"])
            ids = part.column("perm_id").to_numpy().astype(np.int64)
            seeds = part.column("seed").to_numpy().astype(np.int64)
            orders = _flat(part.column("order"), np.int64).reshape(len(ids), n)
            trunc = part.column("truncated_at").to_numpy()
            cells = part.column("marginals_per_test").combine_chunks()
            out = np.zeros((len(ids), n, m))
            for r in range(len(ids)):
                if not cells[r].is_valid:
                    raise OutputError(f"{path}: permutation {int(ids[r])} has no per-test marginals")
                t = int(trunc[r])
                out[r, orders[r, :t]] = np.asarray(cells[r].values.to_numpy(zero_copy_only=False)).reshape(t, m)
            yield seeds, ids, out


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
