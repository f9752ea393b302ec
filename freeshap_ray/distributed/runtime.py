"""Ray runtime: connect to a cluster when an address is given, else start an embedded local one.

The embedded runtime binds 127.0.0.1 only and is shut down when the context exits. Nothing here ever
stops a cluster it did not start: only a runtime this process started is shut down.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import ray

from ..config import RayConfig

__all__ = ["ray_runtime", "ensure_ray", "init_local"]

log = logging.getLogger(__name__)


def _resolve_address(address: str | None) -> str | None:
    return address or os.environ.get("RAY_ADDRESS") or None


def _force_loopback() -> None:
    """Make Ray resolve this node's IP to 127.0.0.1.

    Ray rewrites ``_node_ip_address="127.0.0.1"`` to the machine's external address unless multi-node
    clusters are disabled, as Ray does on macOS/Windows. Disabling them (in this process, and through the
    environment in the raylet and workers it starts) makes GCS, raylet and workers listen on loopback only.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    try:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    except (ImportError, AttributeError):  # pragma: no cover - future Ray versions
        log.warning("could not pin Ray to 127.0.0.1; the embedded runtime may listen on other interfaces")


def init_local(num_cpus: int | None = None, *, include_dashboard: bool = False, log_to_driver: bool = True) -> None:
    """Start an embedded single-node Ray bound to 127.0.0.1.

    ``address="local"``: always a new private instance, never a cluster that ``ray start`` left running
    on this machine (plain ``ray.init()`` would connect to that one).
    """
    _force_loopback()
    log.info("starting embedded Ray on 127.0.0.1 (num_cpus=%s)", num_cpus)
    ray.init(
        address="local",
        num_cpus=num_cpus,
        _node_ip_address="127.0.0.1",
        include_dashboard=include_dashboard,
        configure_logging=False,
        log_to_driver=log_to_driver,
    )


@contextlib.contextmanager
def ray_runtime(cfg: RayConfig | None = None, address: str | None = None) -> Iterator[None]:
    """Context in which Ray is initialised, as a job's ``ray`` section says.

    If Ray is already initialised in this process it is used as is and left running. Otherwise, with an address
    (``address``, else ``cfg.address``, else ``RAY_ADDRESS``) the driver connects to that cluster (and disconnects
    at exit); without one an embedded single-node Ray with ``cfg.num_cpus`` CPUs is started on 127.0.0.1 (a
    dashboard only with ``cfg.include_dashboard``) and shut down at exit.
    """
    if ray.is_initialized():
        yield
        return
    cfg = cfg or RayConfig()
    addr = _resolve_address(address or cfg.address)
    if addr:
        log.info("connecting to Ray cluster at %s", addr)
        ray.init(address=addr)
    else:
        init_local(cfg.num_cpus, include_dashboard=cfg.include_dashboard)
    try:
        yield
    finally:
        ray.shutdown()


def ensure_ray() -> None:
    """Initialise Ray if it is not running (``RAY_ADDRESS`` if set, else embedded on 127.0.0.1).

    Used by the Python API; the runtime then stays up for the rest of the process, as ``ray`` itself
    does on first use.
    """
    if ray.is_initialized():
        return
    addr = _resolve_address(None)
    if addr:
        ray.init(address=addr)
    else:
        init_local(include_dashboard=False)
