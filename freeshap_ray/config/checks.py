"""Checks shared by the config schemas: Ray resources, actor counts, the ZeRO-3 rules, output paths and URIs.

Every check raises :class:`~freeshap_ray.errors.ConfigError` with a message that starts with the dotted key.
"""

from __future__ import annotations

import math
import re
from typing import Any
from urllib.parse import urlsplit

from ..errors import ConfigError

__all__ = ["SCHEMES", "check_actor_fields", "check_output", "check_output_uri", "check_resources", "check_zero3_fields",
           "is_uri"]

_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def check_resources(resources: dict[str, float], key: str) -> None:
    """Custom Ray resources (``{"name": amount}``): non-empty names other than Ray's built-in ones
    (those have their own keys), amounts >= 0; errors name ``key.name``."""
    for name, amount in resources.items():
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{key}: resource names must be non-empty strings, got {name!r}")
        if name in _BUILTIN_RESOURCES or name.startswith("node:"):
            raise ConfigError(f"{key}.{name}: a built-in Ray resource; use the num_cpus/num_gpus keys for "
                              "CPUs and GPUs, custom names (as given to `ray start --resources`) here")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not math.isfinite(amount) \
                or amount < 0:
            raise ConfigError(f"{key}.{name}: must be a number >= 0, got {amount!r}")


def check_actor_fields(cfg: Any, section: str, counts: tuple[str, ...]) -> None:
    """Counts must be >= 1 and per-actor CPU/GPU requests >= 0; errors name ``section.key``."""
    for key in counts:
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{section}.{key}: must be >= 1, got {getattr(cfg, key)}")
    for key in ("num_cpus_per_actor", "num_gpus_per_actor"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{section}.{key}: must be >= 0, got {getattr(cfg, key)}")


def check_zero3_fields(cfg: Any) -> None:
    """``kernel.backend: deepspeed``: the ZeRO-3 world size is ``num_actors`` and each rank is its own shard."""
    if cfg.param_shards not in (1, cfg.num_actors):
        raise ConfigError(
            f"kernel.param_shards: with kernel.backend=deepspeed each of the kernel.num_actors={cfg.num_actors} "
            f"ZeRO-3 ranks is its own shard; leave param_shards at 1 or set it to {cfg.num_actors}, "
            f"got {cfg.param_shards}"
        )
    if cfg.placement == "none":
        raise ConfigError("kernel.placement: kernel.backend=deepspeed needs a placement group (all ranks of the "
                          "ZeRO-3 group must start together); use PACK, SPREAD, STRICT_PACK or STRICT_SPREAD")
    if cfg.num_gpus_per_actor not in (0, 1):
        raise ConfigError(f"kernel.num_gpus_per_actor: with kernel.backend=deepspeed each rank uses 0 (CPU, gloo) "
                          f"or 1 whole GPU (nccl), got {cfg.num_gpus_per_actor}")


#: URI schemes accepted for ``output`` (pyarrow filesystems).
SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")
_URI_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def is_uri(output: Any) -> bool:
    """Whether ``output`` is a ``scheme://...`` URI (a string; ``Path`` objects are local paths)."""
    return isinstance(output, str) and _URI_RE.match(output) is not None


def check_output_uri(output: str, key: str = "output") -> None:
    """Syntax check of an output URI (no I/O). Raises ConfigError naming ``key``."""
    if not is_uri(output):
        return
    scheme = _URI_RE.match(output).group(1).lower()
    if scheme not in SCHEMES:
        raise ConfigError(f"{key}: unsupported URI scheme {scheme!r} in {output!r}; give a directory path or a "
                          f"{', '.join(s + '://' for s in SCHEMES)} URI")
    parts = urlsplit(output)
    if scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.strip("/"):
            raise ConfigError(f"{key}: {output!r}: a file URI needs an absolute path, e.g. file:///shared/run")
    elif scheme in ("s3", "gs", "gcs") and not parts.netloc:
        raise ConfigError(f"{key}: {output!r}: give a bucket (and a prefix), e.g. {scheme}://bucket/runs/quickstart")


def check_output(output: str) -> None:
    """``output``: a directory path or a supported URI (syntax only; access is checked when the job opens it)."""
    if not output:
        raise ConfigError("output: must be a directory path or a URI (s3://, gs://, file://, ...)")
    check_output_uri(output, "output")
