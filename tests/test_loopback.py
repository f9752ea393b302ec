"""The embedded Ray of a job listens on loopback only: every listening TCP socket of a job's own process
session (the driver, GCS, raylet, workers, agents) is bound to a loopback address (127.0.0.1, ::1 or the
IPv4-mapped ::ffff:127.0.0.1) — none to 0.0.0.0, ::, or an external interface.

The job runs in a process of its own (``python -m freeshap_ray run``), started in a new session; while it runs,
the sockets of every process in that session are read from /proc (Linux only).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .helpers import job_args, session_members, write_csv

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    except OSError:
        pass
    return inodes


def _address(hex_addr: str) -> str:
    """``/proc/net/tcp{,6}`` local address (little-endian 32-bit words) → textual IP."""
    words = [int(hex_addr[i:i + 8], 16) for i in range(0, len(hex_addr), 8)]
    raw = b"".join(struct.pack("<I", w) for w in words)
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)


def _listening(pids: list[int]) -> dict[str, set[str]]:
    """IP → ``comm`` names of the given processes that listen on a TCP socket bound to that IP."""
    owner = {}
    for pid in pids:
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        for inode in _socket_inodes(pid):
            owner[inode] = comm
    found: dict[str, set[str]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            local, state, inode = f[1], f[3], f[9]
            if state == "0A" and inode in owner:  # 0A = LISTEN
                found.setdefault(_address(local.split(":")[0]), set()).add(owner[inode])
    return found


def test_job_embedded_ray_listens_on_loopback_only(tmp_path):
    csv = write_csv(tmp_path / "train.csv")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    cmd = [sys.executable, "-m", "freeshap_ray", "run", *job_args(csv, tmp_path / "out", "shapley.n_permutations=60")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    seen: dict[str, set[str]] = {}
    comms: set[str] = set()
    try:
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            pids = session_members(proc.pid)
            for pid in pids:
                try:
                    comms.add(Path(f"/proc/{pid}/comm").read_text().strip())
                except OSError:
                    pass
            for ip, names in _listening(pids).items():
                seen.setdefault(ip, set()).update(names)
            time.sleep(0.2)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    # we watched the job's own Ray (its GCS and raylet ran in the job's session), and it did listen
    assert any("gcs_server" in c for c in comms) and any("raylet" in c for c in comms), comms
    assert seen, "no listening socket of the job's Ray was seen"
    outside = {ip: sorted(n) for ip, n in seen.items() if not _loopback(ip)}
    assert not outside, outside


def _loopback(ip: str) -> bool:
    """127.0.0.0/8, ::1, or an IPv4-mapped IPv6 loopback address (``::ffff:127.0.0.1``, gRPC's dual-stack form)."""
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback
