"""`ray job submit --working-dir . -- freeshap-ray run configs/quickstart.yaml` against a real Ray head.

The test starts its own head (127.0.0.1 only, free ports, its own --temp-dir, token authentication),
submits the quickstart config with a tiny model and a `file://` output URI, waits for SUCCEEDED,
checks that the job wrote the same outputs as a local run of the same config, and stops only its
own head: every process of the session that its `ray start` opened is terminated by pid.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from freeshap_ray import load_kernel
from freeshap_ray.cli import main

from .helpers import TINY_JOB, write_csv

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = BIN / "ray"


_PORTS = ("port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
          "metrics-export-port", "runtime-env-agent-port", "node-manager-port", "object-manager-port")


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _session_members(sid: int) -> list[int]:
    """Pids of the live (not zombie) processes in session ``sid`` (the head's processes and its workers)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) != sid:
                    continue
                with open(f"/proc/{entry}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if state not in ("Z", "X"):
                out.append(int(entry))
    return out


def _stop_session(sid: int) -> None:
    """SIGTERM, then SIGKILL, every process of the session our `ray start` created (never anything else)."""
    me = os.getpid()
    for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 10.0)):
        pids = [p for p in _session_members(sid) if p != me]
        for p in pids:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and [p for p in _session_members(sid) if p != me]:
            time.sleep(0.2)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    if not RAY.exists():
        pytest.skip(f"{RAY}: the ray CLI is not installed next to this Python")
    temp = Path(tempfile.mkdtemp(prefix="fsr-head-", dir="/tmp"))  # short: Ray puts unix sockets under it
    cache = tmp_path_factory.mktemp("head-cache")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(
        RAY_AUTH_MODE="token",  # Ray 2.60's default for a new head; the client needs it too
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # keep the node IP 127.0.0.1 (see distributed/runtime.py)
        RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # the job's `freeshap-ray` is this venv's
        FREESHAP_RAY_CACHE=str(cache),
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
        OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
    )
    ports = dict(zip(_PORTS, _free_ports(len(_PORTS))))
    cmd = [str(RAY), "start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
           "--include-dashboard=true", "--num-cpus=2", "--disable-usage-stats", f"--temp-dir={temp}",
           *[f"--{k}={v}" for k, v in ports.items()]]
    # A new session: every process the head spawns (GCS, raylet, dashboard, agents, workers) stays in it.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    sid = proc.pid
    try:
        out, _ = proc.communicate(timeout=180)
        if proc.returncode != 0:
            pytest.fail(f"ray start failed ({proc.returncode}):\n{out[-4000:]}")
        plain = re.sub(r"\x1b\[[0-9;]*m", "", out)
        assert "Local node IP: 127.0.0.1" in plain, plain[-3000:]  # not rewritten to an external address
        yield {"env": env, "dashboard": f"http://127.0.0.1:{ports['dashboard-port']}", "temp": temp,
               "gcs": f"127.0.0.1:{ports['port']}"}
    finally:
        if proc.poll() is None:
            proc.kill()
        _stop_session(sid)
        left = _session_members(sid)
        shutil.rmtree(temp, ignore_errors=True)
        assert not left, f"head processes still running: {left}"


def _job(head, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([str(RAY), "job", *args], env=head["env"], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_job_submit_writes_same_outputs_as_local_run(ray_head, ray_local, tmp_path):
    csv = write_csv(tmp_path / "train.csv")
    remote_out = tmp_path / "shared" / "quickstart"
    sets = [f"data.train={csv}", *TINY_JOB]
    sid = f"freeshap-test-{uuid.uuid4().hex[:8]}"
    runtime_env = {"excludes": ["outputs/", ".venv/", ".git/", "*.egg-info/", ".pytest_cache/"],
                   "env_vars": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}}
    submit = [str(RAY), "job", "submit", "--address", ray_head["dashboard"], "--submission-id", sid,
              "--working-dir", ".", "--runtime-env-json", json.dumps(runtime_env), "--",
              "freeshap-ray", "run", "configs/quickstart.yaml", "--no-progress",
              *[x for s in [*sets, f"output={remote_out.as_uri()}"] for x in ("--set", s)]]
    t0 = time.perf_counter()
    job = subprocess.Popen(submit, env=ray_head["env"], cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)  # blocks until the job ends (exit 1 if it failed)
    try:
        # meanwhile: the same config run locally in this process (embedded Ray)
        local_out = tmp_path / "local"
        assert main(["run", str(REPO / "configs" / "quickstart.yaml"), "--no-progress",
                     *[x for s in [*sets, f"output={local_out}"] for x in ("--set", s)]]) == 0
        logs, _ = job.communicate(timeout=240)
    finally:
        if job.poll() is None:
            job.kill()
            _job(ray_head, "stop", "--address", ray_head["dashboard"], sid, timeout=60)
    assert job.returncode == 0, logs[-6000:]
    status = _job(ray_head, "status", "--address", ray_head["dashboard"], sid, timeout=60)
    assert "SUCCEEDED" in (status.stdout + status.stderr).upper(), status.stdout + status.stderr
    seconds = time.perf_counter() - t0
    assert "shapley: 12 permutations" in logs, logs[-4000:]

    # same files (all but the manifest's timings/config.output are identical in content)
    def files(root: Path) -> list[str]:
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    assert files(remote_out) == files(local_out)
    for rel in ("values.parquet", "train.parquet", "test.parquet"):
        a, b = pq.read_table(remote_out / rel).to_pandas(), pq.read_table(local_out / rel).to_pandas()
        assert list(a.columns) == list(b.columns) and len(a) == len(b) > 0, rel
        for col in a.columns:
            if a[col].dtype.kind == "f":
                np.testing.assert_allclose(a[col], b[col], rtol=1e-9, atol=1e-12, err_msg=f"{rel}:{col}")
            else:
                assert a[col].tolist() == b[col].tolist(), f"{rel}:{col}"
    np.testing.assert_allclose(load_kernel(remote_out)["train_train"], load_kernel(local_out)["train_train"],
                               rtol=1e-10)
    manifest = json.loads((remote_out / "manifest.json").read_text())
    assert manifest["config"]["output"] == remote_out.as_uri()
    assert {"kernel", "shapley"} <= set(manifest["stages"])
    print(f"job submitted and finished in {seconds:.1f} s")
