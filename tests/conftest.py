"""Shared fixtures: one local Ray per session (127.0.0.1, no dashboard) and a private model cache."""

from __future__ import annotations

import os

import pytest

# Everything is offline: never let transformers/datasets try a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _model_cache(tmp_path_factory):
    """Tiny models are built into a per-session cache, never into the user's home."""
    cache = tmp_path_factory.mktemp("model-cache")
    old = os.environ.get("FREESHAP_RAY_CACHE")
    os.environ["FREESHAP_RAY_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("FREESHAP_RAY_CACHE", None)
    else:
        os.environ["FREESHAP_RAY_CACHE"] = old


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray runtime shared by the tests that need one; shut down (only this one) at the end."""
    import ray

    from freeshap_ray.distributed import init_local

    if not ray.is_initialized():
        init_local(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
