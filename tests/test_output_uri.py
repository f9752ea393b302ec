"""`output` as a URI (io.remote): staging copy mirrored through pyarrow.fs — file:// (atomic rename),
an in-memory object store (direct PUTs), resume from what is remote, deletions mirrored, and a clear
`output` error for an unreachable s3:// bucket before any data is read."""

from __future__ import annotations

import json
import time

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from freeshap_ray import load_kernel
from freeshap_ray.cli import main
from freeshap_ray.config import load_config
from freeshap_ray.errors import ConfigError
from freeshap_ray.io import Layout, MarginalsStore, remote, remove_path, write_json_atomic

from .helpers import job_args, write_csv


def _files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


@pytest.fixture(autouse=True)
def _closed():
    yield
    remote.close_all()


def test_uri_syntax_is_checked_in_config():
    assert load_config(None, ["output=s3://bucket/runs/a"]).output == "s3://bucket/runs/a"
    for bad, needle in (("ftp://host/x", "unsupported URI scheme"), ("file://host/x", "absolute path"),
                        ("s3:///x", "bucket")):
        with pytest.raises(ConfigError, match="^output: ") as e:
            load_config(None, [f"output={bad}"])
        assert needle in str(e.value)


def test_file_uri_mirror_commit_remove_sync(tmp_path):
    dest = tmp_path / "remote"
    (dest / "kernel").mkdir(parents=True)
    (dest / "kernel" / "plan.json").write_text('{"signature": "s"}')
    (dest / "kernel" / ".tile.parquet.tmp-1234abcd").write_text("partial upload of a killed job")
    uri = dest.as_uri()
    layout = Layout.of(uri)
    staging = layout.root
    assert staging != dest and remote.open_outputs() == {uri: staging}
    assert _files(staging) == ["kernel/plan.json"]  # existing output downloaded, temp files skipped
    assert Layout.of(uri + "/").root == staging  # opened once per process
    write_json_atomic({"a": 1}, layout.manifest)  # committed -> uploaded at once
    assert json.loads((dest / "manifest.json").read_text()) == {"a": 1}
    assert remote.display(layout.manifest) == f"{uri}/manifest.json"
    store = MarginalsStore(uri)  # a URI works for the checkpoint dir too
    assert store.dir == staging
    remove_path(layout.kernel_dir)  # deletion mirrored
    assert not (dest / "kernel").exists()
    (staging / "notes.txt").write_text("bypassed the atomic writers")
    remote.close_all()  # final sync, staging removed
    assert (dest / "notes.txt").read_text() == "bypassed the atomic writers"
    assert not staging.exists() and remote.open_outputs() == {}
    assert not [p for p in dest.rglob(".*.tmp-*") if p.name != ".tile.parquet.tmp-1234abcd"]


def test_opening_a_new_uri_leaves_nothing_behind(tmp_path):
    dest = tmp_path / "new" / "deeper" / "run"
    staging = Layout.of(dest.as_uri()).root  # access + write probe
    assert staging.is_dir() and not (tmp_path / "new").exists()
    remote.close_all()
    assert not (tmp_path / "new").exists() and not staging.exists()


def test_object_store_direct_puts_and_probe(monkeypatch):
    store = pafs._MockFileSystem()  # in-memory, one instance for every open (an object store)
    calls = []

    def fake(uri, *, probe=False):
        calls.append(probe)
        return store, "bucket/run"

    monkeypatch.setattr(remote, "filesystem_from_uri", fake)
    layout = Layout.of("s3://bucket/run")
    assert calls == [True, False]  # access probe with short timeouts, then the job's filesystem
    write_json_atomic({"x": 2}, layout.kernel_plan)
    infos = store.get_file_info(pafs.FileSelector("bucket/run", recursive=True))
    assert sorted(i.path for i in infos if i.type == pafs.FileType.File) == ["bucket/run/kernel/plan.json"]
    remote.close_all()
    layout = Layout.of("s3://bucket/run")  # reopened: downloaded again
    assert json.loads(layout.kernel_plan.read_text()) == {"x": 2}


def test_cli_run_to_file_uri_resumes_and_mirrors_deletions(ray_local, tmp_path):
    csv = write_csv(tmp_path / "train.csv")
    dest = tmp_path / "bucket" / "run"
    uri = dest.as_uri()
    assert main(["run", *job_args(csv, uri)]) == 0
    files = _files(dest)
    for rel in ("manifest.json", "train.parquet", "test.parquet", "kernel/manifest.json", "kernel/plan.json",
                "shapley/run.json", "values.parquet"):
        assert rel in files, rel
    assert any(f.startswith("kernel/train_train/tile-") for f in files)
    assert any(f.startswith("shapley/marginals/part-") for f in files)
    assert not [f for f in files if "/." in f or f.startswith(".")], "temp files left on the remote"
    assert remote.open_outputs() == {}, "staging not closed"
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["config"]["output"] == uri
    values = pq.read_table(dest / "values.parquet").to_pandas()
    assert (values["count"] == 12).all()

    kernel = load_kernel(uri)["train_train"]
    remote.close_all()

    # the Shapley stage was killed: no values, the last marginal part lost -> the rerun resumes from the URI
    (dest / "values.parquet").unlink()
    sorted((dest / "shapley" / "marginals").glob("part-*.parquet"))[-1].unlink()
    assert main(["run", *job_args(csv, uri)]) == 0
    info = json.loads((dest / "manifest.json").read_text())["stages"]
    assert info["shapley"]["n_resumed"] > 0 and info["shapley"]["n_new"] > 0
    again = pq.read_table(dest / "values.parquet").to_pandas()
    np.testing.assert_allclose(again["value"], values["value"], atol=1e-12)  # same permutation ids

    # the kernel stage was killed: no kernel manifest, a tile lost -> only that tile is recomputed
    (dest / "values.parquet").unlink()
    (dest / "kernel" / "manifest.json").unlink()
    sorted((dest / "kernel" / "train_train").glob("tile-*.parquet"))[-1].unlink()
    assert main(["kernel", *job_args(csv, uri)]) == 0
    assert json.loads((dest / "kernel" / "manifest.json").read_text())["tiles_computed"] == 1
    assert not (dest / "shapley").exists()  # stale marginals of the old kernel deleted remotely too
    np.testing.assert_allclose(load_kernel(uri)["train_train"], kernel, rtol=1e-12)
    remote.close_all()
    assert main(["shapley", *job_args(csv, uri)]) == 0

    # finished values at the URI are not overwritten; the error names the URI
    assert main(["shapley", *job_args(csv, uri)]) == 2
    # different settings + --overwrite: the old marginal parts are deleted remotely too
    assert main(["shapley", *job_args(csv, uri, "shapley.n_permutations=4", "shapley.truncation_tol=0"),
                 "--overwrite"]) == 0
    marg = pq.read_table(dest / "shapley" / "marginals").to_pandas()
    assert sorted(marg["perm_id"]) == [0, 1, 2, 3]
    assert (pq.read_table(dest / "values.parquet").to_pandas()["count"] == 4).all()


def test_s3_without_credentials_fails_on_output_first(tmp_path, monkeypatch, capsys):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_REGION", "us-east-1")  # no region lookup request
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws
    monkeypatch.setenv("FREESHAP_RAY_STAGING", str(tmp_path / "staging"))
    t0 = time.perf_counter()
    # the data file does not exist either: the output is checked first, before data or model are loaded
    assert main(["run", *job_args(tmp_path / "missing.csv", "s3://freeshap-ray-no-such-bucket/run")]) == 2
    err = capsys.readouterr().err
    assert "error: output: cannot access s3://freeshap-ray-no-such-bucket/run" in err, err
    assert "credentials" in err and "missing.csv" not in err
    assert time.perf_counter() - t0 < 60
    assert not (tmp_path / "staging").exists() or not any((tmp_path / "staging").iterdir())


def test_projected_run_at_a_uri_is_read_from_its_features(ray_local, tmp_path):
    """A projected run's features are written straight to the output URI (never staged): reading the finished
    run by its URI (explain's reader, and the kernel of the features) finds them there."""
    from freeshap_ray import read_kernel
    from freeshap_ray.io.run import read_finished_run

    csv = write_csv(tmp_path / "train.csv")
    dest = tmp_path / "bucket" / "projected"
    uri = dest.as_uri()
    assert main(["run", *job_args(csv, uri, "kernel.projection_dim=64")]) == 0
    remote.close_all()
    assert any(f.startswith("features/train-") for f in _files(dest))
    run = read_finished_run(uri)
    assert run.projected and run.kernel is None
    assert run.features[0].shape[0] == run.train.num_rows and run.features[1].shape[0] == run.test.num_rows
    phi = run.features[0].astype(np.float64)
    norms = np.linalg.norm(phi, axis=1)  # two float64 dot products of length D: each within D·eps·‖φ‖‖φ'‖
    bound = 2 * phi.shape[1] * np.finfo(np.float64).eps * np.outer(norms, norms)
    assert np.all(np.abs(read_kernel(uri).train_train - phi @ phi.T) <= bound)
