"""The runtime helper starts an embedded Ray on 127.0.0.1 and shuts down only what it started."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_embedded_runtime_binds_loopback_and_shuts_down():
    code = textwrap.dedent(
        """
        import os, ray
        os.environ.pop("RAY_ADDRESS", None)
        from freeshap_ray.config import RayConfig
        from freeshap_ray.distributed import ray_runtime
        with ray_runtime(RayConfig(num_cpus=1)):
            assert ray.is_initialized()
            ips = {n["NodeManagerAddress"] for n in ray.nodes()}
            assert ips == {"127.0.0.1"}, ips
        assert not ray.is_initialized()
        print("OK")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]


def test_existing_runtime_is_left_running(ray_local):
    from freeshap_ray.distributed import ray_runtime

    with ray_runtime():
        assert ray_local.is_initialized()
    assert ray_local.is_initialized()
