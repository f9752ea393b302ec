"""The features store (io/features.py) without Ray: shard layout and schema, the plan check (another plan is
refused unless overwrite), the manifest as the completeness mark, shard checks that name the file, the
object-store write path (one object, no temp, no rename), and ``features/`` left out of the URI staging copy."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from freeshap_ray.config import KernelConfig, ModelConfig
from freeshap_ray.errors import ConfigError, OutputError
from freeshap_ray.grads.projection import rng_checksum
from freeshap_ray.io import FeaturePlan, FeatureStore, ShardSpec, remote
from freeshap_ray.io.features import MANIFEST_NAME, PLAN_NAME
from freeshap_ray.kernel.plan import features_signature

from .helpers import TEXTS

MODEL = ModelConfig(path="tiny:llama", template="{text} sentiment :", label_words=("bad", "good"), params="all")
D = 5  # the store takes any width: these tests write made-up features


def _plan(kind="full", shard_rows=2, **kernel) -> FeaturePlan:
    cfg = KernelConfig(kind=kind, projection_dim=64, feature_shard_rows=shard_rows, **kernel)
    return FeaturePlan.build({"train": TEXTS[:5], "test": TEXTS[5:]}, {"train": [0, 1, 0, 1, 0], "test": [1, 1, 0, 0]},
                             MODEL, cfg)


def _fake(plan: FeaturePlan, spec: ShardSpec) -> np.ndarray:
    """(rows·C', D) float32 features whose values encode (split, row, output, column)."""
    base = 1000.0 * (spec.split == "test")
    rows = np.arange(spec.start, spec.stop).repeat(plan.outputs) * 10 + np.tile(np.arange(plan.outputs), spec.rows)
    return (base + rows[:, None] + np.arange(D)[None, :] / 10).astype(np.float32)


def _write_all(store: FeatureStore, plan: FeaturePlan, labels) -> None:
    for spec in plan.shards():
        store.write_shard(plan, spec, labels[spec.split][spec.start:spec.stop], _fake(plan, spec))


LABELS = {"train": [0, 1, 0, 1, 0], "test": [1, 1, 0, 0]}


@pytest.mark.parametrize("kind", ["first_logit", "full"])
def test_shards_schema_manifest_and_matrix(tmp_path, kind):
    plan = _plan(kind)
    store = FeatureStore.of(tmp_path / "out")
    assert store.check(plan) == "new" and store.begin(plan) is False and store.check(plan) == "resume"
    assert [s.name for s in store.missing_shards(plan)] == [
        "train-00000000.parquet", "train-00000002.parquet", "train-00000004.parquet",
        "test-00000000.parquet", "test-00000002.parquet"]
    _write_all(store, plan, LABELS)
    with pytest.raises(OutputError, match=MANIFEST_NAME):  # not finished: not readable
        store.read_matrix("train")
    info = store.finish(plan, {"shards_computed": 5})
    assert store.missing_shards(plan) == []
    c = plan.outputs
    assert (info["dim"], info["width"], info["outputs"]) == (D, D * c, c)
    assert info["splits"]["test"] == {"rows": 4, "shards": ["test-00000000.parquet", "test-00000002.parquet"]}
    t = pq.read_table(tmp_path / "out" / "features" / "train-00000002.parquet")
    assert t.schema.field("features").type == pa.list_(pa.float32(), D * c)
    assert t.column("row_id").to_pylist() == [2, 3] and t.column("split").to_pylist() == ["train"] * 2
    meta = json.loads(t.schema.metadata[b"freeshap_ray.features"])
    assert meta["rng_checksum"] == rng_checksum(0) and meta["numpy"] == np.__version__
    assert (meta["projection_dim"], meta["projection_seed"], meta["projection_block"], meta["kind"]) == (64, 0, 4, kind)
    for split, n in (("train", 5), ("test", 4)):
        phi, y = store.read_matrix(split)
        want = np.concatenate([_fake(plan, s) for s in plan.shards(split)])
        assert phi.dtype == np.float32 and phi.shape == (n * c, D)
        np.testing.assert_array_equal(phi, want)
        np.testing.assert_array_equal(y, LABELS[split])
    assert store.begin(plan) is True  # finished: reused as is
    assert store.begin(plan, overwrite=True) is False and store.names() == [PLAN_NAME]  # overwrite: recomputed


def test_other_plan_refused_unless_overwrite(tmp_path):
    plan, other = _plan(), _plan(projection_seed=1)
    store = FeatureStore(tmp_path / "features")
    store.begin(plan)
    _write_all(store, plan, LABELS)
    with pytest.raises(OutputError, match=rf"{PLAN_NAME}: features of a different plan \(projection_seed=0"):
        store.begin(other)  # unfinished
    store.finish(plan)
    with pytest.raises(OutputError, match=rf"{MANIFEST_NAME}: features of a different plan \(projection_seed=0"):
        store.begin(other)  # finished
    relabelled = FeaturePlan.build({"train": TEXTS[:5], "test": TEXTS[5:]}, {"train": [1] * 5, "test": [1, 1, 0, 0]},
                                   MODEL, KernelConfig(kind="full", projection_dim=64, feature_shard_rows=2))
    with pytest.raises(OutputError, match=r"\(signature="):  # same settings, other labels
        store.begin(relabelled)
    assert store.check(plan) == "finished" and store.check(other, overwrite=True) == "replace"
    assert store.begin(other, overwrite=True) is False  # overwrite: everything discarded
    assert store.names() == [PLAN_NAME] and len(store.missing_shards(other)) == 5


def test_foreign_or_mismatched_shards_are_named(tmp_path):
    plan = _plan()
    store = FeatureStore(tmp_path / "features")
    store.begin(plan)
    _write_all(store, plan, LABELS)
    (tmp_path / "features" / PLAN_NAME).unlink()
    with pytest.raises(OutputError, match=f"{PLAN_NAME}: missing, so the shards"):
        store.begin(plan)
    store.begin(plan, overwrite=True)
    _write_all(store, plan, LABELS)
    other = _plan(projection_seed=1)  # a shard of another plan slipped in: finish names it
    spec = plan.shards("test")[1]
    store.write_shard(other, spec, [0, 0], _fake(plan, spec))
    with pytest.raises(OutputError, match="test-00000002.parquet: projection_seed=1, the dataset has 0"):
        store.finish(plan)
    with pytest.raises(OutputError, match="do not fit 2 examples × 2 rows"):
        store.write_shard(plan, spec, [0, 0], np.zeros((3, D), np.float32))
    # a process whose numpy generates other matrices refuses to write
    foreign = dataclasses.replace(plan, rng_checksum="0" * 32)
    with pytest.raises(OutputError, match="generates different projection matrices"):
        store.write_shard(foreign, spec, [0, 0], _fake(plan, spec))
    (tmp_path / "features" / spec.name).unlink()
    with pytest.raises(OutputError, match="test-00000002.parquet: missing shard"):
        store.finish(plan)


def test_signature_covers_what_determines_the_shards():
    texts, labels = {"train": TEXTS[:5], "test": TEXTS[5:]}, {"train": [0, 1, 0, 1, 0], "test": [1, 1, 0, 0]}
    cfg = KernelConfig(projection_dim=64)
    sig = features_signature(texts, labels, MODEL, cfg)
    same = [KernelConfig(projection_dim=64, block_size=7, num_actors=3, num_cpus_per_actor=0.5, method="func")]
    changed = [KernelConfig(projection_dim=32), KernelConfig(projection_dim=64, projection_seed=1),
               KernelConfig(projection_dim=64, projection_block=0), KernelConfig(projection_dim=64, kind="full"),
               KernelConfig(projection_dim=64, feature_shard_rows=3)]
    assert all(features_signature(texts, labels, MODEL, c) == sig for c in same)
    assert len({sig, *(features_signature(texts, labels, MODEL, c) for c in changed)}) == 1 + len(changed)
    assert features_signature(texts, {**labels, "test": [1, 1, 0, 1]}, MODEL, cfg) != sig
    assert features_signature({**texts, "test": TEXTS[5:8]}, {**labels, "test": [1, 1, 0]}, MODEL, cfg) != sig
    with pytest.raises(ValueError, match="projection_dim"):
        features_signature(texts, labels, MODEL, KernelConfig())
    with pytest.raises(ConfigError, match="^kernel.feature_shard_rows: must be >= 1"):
        KernelConfig(projection_dim=64, feature_shard_rows=0)


class _Recorder(pafs.FSSpecHandler):
    """An fsspec in-memory filesystem (not local, no atomic rename: an object store to the store) that records
    the output streams opened and the moves made."""

    def __init__(self, fs):
        super().__init__(fs)
        self.opened, self.moved = [], []

    def open_output_stream(self, path, metadata):
        self.opened.append(path)
        return super().open_output_stream(path, metadata)

    def move(self, src, dest):
        self.moved.append((src, dest))
        return super().move(src, dest)


def test_object_store_shard_is_one_object_without_rename(monkeypatch):
    import fsspec.implementations.memory as fsm

    from freeshap_ray.io import features as features_mod

    handler = _Recorder(fsm.MemoryFileSystem())
    fs = pafs.PyFileSystem(handler)
    monkeypatch.setattr(features_mod, "filesystem_from_uri", lambda uri, probe=False: (fs, "/bucket/run/features"))
    store = FeatureStore.of("s3://bucket/run")
    assert store.root == "s3://bucket/run/features"
    plan = _plan(shard_rows=9)
    store.begin(plan)
    spec = plan.shards("train")[0]
    where = store.write_shard(plan, spec, LABELS["train"], _fake(plan, spec))
    assert where == "s3://bucket/run/features/train-00000000.parquet"
    assert handler.opened == ["/bucket/run/features/_plan.json", "/bucket/run/features/train-00000000.parquet"]
    assert handler.moved == []
    import pickle

    clone = pickle.loads(pickle.dumps(store))  # what a worker receives: no filesystem, reopened there
    assert clone.root == store.root and clone._fs_cache is None


def test_features_dir_is_not_mirrored_into_uri_staging(tmp_path):
    from freeshap_ray.io import Layout

    dest = tmp_path / "remote"
    (dest / "features").mkdir(parents=True)
    (dest / "features" / "train-00000000.parquet").write_bytes(b"x" * 100)
    (dest / "manifest.json").write_text("{}")
    try:
        staging = Layout.of(dest.as_uri()).root
        assert (staging / "manifest.json").is_file() and not (staging / "features").exists()
    finally:
        remote.close_all()
    assert (dest / "features" / "train-00000000.parquet").stat().st_size == 100  # the final sync leaves it alone
