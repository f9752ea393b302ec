"""The README's `ray job submit` sequence against a real Ray head started WITHOUT the venv on its PATH.

The head is started as the README says, with the venv's `ray` by absolute path (no activation), in a
clean environment: the system PATH, no PYTHONPATH or VIRTUAL_ENV, so a bare `freeshap-ray` or `python`
in the job's shell would not be this venv's. It listens on 127.0.0.1 only, on free ports, with its own
--temp-dir and token authentication. The test submits the README's command (its entrypoint names the
venv's Python; the uploaded working directory provides the code), with a tiny model and a `file://`
output URI instead of the README's GPU and S3 settings, waits for SUCCEEDED, checks that the job wrote
the same outputs as a local run of the same config, and stops only its own head: every process of the
session that its `ray start` opened is terminated by pid.
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

from .doc_commands import doc_command
from .helpers import TINY_JOB, write_csv

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv that runs the tests: the README's `.venv/bin`
RAY = BIN / "ray"
PYTHON = BIN / "python"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # Debian's default, no venv


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
    # A clean environment, as after a fresh login: the venv is NOT on PATH and nothing points at the code.
    env = {k: os.environ[k] for k in ("HOME", "USER", "LANG", "TMPDIR") if k in os.environ}
    env.update(
        PATH=SYSTEM_PATH,
        RAY_AUTH_MODE="token",  # Ray 2.60's default for a new head; the client needs it too
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # keep the node IP 127.0.0.1 (see distributed/runtime.py)
        RAY_USAGE_STATS_ENABLED="0",
        FREESHAP_RAY_CACHE=str(cache),
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
        OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
    )
    assert shutil.which("freeshap-ray", path=SYSTEM_PATH) is None  # the README's failure mode is present
    found = [shutil.which(name, path=SYSTEM_PATH) for name in ("python", "python3", "ray")]
    assert BIN not in [Path(p).parent for p in found if p]
    ports = dict(zip(_PORTS, _free_ports(len(_PORTS))))
    readme = doc_command(REPO / "README.md", ".venv/bin/ray start --head")  # the README's head, un-activated
    mine = ["--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
            "--num-cpus=2", "--disable-usage-stats", f"--temp-dir={temp}", *[f"--{k}={v}" for k, v in ports.items()]]
    assert readme[1:2] == ["start"] and {a.split("=")[0] for a in readme[2:]} <= {a.split("=")[0] for a in mine}, readme
    assert "--dashboard-host=127.0.0.1" in readme  # only the port numbers differ (free ports here)
    cmd = [str(RAY), "start", *mine]
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


def _readme_submit() -> tuple[list[str], list[str]]:
    """The README's `ray job submit` command: (client argv before `--`, entrypoint argv)."""
    argv = doc_command(REPO / "README.md", ".venv/bin/ray job submit")
    sep = argv.index("--")
    return argv[:sep], argv[sep + 1:]


def test_readme_submit_command_names_the_venv_python():
    client, entry = _readme_submit()
    assert client == [".venv/bin/ray", "job", "submit", "--working-dir", "."]
    assert entry[:5] == ["$PWD/.venv/bin/python", "-m", "freeshap_ray", "run", "configs/quickstart.yaml"], entry
    assert all(a == "--set" for a in entry[5::2]) and len(entry[5:]) % 2 == 0, entry


def test_python_m_is_the_console_script(tmp_path):
    """`python -m freeshap_ray` = `freeshap-ray`: same output and exit code, good and bad input."""
    script = BIN / "freeshap-ray"
    if not script.exists():
        pytest.skip(f"{script}: the console script is not installed")
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # both import this checkout
    for args, rc in ((["show-config", "--set", "shapley.n_permutations=7"], 0),
                     (["show-config", "--set", "shapley.n_perm=7"], 2),
                     (["run", "--set", "kernel.num_actors=0"], 2),
                     (["no-such-command"], 2)):
        a = subprocess.run([str(PYTHON), "-m", "freeshap_ray", *args], capture_output=True, text=True, env=env, cwd=tmp_path)
        b = subprocess.run([str(script), *args], capture_output=True, text=True, env=env, cwd=tmp_path)
        assert (a.returncode, a.stdout, a.stderr) == (b.returncode, b.stdout, b.stderr) and a.returncode == rc, args
        assert ("n_permutations: 7" in a.stdout) == (rc == 0) and ("error" in a.stderr) == (rc == 2), a.stderr


def test_readme_job_submit_on_unactivated_head(ray_head, ray_local, tmp_path):
    """The README's submit command against a head whose PATH lacks the venv: SUCCEEDED, same outputs as local."""
    csv = write_csv(tmp_path / "train.csv")
    remote_out = tmp_path / "shared" / "quickstart"
    sets = [f"data.train={csv}", *TINY_JOB]
    sid = f"freeshap-test-{uuid.uuid4().hex[:8]}"
    client, entry = _readme_submit()
    # `.venv/bin/` and `$PWD/.venv/bin/` of the README are the venv running these tests; the README's
    # own --set overrides (S3, GPUs) give way to the tiny job with a file:// output.
    submit = [str(RAY), *client[1:], "--submission-id", sid, "--", str(PYTHON), *entry[1:5],
              *[x for s in [*sets, f"output={remote_out.as_uri()}"] for x in ("--set", s)]]
    env = {**ray_head["env"], "RAY_ADDRESS": ray_head["dashboard"]}  # the README's `export RAY_ADDRESS=...`
    # Control: on this head a bare `freeshap-ray` entrypoint is not found (the failure the README names).
    bare = [str(RAY), *client[1:], "--", "freeshap-ray", "--help"]
    t0 = time.perf_counter()
    job, control = (subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True) for cmd in (submit, bare))  # each blocks until its job ends
    try:
        # meanwhile: the same config run locally in this process (embedded Ray)
        local_out = tmp_path / "local"
        assert main(["run", str(REPO / "configs" / "quickstart.yaml"), "--no-progress",
                     *[x for s in [*sets, f"output={local_out}"] for x in ("--set", s)]]) == 0
        logs, _ = job.communicate(timeout=240)
        control_logs, _ = control.communicate(timeout=120)
    finally:
        for p in (job, control):
            if p.poll() is None:
                p.kill()
        if job.returncode is None:
            _job(ray_head, "stop", "--address", ray_head["dashboard"], sid, timeout=60)
    assert control.returncode != 0 and "freeshap-ray: not found" in control_logs, control_logs[-3000:]
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
