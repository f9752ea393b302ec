"""Ray runtime: connect to a cluster when an address is given, else start an embedded local one.

The embedded runtime binds 127.0.0.1 only and is shut down when the context exits. Nothing here ever
runs ``ray stop``: only a runtime this process started is shut down.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import ray

__all__ = ["ray_runtime", "ensure_ray"]

log = logging.getLogger(__name__)


def _resolve_address(address: str | None) -> str | None:
    return address or os.environ.get("RAY_ADDRESS") or None


@contextlib.contextmanager
def ray_runtime(
    address: str | None = None, *, num_cpus: int | None = None, include_dashboard: bool = False
) -> Iterator[None]:
    """Context in which Ray is initialised.

    If Ray is already initialised in this process it is used as is and left running. Otherwise, with
    ``address`` (or ``RAY_ADDRESS``) the driver connects to that cluster (and disconnects at exit); without
    one an embedded single-node Ray is started on 127.0.0.1 and shut down at exit.
    """
    if ray.is_initialized():
        yield
        return
    addr = _resolve_address(address)
    if addr:
        log.info("connecting to Ray cluster at %s", addr)
        ray.init(address=addr, log_to_driver=True)
    else:
        log.info("starting embedded Ray on 127.0.0.1 (num_cpus=%s)", num_cpus)
        ray.init(
            num_cpus=num_cpus,
            _node_ip_address="127.0.0.1",
            include_dashboard=include_dashboard,
            configure_logging=False,
            log_to_driver=True,
        )
    try:
        yield
    finally:
        ray.shutdown()


def ensure_ray() -> None:
    """Initialise an embedded local Ray (127.0.0.1) if none is running; used by the Python API.

    The runtime stays up for the rest of the process (like ``ray`` itself does on first use).
    """
    if not ray.is_initialized():
        addr = _resolve_address(None)
        if addr:
            ray.init(address=addr)
        else:
            ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, configure_logging=False)
