"""Outputs at a URI (``s3://``, ``gs://``, ``hdfs://``, ``abfs://``, ``file://``) through ``pyarrow.fs``.

Design: the job keeps working on a local directory — the *staging* directory — with the same
:class:`~freeshap_ray.io.Layout`, readers and atomic writers as a local run; the remote copy mirrors it:

* opening (the first ``Layout.of(uri)`` of a process) checks that the URI can be reached (and, on an
  object store, written), with short timeouts, and raises a :class:`ConfigError` naming ``output``
  otherwise — before any data or model is loaded; then it downloads what is already there, so a rerun
  resumes exactly as from a local directory;
* every file committed by :func:`~freeshap_ray.io.atomic.atomic_path` (tiles, marginal parts,
  manifests, values, ...) is uploaded right after its local rename and before the writer returns, so
  "persisted before counted" holds for the remote copy too; on a filesystem with atomic rename
  (local, HDFS) the upload goes to a hidden temp name first, on an object store one PUT is atomic;
* deletions made through :func:`~freeshap_ray.io.atomic.remove_path` are applied remotely at once;
* ``features/`` (:data:`DIRECT`) is not mirrored: :class:`~freeshap_ray.io.features.FeatureStore` reads and
  writes it at the URI itself, from every node;
* closing (end of a CLI command, or process exit) uploads anything changed that bypassed the
  hooks, deletes remote files removed locally, and deletes the staging directory.

Staging directories live under ``$FREESHAP_RAY_STAGING`` (default: the system temp dir /
``freeshap_ray-staging``); ones left by a killed process on this host are removed on the next open.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ..config.checks import SCHEMES, check_output_uri, is_uri
from ..errors import ConfigError

__all__ = [
    "SCHEMES",
    "RemoteOutput",
    "check_output_uri",
    "close_all",
    "committed",
    "display",
    "filesystem_from_uri",
    "has_atomic_rename",
    "is_uri",
    "local_root",
    "open_outputs",
    "removed",
    "staging_root",
    "uri_of",
]

log = logging.getLogger(__name__)

_OBJECT_STORES = ("s3", "gcs", "abfs", "mock")  # pyarrow type names: no atomic rename, probe with a PUT
_IMPLICIT_DIRS = ("s3", "gcs")  # no directory objects needed (none are created)
_PROBE_NAME = ".freeshap-ray-write-test"
# Top-level directories that their stores read and write at the URI directly (workers on every node write
# there): never downloaded into, nor uploaded from, the staging copy.
DIRECT = ("features",)
_CHUNK = 8 << 20


# --------------------------------------------------------------------------------------------------
# Filesystems


def _query(uri: str) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(urlsplit(uri).query).items()}


def _s3_region(bucket: str, query: dict[str, str]) -> str:
    from pyarrow import fs as pafs

    region = query.get("region") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return region or pafs.resolve_s3_region(bucket)  # a HeadBucket request


def filesystem_from_uri(uri: str, *, probe: bool = False):
    """``(pyarrow FileSystem, path inside it)`` for ``uri``.

    S3 and GCS filesystems are built here (not by ``FileSystem.from_uri``) so that timeouts and
    retries are bounded: short ones for the access check (``probe=True``), pyarrow's defaults for the
    job. Query parameters of the URI are passed on (S3: ``region``, ``endpoint_override``, ``scheme``,
    ``anonymous``; GCS: ``endpoint_override``, ``scheme``, ``anonymous``, ``project_id``).
    """
    from pyarrow import fs as pafs

    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    path = (parts.netloc + "/" + parts.path.strip("/")).strip("/")
    q = _query(uri)
    anonymous = q.get("anonymous", "").lower() in ("1", "true", "yes")
    if scheme == "s3":
        kwargs: dict[str, Any] = {"region": _s3_region(parts.netloc, q), "anonymous": anonymous}
        for k in ("endpoint_override", "scheme"):
            if q.get(k):
                kwargs[k] = q[k]
        if probe:
            kwargs.update(connect_timeout=5, request_timeout=20,
                          retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=2))
        return pafs.S3FileSystem(**kwargs), path
    if scheme in ("gs", "gcs"):
        kwargs = {"anonymous": anonymous, "retry_time_limit": timedelta(seconds=20 if probe else 600)}
        for k in ("endpoint_override", "scheme", "project_id"):
            if q.get(k):
                kwargs[k] = q[k]
        return pafs.GcsFileSystem(**kwargs), path
    return pafs.FileSystem.from_uri(uri)


def _base_type(fs) -> str:
    while hasattr(fs, "base_fs"):  # SubTreeFileSystem
        fs = fs.base_fs
    return fs.type_name


def has_atomic_rename(fs) -> bool:
    """Whether ``fs`` renames atomically (local, HDFS); object stores make a written object visible at once."""
    return _base_type(fs) in ("local", "hdfs")


def _direct(rel: str) -> bool:
    return rel.split("/", 1)[0] in DIRECT


def _credentials_hint(scheme: str) -> str:
    home = Path.home()
    if scheme == "s3":
        keys = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI")
        if not any(os.environ.get(k) for k in keys) and not (home / ".aws").is_dir():
            return (" No AWS credentials were found in the environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                    "AWS_PROFILE, a web-identity token) or in ~/.aws (an instance or pod role may still provide "
                    "them); for a public bucket add ?anonymous=true.")
        return " Check the AWS credentials, region (?region=... or AWS_REGION) and network access."
    if scheme in ("gs", "gcs"):
        if not os.environ.get("GOOGLE_APPLICATION_CREDENTIALS") and not (home / ".config" / "gcloud").is_dir():
            return (" No Google credentials were found (GOOGLE_APPLICATION_CREDENTIALS, ~/.config/gcloud; "
                    "a workload identity may still provide them).")
        return " Check the Google Cloud credentials and network access."
    return ""


# --------------------------------------------------------------------------------------------------
# One mirrored output


def staging_root() -> Path:
    """Where staging directories are made (``$FREESHAP_RAY_STAGING`` or TMP/freeshap_ray-staging)."""
    env = os.environ.get("FREESHAP_RAY_STAGING")
    return Path(env).expanduser() if env else Path(tempfile.gettempdir()) / "freeshap_ray-staging"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_stale(root: Path, host: str) -> None:
    """Remove staging directories of dead processes of this host (a killed job leaves its staging behind)."""
    for d in root.glob(f"{host}-*"):
        pid = d.name[len(host) + 1 :].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


def _is_temp_name(name: str) -> bool:
    return name.startswith(".") and (".tmp-" in name or name.startswith(_PROBE_NAME))


class RemoteOutput:
    """A local staging directory mirrored to ``path`` on the pyarrow filesystem ``fs``."""

    def __init__(self, uri: str, fs, path: str, staging: Path) -> None:
        self.uri, self.fs, self.path, self.staging = uri, fs, path.rstrip("/"), Path(staging)
        self.atomic_rename = has_atomic_rename(fs)
        self.implicit_dirs = _base_type(fs) in _IMPLICIT_DIRS
        self._synced: dict[str, tuple[int, int]] = {}  # rel path -> (size, mtime_ns) of the copy on both sides
        self._dirs: set[str] = set()
        self._complete = False  # download finished: the staging directory is an exact copy
        self._lock = threading.RLock()

    # ---- paths
    def remote(self, rel: str) -> str:
        return f"{self.path}/{rel}" if rel else self.path

    def rel(self, local: str | Path) -> str | None:
        """``local``'s path relative to the staging directory (posix), or None if it is outside."""
        p = Path(os.path.abspath(local))
        if p == self.staging:
            return ""
        try:
            return p.relative_to(self.staging).as_posix()
        except ValueError:
            return None

    def _stat(self, local: Path) -> tuple[int, int]:
        st = local.stat()
        return st.st_size, st.st_mtime_ns

    # ---- transfers
    def download(self) -> int:
        """Copy everything under the URI into the (empty) staging directory. Returns the file count."""
        from pyarrow import fs as pafs

        count = 0
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True, allow_not_found=True))
        for info in infos:
            if info.type != pafs.FileType.File or _is_temp_name(info.base_name):
                continue
            rel = info.path[len(self.path) :].lstrip("/")
            if _direct(rel):
                continue
            dest = self.staging / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            with self.fs.open_input_stream(info.path) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, _CHUNK)
            self._synced[rel] = self._stat(dest)
            count += 1
        self._complete = True
        return count

    def _mkdir(self, remote_dir: str) -> None:
        if remote_dir and remote_dir not in self._dirs and not self.implicit_dirs:
            self.fs.create_dir(remote_dir, recursive=True)
            self._dirs.add(remote_dir)

    def upload(self, local: str | Path) -> None:
        """Copy the committed local file ``local`` to its place under the URI."""
        rel = self.rel(local)
        if rel is None or not rel:
            return
        local = self.staging / rel
        dest = self.remote(rel)
        with self._lock:
            parent = dest.rsplit("/", 1)[0]
            self._mkdir(parent)
            target = f"{parent}/.{dest.rsplit('/', 1)[1]}.tmp-{uuid.uuid4().hex[:8]}" if self.atomic_rename else dest
            try:
                with open(local, "rb") as src, self.fs.open_output_stream(target) as out:
                    shutil.copyfileobj(src, out, _CHUNK)
                if target != dest:
                    self.fs.move(target, dest)
            except BaseException:
                if target != dest:
                    try:
                        self.fs.delete_file(target)
                    except Exception:  # noqa: BLE001 - best effort
                        pass
                raise
            self._synced[rel] = self._stat(local)

    def remove(self, local: str | Path) -> None:
        """Delete the remote counterpart (file or directory) of the deleted local ``local``."""
        from pyarrow import fs as pafs

        rel = self.rel(local)
        if rel is None:
            return
        with self._lock:
            dest = self.remote(rel)
            info = self.fs.get_file_info(dest)
            if info.type == pafs.FileType.Directory:
                self.fs.delete_dir(dest)
                self._dirs = {d for d in self._dirs if d != dest and not d.startswith(dest + "/")}
            elif info.type == pafs.FileType.File:
                self.fs.delete_file(dest)
            for k in [k for k in self._synced if k == rel or k.startswith(rel + "/") or not rel]:
                del self._synced[k]

    def sync(self) -> None:
        """Upload new or changed local files, delete remote files that are gone locally."""
        if not self._complete:
            return
        with self._lock:
            present = set()
            for p in self.staging.rglob("*"):
                if not p.is_file() or _is_temp_name(p.name):
                    continue
                rel = p.relative_to(self.staging).as_posix()
                if _direct(rel):
                    continue
                present.add(rel)
                if self._synced.get(rel) != self._stat(p):
                    self.upload(p)
            for rel in [r for r in self._synced if r not in present]:
                try:
                    self.fs.delete_file(self.remote(rel))
                except FileNotFoundError:
                    pass
                del self._synced[rel]

    def close(self, sync: bool = True) -> None:
        try:
            if sync:
                self.sync()
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)


def _probe_write(fs, path: str, existed: bool) -> None:
    """Write and delete a small file under ``path`` (write permission, before any heavy work); directories
    created for it are removed again, so a job that stops early leaves nothing behind."""
    from pyarrow import fs as pafs

    created = None
    if _base_type(fs) not in _IMPLICIT_DIRS:
        if not existed:
            created = path
            parent = path.rsplit("/", 1)[0] if "/" in path else ""
            while parent and fs.get_file_info(parent).type == pafs.FileType.NotFound:
                created, parent = parent, (parent.rsplit("/", 1)[0] if "/" in parent else "")
        fs.create_dir(path, recursive=True)
    probe = f"{path}/{_PROBE_NAME}-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open_output_stream(probe) as out:
            out.write(b"ok")
        fs.delete_file(probe)
    finally:
        if created:
            fs.delete_dir(created)


def open_output(uri: str) -> RemoteOutput:
    """Check access to ``uri`` and download it into a new staging directory.

    Raises:
        ConfigError: ``output: ...`` when the URI cannot be reached, read or (object stores) written.
    """
    from pyarrow import fs as pafs

    check_output_uri(uri)
    scheme = urlsplit(uri).scheme.lower()
    try:
        fs, path = filesystem_from_uri(uri, probe=True)
        info = fs.get_file_info(path)
    except Exception as err:  # noqa: BLE001 - any failure here is a bad `output`
        raise ConfigError(f"output: cannot access {uri}: {err}.{_credentials_hint(scheme)}") from err
    if info.type == pafs.FileType.File:
        raise ConfigError(f"output: {uri} is a file; give a directory (prefix) URI")
    try:
        _probe_write(fs, path, existed=info.type == pafs.FileType.Directory)
    except Exception as err:  # noqa: BLE001
        raise ConfigError(f"output: cannot write to {uri}: {err}.{_credentials_hint(scheme)}") from err
    try:
        work_fs, work_path = filesystem_from_uri(uri)
    except Exception as err:  # noqa: BLE001
        raise ConfigError(f"output: cannot access {uri}: {err}.{_credentials_hint(scheme)}") from err
    root = staging_root()
    root.mkdir(parents=True, exist_ok=True)
    host = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"
    _sweep_stale(root, host)
    digest = hashlib.sha1(uri.encode()).hexdigest()[:10]
    staging = Path(tempfile.mkdtemp(prefix=f"{host}-{os.getpid()}-{digest}-", dir=root))
    out = RemoteOutput(uri, work_fs, work_path, staging)
    try:
        n = out.download()
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, Exception):
            raise ConfigError(f"output: cannot read {uri}: {err}.{_credentials_hint(scheme)}") from err
        raise
    log.info("output %s: staged in %s (%d existing files downloaded)", uri, staging, n)
    return out


# --------------------------------------------------------------------------------------------------
# Process-wide registry (used by Layout.of and the atomic writers)

_OPEN: dict[str, RemoteOutput] = {}
_LOCK = threading.RLock()


def _key(uri: str) -> str:
    return uri.rstrip("/")


def local_root(output: str | Path) -> Path:
    """The local directory to work in for ``output``: itself for a path; for a URI, its staging
    directory (opened — checked and downloaded — on first use in this process)."""
    if not is_uri(output):
        return Path(output)
    key = _key(str(output))
    with _LOCK:
        out = _OPEN.get(key)
        if out is None:
            out = _OPEN[key] = open_output(key)
        return out.staging


def open_outputs() -> dict[str, Path]:
    """URI -> staging directory of every output open in this process."""
    with _LOCK:
        return {k: v.staging for k, v in _OPEN.items()}


def _owner(path: str | Path) -> RemoteOutput | None:
    if not _OPEN:
        return None
    with _LOCK:
        for out in _OPEN.values():
            if out.rel(path) is not None:
                return out
    return None


def committed(path: str | Path) -> None:
    """Hook: ``path`` was just committed locally; upload it if it is inside a staging directory."""
    out = _owner(path)
    if out is not None:
        out.upload(path)


def removed(path: str | Path) -> None:
    """Hook: ``path`` (file or directory) was just deleted locally; delete its remote counterpart."""
    out = _owner(path)
    if out is not None:
        out.remove(path)


def uri_of(path: str | Path) -> str | None:
    """The output URI location of ``path`` inside a staging directory, or None for any other path."""
    out = _owner(path)
    if out is None:
        return None
    rel = out.rel(path)
    return f"{out.uri}/{rel}" if rel else out.uri


def display(path: str | Path) -> str:
    """``path`` for messages: a staging path is shown as its URI."""
    return uri_of(path) or str(path)


def close_all(sync: bool = True) -> None:
    """Finish every open output (final sync, staging removed). Later use reopens (re-downloads)."""
    with _LOCK:
        items = list(_OPEN.items())
        _OPEN.clear()
    errors = []
    for uri, out in items:
        try:
            out.close(sync=sync)
        except Exception as err:  # noqa: BLE001 - close the others, then report
            errors.append(f"{uri}: {err}")
    if errors:
        raise OSError("output: final upload failed: " + "; ".join(errors))


def _close_at_exit() -> None:
    try:
        close_all()
    except Exception as err:  # noqa: BLE001
        log.error("%s", err)


atexit.register(_close_at_exit)
