"""``OUT/features/``: the projected-features dataset, Parquet shards written by the workers themselves.

```
features/_plan.json                   the plan the shards belong to (written by the driver first)
features/{split}-{first_row:08d}.parquet   one shard: examples [first_row, first_row + shard_rows) of split
features/_manifest.json               written by the driver last, after checking every shard: the dataset is complete
```

The directory is a local path or an output URI (``file://``, ``s3://``, ``gs://``, ... through ``pyarrow.fs``
as in :mod:`freeshap_ray.io.remote`, but accessed directly, not through the driver's staging copy: workers on
any node write their shards there). A shard appears atomically: on a filesystem with rename (local, HDFS) it
is written to a hidden temp name and renamed; on an object store it is one object, visible only once its
upload completes. Files starting with ``_`` or ``.`` are skipped by ``pandas.read_parquet``/pyarrow datasets,
and Ray Data reads only ``*.parquet``, so the directory reads directly as a dataset (see
:mod:`freeshap_ray.io.feature_plan` for the schema).
"""

from __future__ import annotations

import json
import logging
import posixpath
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import OutputError
from .feature_plan import FEATURES_META_KEY, FEATURES_SCHEMA_VERSION, FeaturePlan, ShardSpec, features_schema
from .remote import filesystem_from_uri, has_atomic_rename, is_uri, uri_of

__all__ = ["FeatureStore", "MANIFEST_NAME", "PLAN_NAME"]

log = logging.getLogger(__name__)

PLAN_NAME = "_plan.json"
MANIFEST_NAME = "_manifest.json"
FEATURES_DIR = "features"


class FeatureStore:
    """The features directory of one run; picklable (each process opens its own filesystem).

    Args:
        root: the features directory: a local path (made absolute here, on the driver) or a URI.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = str(root).rstrip("/") if is_uri(root) else str(Path(root).expanduser().absolute())
        self._fs_cache: tuple[Any, str] | None = None

    @classmethod
    def of(cls, output: str | Path) -> FeatureStore:
        """The store under a run's ``output`` (directory or URI): ``output/features``. A run's local staging
        directory (``Layout.of(uri).root``) names its URI: features are never staged (:data:`remote.DIRECT`)."""
        if not is_uri(output):
            output = uri_of(output) or output
        if is_uri(output):
            return cls(str(output).rstrip("/") + "/" + FEATURES_DIR)
        return cls(Path(output) / FEATURES_DIR)

    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.root, "_fs_cache": None}

    def __repr__(self) -> str:
        return f"FeatureStore({self.root!r})"

    # ---- filesystem
    @property
    def _fs(self) -> tuple[Any, str]:
        if self._fs_cache is None:
            if is_uri(self.root):
                self._fs_cache = filesystem_from_uri(self.root)
            else:
                from pyarrow import fs as pafs

                self._fs_cache = (pafs.LocalFileSystem(), Path(self.root).as_posix())
        return self._fs_cache

    def _path(self, name: str) -> str:
        return posixpath.join(self._fs[1], name)

    def where(self, name: str) -> str:
        """A file of the store as users name it (the URI for a URI store), for messages."""
        return f"{self.root}/{name}"

    def names(self, *, hidden: bool = False) -> list[str]:
        """Base names of the files in the directory, sorted (``hidden``: only the temp files ``.*``)."""
        from pyarrow import fs as pafs

        fs, base = self._fs
        infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
        return sorted(i.base_name for i in infos
                      if i.type == pafs.FileType.File and i.base_name.startswith(".") == hidden)

    def shard_names(self) -> list[str]:
        return [n for n in self.names() if n.endswith(".parquet") and not n.startswith("_")]

    def _put(self, name: str, data: bytes | pa.Buffer) -> None:
        """Write one file atomically (temp + rename where the filesystem renames, else one object)."""
        fs, base = self._fs
        dest = self._path(name)
        fs.create_dir(base, recursive=True)
        target = posixpath.join(base, f".{name}.tmp-{uuid.uuid4().hex[:8]}") if has_atomic_rename(fs) else dest
        try:
            with fs.open_output_stream(target) as out:
                out.write(data)
            if target != dest:
                fs.move(target, dest)
        except BaseException:
            if target != dest:
                try:
                    fs.delete_file(target)
                except OSError:
                    pass
            raise

    def _delete(self, name: str) -> None:
        try:
            self._fs[0].delete_file(self._path(name))
        except FileNotFoundError:
            pass

    def _read_json(self, name: str) -> dict[str, Any] | None:
        fs = self._fs[0]
        try:
            with fs.open_input_stream(self._path(name)) as f:
                data = json.loads(f.read().decode())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise OutputError(f"{self.where(name)}: unreadable ({err}); pass --overwrite to discard the "
                              "features") from err
        if not isinstance(data, dict):
            raise OutputError(f"{self.where(name)}: not a features record; pass --overwrite to discard the features")
        return data

    def _write_json(self, name: str, obj: dict[str, Any]) -> None:
        self._put(name, (json.dumps(obj, indent=2, default=str) + "\n").encode())

    # ---- plan and resume
    def clear(self) -> None:
        """Delete every file of the directory (shards, plan, manifest, temp files)."""
        for name in self.names() + self.names(hidden=True):
            self._delete(name)

    def check(self, plan: FeaturePlan, *, overwrite: bool = False) -> str:
        """What the directory holds for ``plan``, read only (call it before any work):

        ``finished`` (a complete dataset of this plan), ``resume`` (shards of an unfinished run of this plan),
        ``new`` (nothing), ``replace`` (files that ``overwrite`` will discard: with it, everything is recomputed).

        Raises:
            OutputError: without ``overwrite``, features of another plan (the message names the file and the
                first differing key), shards without ``_plan.json``, or unreadable records.
        """
        if overwrite:
            return "replace" if self.names() or self.names(hidden=True) else "new"
        for name in (MANIFEST_NAME, PLAN_NAME):
            stored = self._read_json(name)
            if stored is None:
                continue
            key = plan.differs(stored)
            if key is not None:
                raise OutputError(f"{self.where(name)}: features of a different plan ({key}={stored.get(key)!r}, this "
                                  f"run has {plan.record()[key]!r}); pass --overwrite to replace them")
            return "finished" if name == MANIFEST_NAME else "resume"
        if self.shard_names():
            raise OutputError(f"{self.where(PLAN_NAME)}: missing, so the shards in {self.root} cannot be checked; "
                              "pass --overwrite to replace them")
        return "new"

    def begin(self, plan: FeaturePlan, *, overwrite: bool = False) -> bool:
        """Claim the directory for ``plan`` (:meth:`check`, then ``_plan.json``): True if a finished dataset of this
        plan is already there. Shards of an unfinished run of the same plan are kept; ``overwrite`` deletes every
        file first."""
        state = self.check(plan, overwrite=overwrite)
        if state == "finished":
            return True
        if state == "replace":
            self.clear()
        if state != "resume":
            self._write_json(PLAN_NAME, plan.record())
        return False

    def missing_shards(self, plan: FeaturePlan) -> list[ShardSpec]:
        """The shards of ``plan`` with no file yet (a present file is complete: shards appear atomically)."""
        present = set(self.shard_names())
        return [s for s in plan.shards() if s.name not in present]

    def unfinish(self) -> None:
        """Remove the manifest (the dataset is about to change)."""
        self._delete(MANIFEST_NAME)

    # ---- shards
    def write_shard(self, plan: FeaturePlan, spec: ShardSpec, labels: Sequence[int], features: np.ndarray) -> str:
        """Write one shard (called by the workers); returns its location.

        Args:
            plan: the dataset's plan.
            spec: which examples.
            labels: (rows,) int labels.
            features: (rows·C', D) float32, example-major (:meth:`KernelWorker.features`).

        Raises:
            OutputError: this process generates different projections (numpy RNG checksum differs from the
                driver's), or the arrays do not fit ``spec``.
        """
        meta = plan.shard_meta(features.shape[1] if features.ndim == 2 else 0)
        if meta["rng_checksum"] != plan.rng_checksum:
            raise OutputError(f"{self.where(spec.name)}: this process (numpy {np.__version__}) generates different "
                              "projection matrices than the driver; use the same numpy release on every node")
        rows, c = spec.rows, plan.outputs
        labels = np.asarray(labels, dtype=np.int64)
        if features.ndim != 2 or features.shape[0] != rows * c or labels.shape != (rows,):
            raise OutputError(f"{self.where(spec.name)}: features {features.shape} / labels {labels.shape} do not fit "
                              f"{rows} examples × {c} rows")
        flat = np.ascontiguousarray(features, dtype=np.float32).reshape(-1)
        width = c * features.shape[1]
        table = pa.table({
            "row_id": np.arange(spec.start, spec.stop, dtype=np.int64),
            "split": pa.array([spec.split] * rows, pa.string()),
            "label": labels,
            "features": pa.FixedSizeListArray.from_arrays(pa.array(flat), width),
        }, schema=features_schema(width, meta))
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf, compression={"row_id": "zstd", "split": "zstd", "label": "zstd", "features": "none"},
                       use_dictionary=["split"], write_statistics=["row_id", "label"])
        self._put(spec.name, buf.getvalue())
        return self.where(spec.name)

    def _open(self, name: str) -> pq.ParquetFile:
        try:
            return pq.ParquetFile(self._fs[0].open_input_file(self._path(name)))
        except FileNotFoundError as err:
            raise OutputError(f"{self.where(name)}: missing shard (a local output directory must be shared by every "
                              "node that writes shards; use a shared filesystem or an output URI)") from err
        except (OSError, pa.ArrowException) as err:
            raise OutputError(f"{self.where(name)}: unreadable shard ({err}); delete it and rerun") from err

    def _shard_meta(self, name: str, pf: pq.ParquetFile, expected: dict[str, Any]) -> dict[str, Any]:
        """The shard's metadata, checked against ``expected`` (plan record, + ``dim`` when known)."""
        try:
            meta = json.loads(pf.schema_arrow.metadata[FEATURES_META_KEY])
        except (TypeError, KeyError, ValueError) as err:
            raise OutputError(f"{self.where(name)}: not a features shard (no {FEATURES_META_KEY.decode()} "
                              "metadata); delete it and rerun") from err
        for key in sorted(expected, key=lambda k: k == "signature"):  # a named setting before the hash
            want = expected[key]
            if meta.get(key) != want:
                raise OutputError(f"{self.where(name)}: {key}={meta.get(key)!r}, the dataset has {want!r} (a shard of "
                                  "another plan or from a process with another numpy RNG); delete it and rerun")
        return meta

    def finish(self, plan: FeaturePlan, stats: dict[str, Any] | None = None) -> dict[str, Any]:
        """Check every shard's footer (plan, RNG checksum, rows, width), delete temp files left by killed writers
        and write the manifest, last (call it when no writer runs).

        Returns:
            The manifest (:meth:`dataset_info`).
        """
        expected = plan.record()  # with the driver's RNG checksum
        dim = None
        for spec in plan.shards():
            pf = self._open(spec.name)
            meta = self._shard_meta(spec.name, pf, {**expected, **({"dim": dim} if dim is not None else {})})
            dim = int(meta["dim"])
            width = pf.schema_arrow.field("features").type.list_size
            if pf.metadata.num_rows != spec.rows or width != dim * plan.outputs:
                raise OutputError(f"{self.where(spec.name)}: {pf.metadata.num_rows} rows of width {width}, expected "
                                  f"{spec.rows} of {dim * plan.outputs}; delete it and rerun")
        for name in self.names(hidden=True):  # temp files of writers killed mid-write (none is running now)
            self._delete(name)
        splits = {s: {"rows": n, "shards": [x.name for x in plan.shards(s)]} for s, n in plan.sizes}
        manifest = {**plan.record(), "schema": f"features/{FEATURES_SCHEMA_VERSION}", "dim": dim,
                    "width": None if dim is None else dim * plan.outputs, "numpy": np.__version__, "splits": splits,
                    "stats": stats or {}}
        self._write_json(MANIFEST_NAME, manifest)
        return manifest

    # ---- readers
    def dataset_info(self) -> dict[str, Any]:
        """The manifest of the finished dataset: the plan record, ``dim`` (D), ``width`` (D·C'), ``splits``
        (rows and shard names each) and the job's ``stats``.

        Raises:
            OutputError: no manifest (the dataset is unfinished or absent) or an unreadable one.
        """
        info = self._read_json(MANIFEST_NAME)
        if info is None:
            raise OutputError(f"{self.where(MANIFEST_NAME)}: missing; the features in {self.root} are unfinished "
                              "(rerun the job to complete them)")
        return info

    def iter_shards(self, split: str) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Per record batch of each shard of ``split``: (first row, labels (r,), features (r·C', D) float32 view)."""
        info = self.dataset_info()
        if split not in info.get("splits", {}):
            raise OutputError(f"{self.where(MANIFEST_NAME)}: no split {split!r} (has {sorted(info.get('splits', {}))})")
        c, dim = int(info["outputs"]), int(info["dim"])
        expected = {"signature": info["signature"], "rng_checksum": info["rng_checksum"], "dim": dim}
        for name in info["splits"][split]["shards"]:
            pf = self._open(name)
            self._shard_meta(name, pf, expected)
            for batch in pf.iter_batches(columns=["row_id", "label", "features"]):
                rid = batch.column(0).to_numpy()
                feats = batch.column(2)
                if feats.null_count or (len(rid) and np.any(np.diff(rid) != 1)):
                    raise OutputError(f"{self.where(name)}: null features or non-contiguous row ids; delete it "
                                      "and rerun")
                flat = feats.flatten().to_numpy(zero_copy_only=True)
                yield (int(rid[0]) if len(rid) else 0), batch.column(1).to_numpy(), flat.reshape(len(rid) * c, dim)

    def read_matrix(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """The features of ``split`` as one array, filled shard by shard (one copy out of each decoded batch).

        Returns:
            (n·C', D) float32 features (rows example-major: r = i·C' + c) and (n,) int64 labels.

        Raises:
            OutputError: unfinished dataset, or a shard that is missing, of another plan or malformed (named).
        """
        info = self.dataset_info()
        n, c, dim = int(info["splits"].get(split, {}).get("rows", 0)), int(info["outputs"]), int(info["dim"] or 0)
        out = np.empty((n * c, dim), dtype=np.float32)
        labels = np.empty(n, dtype=np.int64)
        filled = 0
        for start, lab, feats in self.iter_shards(split):
            if start != filled:
                raise OutputError(f"{self.where(MANIFEST_NAME)}: {split} rows {filled}.. missing (a shard starts at "
                                  f"{start})")
            out[start * c : start * c + feats.shape[0]] = feats
            labels[start : start + len(lab)] = lab
            filled += len(lab)
        if filled != n:
            raise OutputError(f"{self.where(MANIFEST_NAME)}: {split} has {filled} rows in its shards, {n} expected")
        return out, labels
