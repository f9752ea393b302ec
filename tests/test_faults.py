"""Fault injection on a single node: a Shapley task whose worker process dies, and the driver killed with
SIGKILL (twice) while a ``freeshap-ray run`` is writing its kernel tiles and then its permutations.

(Kernel actors killed, and a node removed, on a multi-node cluster: ``test_multinode.py``.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from freeshap_ray.io import MarginalsStore, load_kernel
from freeshap_ray.utility import RegressionProblem

from .helpers import LABELS, TEXTS, run_kernel_job, run_resumable, session_members, write_csv


def problem(n=10, m=12, d=5, seed=0) -> RegressionProblem:
    rng = np.random.default_rng(seed)
    x, xt = rng.normal(size=(n, d)), rng.normal(size=(m, d))
    w = rng.normal(size=(d, 2))
    y = np.argmax(x @ w + 0.7 * rng.normal(size=(n, 2)), axis=1)
    return RegressionProblem.from_kernels(x @ x.T, xt @ x.T, y, np.argmax(xt @ w, axis=1), lam=0.3,
                                          kernel_divisor=1.0)


def stored_ids(store: MarginalsStore) -> list[tuple[int, int]]:
    t = store.read(["perm_id", "seed"])
    return list(zip(t.column("seed").to_pylist(), t.column("perm_id").to_pylist()))


def kill_once_utility(marker: Path):
    """``neg_ce`` whose first evaluation inside a Ray worker SIGKILLs that worker (the marker file, created
    atomically, makes it happen once across processes). The class is local so cloudpickle ships it by value."""
    from freeshap_ray.utility.metrics import UTILITIES, BuiltinUtility

    base = UTILITIES["neg_ce"]
    driver = os.getpid()

    class KillOnce(BuiltinUtility):
        def batch(self, preds, y, per_test=False):
            if os.getpid() != driver:
                try:
                    fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    pass
                else:
                    os.write(fd, str(os.getpid()).encode())
                    os.close(fd)
                    os.kill(os.getpid(), signal.SIGKILL)
            return super().batch(preds, y, per_test)

    return KillOnce("neg_ce", base._fn, base._empty)


def test_shapley_task_whose_worker_dies_is_retried(ray_local, tmp_path):
    """The worker running one task is SIGKILLed mid-permutation: Ray reruns the task, the run finishes, each
    permutation id is stored exactly once and the values equal an undisturbed run's bit for bit."""
    prob = problem()
    kw = dict(sampler="tmc", n_permutations=30, seed=5, truncation_tol=0.05, permutations_per_task=3,
              num_cpus_per_task=0.5, progress=False)
    whole = run_resumable(prob, MarginalsStore(tmp_path / "whole"), utility="neg_ce", **kw)
    marker = tmp_path / "killed-worker-pid"
    store = MarginalsStore(tmp_path / "killed")
    run = run_resumable(prob, store, utility=kill_once_utility(marker), **kw)
    assert marker.is_file() and int(marker.read_text()) != os.getpid(), "no worker was killed"
    ids = stored_ids(store)
    assert sorted(ids) == [(5, i) for i in range(30)], "a permutation was lost or stored twice"
    assert run.info["n_new"] == 30 and run.info["duplicate_rows_ignored"] == 0
    np.testing.assert_array_equal(run.values.values, whole.values.values)
    np.testing.assert_array_equal(run.values.stderr, whole.values.stderr)


def test_failed_kernel_job_releases_its_actors_and_placement_group(ray_local, tmp_path):
    """A kernel job that raises mid-run (here: its tile hook) kills its actors and removes its placement group,
    so a long-lived driver gets the reserved CPUs back (resuming from the finished tiles: ``test_kernel.py``)."""
    import ray
    from ray.util import placement_group_table

    from freeshap_ray.config import KernelConfig, ModelConfig
    from freeshap_ray.distributed.kernel_job import KernelInputs
    from freeshap_ray.grads import param_sizes
    from freeshap_ray.io import Layout
    from freeshap_ray.models import load_classifier, resolve_model_path, select_params

    class Interrupt(Exception):
        pass

    def interrupt(actors, written):
        if written == 1:
            raise Interrupt

    cfg = ModelConfig(path="tiny:llama", template="{text} sentiment :", label_words=("bad", "good"), params="last:1")
    model_dir = resolve_model_path(cfg.path)
    clf = load_classifier(model_dir, cfg)
    names = select_params(clf, cfg.params)
    kcfg = KernelConfig(block_size=2, num_actors=1, num_cpus_per_actor=0.5)
    layout = Layout.of(tmp_path / "out")
    before = set(placement_group_table())
    cpus = ray.available_resources().get("CPU", 0.0)
    with pytest.raises(Interrupt):
        run_kernel_job(KernelInputs(TEXTS[:4], TEXTS[4:6], model_dir, cfg, kcfg, names, param_sizes(clf, names)),
                       layout, progress=False, on_tile=interrupt)
    new = {k: v for k, v in placement_group_table().items() if k not in before}
    assert len(new) == 1 and all(v["state"] == "REMOVED" for v in new.values()), new
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0.0) < cpus and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0.0) >= cpus


# ---- the driver killed ---------------------------------------------------------------------------------

N_PERMUTATIONS = 120
N_TILES = 21 + 18  # blocks of one example: 6 train -> 21 lower-triangular train x train tiles, 3 test -> 18


def _reap(sid: int) -> None:
    """After the driver died: its embedded Ray (GCS, raylet, workers) exits with it within a few seconds, Ray's
    dashboard and runtime-env agents up to a minute later; whatever of the session (our own subprocess's) is
    left after a second is killed."""
    deadline = time.monotonic() + 1
    while session_members(sid) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in session_members(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _cli(config: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)  # embedded Ray
    return subprocess.Popen([sys.executable, "-m", "freeshap_ray.cli", "run", str(config), "--no-progress"],
                            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _kill_when(config: Path, log: Path, ready, what: str) -> None:
    """Run the CLI; SIGKILL its (driver) process as soon as ``ready()`` holds."""
    proc = _cli(config, log)
    try:
        deadline = time.monotonic() + 300
        while not ready():
            assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before {what}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no {what} after 300 s:\n{log.read_text()}"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _reap(proc.pid)


def test_killed_driver_resumes_with_the_same_command(ray_local, tmp_path, capsys):
    """``freeshap-ray run CONFIG`` (a subprocess with embedded Ray) is SIGKILLed once kernel tiles are on disk,
    rerun and SIGKILLed again once permutations are on disk, then rerun to the end (the same command, run in
    this process on the session's Ray to save a third Ray start). The second run computes only the missing
    tiles, the third reuses the kernel and only runs missing permutations; the kernel equals an uninterrupted
    run's, every permutation id is stored exactly once, and the values are identical."""
    from freeshap_ray.cli import main
    from freeshap_ray.config import load_config
    from freeshap_ray.pipeline import run_job

    n = 6
    train = write_csv(tmp_path / "train.csv", TEXTS[:n], LABELS[:n])
    test = write_csv(tmp_path / "test.csv", TEXTS[n:], LABELS[n:])
    out = tmp_path / "out"
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"train": train, "test": test},
        "model": {"path": "tiny:llama", "template": "{text} sentiment :", "label_words": ["bad", "good"],
                  "params": "all"},
        "kernel": {"block_size": 1, "num_actors": 1, "num_cpus_per_actor": 0.5},
        "shapley": {"n_permutations": N_PERMUTATIONS, "permutations_per_task": 4, "num_cpus_per_task": 0.5,
                    "utility": "neg_ce", "seed": 1, "lam": 1e-3, "sign_splits": 10,
                    "estimator": "tmc", "convergence": "none"},
        "ray": {"num_cpus": 2},
        "output": str(out),
    }))
    ref = tmp_path / "ref"
    run_job(load_config(config, [f"output={ref}"]), progress=False)  # uninterrupted, on the session's Ray

    tiles = lambda: list(out.glob("kernel/*/tile-*.parquet"))  # noqa: E731
    parts = lambda: list(out.glob("shapley/marginals/part-*.parquet"))  # noqa: E731
    _kill_when(config, tmp_path / "run1.log", lambda: tiles(), "a kernel tile")
    n_tiles = len(tiles())
    assert 0 < n_tiles < N_TILES and not (out / "kernel" / "manifest.json").exists()
    for f in tiles():  # every tile on disk is whole
        assert pq.read_table(f).num_rows > 0

    _kill_when(config, tmp_path / "run2.log", lambda: parts(), "a part of marginals")
    kernel_manifest = json.loads((out / "kernel" / "manifest.json").read_text())
    assert kernel_manifest["tiles_skipped"] == n_tiles and kernel_manifest["tiles_computed"] == N_TILES - n_tiles
    n_parts = len(parts())
    assert n_parts > 0 and not (out / "values.parquet").exists()

    capsys.readouterr()
    assert main(["run", str(config), "--no-progress"]) == 0
    assert "reused the finished kernel" in capsys.readouterr().out
    info = json.loads((out / "manifest.json").read_text())["stages"]["shapley"]
    assert info["n_resumed"] > 0 and info["n_resumed"] + info["n_new"] == N_PERMUTATIONS

    got, want = load_kernel(out), load_kernel(ref)
    for key in ("train_train", "test_train"):
        assert np.abs(got[key] - want[key]).max() <= 1e-10 * np.abs(want[key]).max(), key
    perm_ids = pq.read_table(out / "shapley" / "marginals").column("perm_id").to_pylist()
    assert sorted(perm_ids) == list(range(N_PERMUTATIONS)), "a permutation was lost or stored twice"
    a, b = pq.read_table(out / "values.parquet"), pq.read_table(ref / "values.parquet")
    for col in ("value", "stderr", "count", "sign_agreement"):
        np.testing.assert_array_equal(a.column(col).to_numpy(), b.column(col).to_numpy())
