"""The features job (distributed/features_job.py) on the session's local Ray: 2 Ray Data actors × 0.5 CPU, the
tiny random Llama, 6 train + 3 test texts, D = 64, shards of 2 examples (3 train + 2 test shards).

- The stored features are bit for bit what ``KernelWorker.features`` returns in this process for the same shard
  texts: the same code on the same inputs with the same thread count (1) runs the same float operations.
- Their inner products equal the projected kernel job's tiles (``kernel.projection_dim`` set, block size = shard
  size, so both compute the same blocks' features) within the rounding bound of the tiles' float32 GEMMs.
- Resume, the readers (Ray Data, datasets, pandas), a different plan refused, a ``file://`` URI.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from freeshap_ray.config import KernelConfig, ModelConfig
from freeshap_ray.distributed.features_job import compute_features
from freeshap_ray.distributed.kernel_job import KernelInputs
from freeshap_ray.errors import ConfigError, OutputError
from freeshap_ray.grads import param_sizes
from freeshap_ray.io import FeatureStore, Layout, read_kernel
from freeshap_ray.io.features import MANIFEST_NAME
from freeshap_ray.kernel.features import MIXED_CHUNK
from freeshap_ray.kernel.worker import KernelWorker
from freeshap_ray.models import load_classifier, resolve_model_path, select_params

from .helpers import TEMPLATES, TEXTS, run_kernel_job

LABELS = {"train": [1, 0, 1, 0, 1, 0], "test": [1, 0, 1]}
N_SHARDS = 5
U32, U64 = 2.0**-24, 2.0**-53


def gamma(n: int, u: float) -> float:
    """Higham's γ_n = n·u/(1 − n·u): |fl(Σ_{i≤n} x_i y_i) − Σ x_i y_i| ≤ γ_n Σ |x_i y_i|."""
    return n * u / (1 - n * u)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)  # KernelWorker sets the process's threads


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(path="tiny:llama", template=TEMPLATES["llama"], label_words=("bad", "good"), params="all")
    model_dir = resolve_model_path(cfg.path)
    clf = load_classifier(model_dir, cfg)
    names = select_params(clf, cfg.params)
    return cfg, model_dir, names, param_sizes(clf, names)


def job_of(model, **kernel) -> KernelInputs:
    cfg, model_dir, names, sizes = model
    kc = KernelConfig(**{"num_actors": 2, "num_cpus_per_actor": 0.5, "projection_dim": 64, "feature_shard_rows": 2,
                         "block_size": 2, **kernel})
    return KernelInputs(TEXTS[:6], TEXTS[6:], model_dir, cfg, kc, names, sizes)


@pytest.fixture(scope="module")
def ref(ray_local, model, tmp_path_factory):
    """One uninterrupted run per kind: kind -> (store, stats)."""
    out = {}
    for kind in ("first_logit", "full"):
        store = FeatureStore.of(tmp_path_factory.mktemp(f"features-{kind}"))
        out[kind] = (store, compute_features(job_of(model, kind=kind), store, labels=LABELS, progress=False))
    return out


def wait_for_free_cpus(timeout: float = 60.0) -> None:
    import ray

    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] - 1e-9:
        assert time.monotonic() < deadline, f"CPUs still held after {timeout} s: {ray.available_resources()}"
        time.sleep(0.2)


@pytest.mark.parametrize("kind", ["first_logit", "full"])
def test_features_equal_in_process_worker(ref, model, kind):
    store, stats = ref[kind]
    assert (stats["shards_computed"], stats["shards_skipped"], stats["rows_computed"]) == (N_SHARDS, 0, 9)
    assert sum(stats["nodes"].values()) == N_SHARDS and stats["rows_per_second"] > 0
    job = job_of(model, kind=kind)
    worker = KernelWorker(job.model_dir, job.model, job.kernel)
    c = 1 if kind == "first_logit" else 2
    assert stats["dim"] == worker.projection.dim
    for split, texts in (("train", job.train_texts), ("test", job.test_texts)):
        phi, y = store.read_matrix(split)
        want = np.concatenate([worker.features(texts[s:s + 2]) for s in range(0, len(texts), 2)])
        assert phi.shape == (len(texts) * c, worker.projection.dim) and phi.dtype == np.float32
        np.testing.assert_array_equal(phi, want)
        np.testing.assert_array_equal(y, LABELS[split])


@pytest.mark.parametrize("kind", ["first_logit", "full"])
def test_inner_products_equal_projected_kernel(ref, model, kind, tmp_path):
    """K from the kernel job (float32 GEMMs over ≤ MIXED_CHUNK columns summed in float64) vs G = ⟨φ, φ'⟩ in float64
    from the stored features (the same floats: same blocks, same code):
    |K − G| ≤ (γ_k(f32) + γ_D(f64) + γ_{⌈D/k⌉}(f64))·(|Φ||Φ'|ᵀ), k = min(D, MIXED_CHUNK)."""
    store, _ = ref[kind]
    layout = Layout(tmp_path)
    run_kernel_job(job_of(model, kind=kind), layout, progress=False)
    kernel = read_kernel(tmp_path)
    train, _ = store.read_matrix("train")
    test, _ = store.read_matrix("test")
    d = train.shape[1]
    k = min(d, MIXED_CHUNK)
    bound = gamma(k, U32) + gamma(d, U64) + gamma(math.ceil(d / k), U64)
    c = 1 if kind == "first_logit" else 2

    def gram(a, b):
        g = a.astype(np.float64) @ b.astype(np.float64).T
        return g if c == 1 else g.reshape(len(a) // c, c, len(b) // c, c).transpose(0, 2, 1, 3)

    for got, rows in ((kernel.train_train, train), (kernel.test_train, test)):
        want, scale = gram(rows, train), gram(np.abs(rows), np.abs(train))
        assert got.shape == want.shape
        assert np.all(np.abs(got - want) <= bound * scale), float(np.max(np.abs(got - want) / scale))
        assert np.abs(want).max() > 0


def test_resume_computes_only_missing_shards(ref, model, tmp_path):
    """Interrupted after the first shard (the hook raises on the driver): only whole shards are left, no manifest,
    the actors are gone. The rerun computes just the missing shards; after deleting two shards a rerun computes
    those two. The result equals the uninterrupted run's."""

    class Stop(Exception):
        pass

    def stop(status, done):
        if done == 1:
            raise Stop

    job = job_of(model)
    store = FeatureStore(tmp_path / "features")
    with pytest.raises(Stop):
        compute_features(job, store, labels=LABELS, progress=False, on_shard=stop)
    present = store.shard_names()
    assert 1 <= len(present) <= N_SHARDS and MANIFEST_NAME not in store.names()
    assert not [p for p in (tmp_path / "features").iterdir() if p.name.startswith(".")]  # no temp files left
    wait_for_free_cpus()
    with pytest.raises(OutputError, match=MANIFEST_NAME):
        store.read_matrix("train")
    stats = compute_features(job, store, labels=LABELS, progress=False)
    assert (stats["shards_computed"], stats["shards_skipped"]) == (N_SHARDS - len(present), len(present))
    for name in ("train-00000002.parquet", "test-00000000.parquet"):
        (tmp_path / "features" / name).unlink()
    stats = compute_features(job, store, labels=LABELS, progress=False)
    assert (stats["shards_computed"], stats["shards_skipped"], stats["rows_computed"]) == (2, 3, 4)
    again = compute_features(job, store, labels=LABELS, progress=False)
    assert again["reused"] is True and again["shards_computed"] == 2  # finished: nothing recomputed
    want = ref["first_logit"][0]
    for split in ("train", "test"):
        for got_arr, want_arr in zip(store.read_matrix(split), want.read_matrix(split)):
            np.testing.assert_array_equal(got_arr, want_arr)


def test_killed_actor_is_restarted_and_its_shards_redone(ref, model, tmp_path):
    """The actor that wrote the first shard is SIGKILLed (it has the next shard queued): Ray Data restarts it
    (kernel.max_restarts) and retries its calls; every shard is written once more or for the first time and the
    result equals the uninterrupted run's."""
    import os
    import signal

    killed = []

    def kill(status, done):
        if done == 1:
            killed.append(int(status["pid"]))
            os.kill(killed[0], signal.SIGKILL)

    store = FeatureStore(tmp_path / "features")
    stats = compute_features(job_of(model), store, labels=LABELS, progress=False, on_shard=kill)
    assert killed and stats["shards_computed"] == N_SHARDS and sum(stats["nodes"].values()) >= N_SHARDS
    assert not store.names(hidden=True)  # a temp file of a write cut short is removed by finish
    for split in ("train", "test"):
        np.testing.assert_array_equal(store.read_matrix(split)[0], ref["first_logit"][0].read_matrix(split)[0])


def test_lost_pass_reruns_the_missing_shards(ref, model, tmp_path, monkeypatch):
    """When Ray Data gives up (here: the first pass raises RayActorError after one shard) the missing shards are
    run again, at most kernel.max_restarts times."""
    import ray

    from freeshap_ray.distributed import features_job

    real, passes = features_job._statuses, []

    def flaky(job, store, plan, todo, texts, labels):
        # the first pass runs only its first shard, then fails (running all of them, the actors could write every
        # shard before the driver sees the first status: nothing would be missing)
        passes.append(len(todo))
        first = len(passes) == 1
        for status in real(job, store, plan, todo[:1] if first else todo, texts, labels):
            yield status
            if first:
                raise ray.exceptions.RayActorError()

    monkeypatch.setattr(features_job, "_statuses", flaky)
    store = FeatureStore(tmp_path / "a")
    stats = compute_features(job_of(model, max_restarts=1), store, labels=LABELS, progress=False)
    assert passes == [N_SHARDS, N_SHARDS - 1]
    assert (stats["reruns"], stats["shards_computed"]) == (1, N_SHARDS)
    np.testing.assert_array_equal(store.read_matrix("train")[0], ref["first_logit"][0].read_matrix("train")[0])
    passes.clear()
    with pytest.raises(ray.exceptions.RayActorError):  # max_restarts 0: no rerun
        compute_features(job_of(model, max_restarts=0), FeatureStore(tmp_path / "b"), labels=LABELS, progress=False)
    assert len(passes) == 1


def test_readers_see_the_same_rows(ref, tmp_path):
    """Ray Data, datasets and pandas read the directory (they skip _plan.json/_manifest.json) as one table."""
    import datasets
    import pandas as pd
    import ray

    store, stats = ref["full"]
    root = store.root
    want = {s: store.read_matrix(s) for s in ("train", "test")}
    width = stats["dim"] * 2

    def check(split, row_id, label, feats):
        order = np.lexsort((np.asarray(row_id), np.asarray(split)))  # test rows first, then train
        split, row_id, label = np.asarray(split)[order], np.asarray(row_id)[order], np.asarray(label)[order]
        feats = np.stack([np.asarray(feats[i], dtype=np.float32) for i in order])
        assert list(split) == ["test"] * 3 + ["train"] * 6 and list(row_id) == [0, 1, 2, 0, 1, 2, 3, 4, 5]
        assert feats.shape == (9, width)
        for s, sl in (("test", slice(0, 3)), ("train", slice(3, 9))):
            np.testing.assert_array_equal(feats[sl].reshape(-1, width // 2), want[s][0])
            np.testing.assert_array_equal(label[sl], want[s][1])

    df = pd.read_parquet(root)
    check(df["split"], df["row_id"], df["label"], list(df["features"]))
    rows = ray.data.read_parquet(root).take_all()
    check([r["split"] for r in rows], [r["row_id"] for r in rows], [r["label"] for r in rows],
          [r["features"] for r in rows])
    hf = datasets.load_dataset("parquet", data_files=f"{root}/*.parquet", split="train", cache_dir=str(tmp_path))
    check(hf["split"], hf["row_id"], hf["label"], hf.with_format("numpy")["features"])


def test_other_plan_refused_and_bad_settings(ref, model):
    store, _ = ref["first_logit"]
    with pytest.raises(OutputError, match=rf"{MANIFEST_NAME}: features of a different plan \(projection_seed=0"):
        compute_features(job_of(model, projection_seed=1), store, labels=LABELS, progress=False)
    with pytest.raises(ConfigError, match="^kernel.param_shards: "):
        compute_features(job_of(model, param_shards=2), store, labels=LABELS, progress=False)
    with pytest.raises(ConfigError, match="^kernel.projection_dim: "):
        compute_features(job_of(model, projection_dim=0), store, labels=LABELS, progress=False)


def test_file_uri_written_by_the_workers(ref, model, tmp_path):
    uri = (tmp_path / "run").as_uri()
    store = FeatureStore.of(uri)
    stats = compute_features(job_of(model), store, labels=LABELS, progress=False)
    assert stats["shards_computed"] == N_SHARDS
    assert sorted(p.name for p in (tmp_path / "run" / "features").iterdir()) == sorted(
        [MANIFEST_NAME, "_plan.json", "train-00000000.parquet", "train-00000002.parquet", "train-00000004.parquet",
         "test-00000000.parquet", "test-00000002.parquet"])
    for split in ("train", "test"):
        np.testing.assert_array_equal(store.read_matrix(split)[0], ref["first_logit"][0].read_matrix(split)[0])


def test_unplaceable_actors_are_a_config_error(ray_local, model, tmp_path, monkeypatch):
    """Actors that need a resource no node has: a ConfigError naming the key once the start timeout passes (no
    hang), the pending actors released."""
    from freeshap_ray.distributed import features_job

    monkeypatch.setattr(features_job, "ACTOR_START_TIMEOUT_S", 3)
    job = job_of(model, resources_per_actor={"no_such_slot": 1})
    with pytest.raises(ConfigError, match=r"^kernel.num_actors: 2 feature actors .*\{'no_such_slot': 1\} each did "
                                          r"not start within 3 s"):
        compute_features(job, FeatureStore(tmp_path / "features"), labels=LABELS, progress=False)
    wait_for_free_cpus()
