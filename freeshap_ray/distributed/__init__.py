"""Ray orchestration (the only package that imports ray): runtime, kernel and Shapley jobs."""

from __future__ import annotations

from .runtime import ensure_ray, init_local, ray_runtime

__all__ = ["ensure_ray", "init_local", "ray_runtime"]
