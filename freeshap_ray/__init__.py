"""freeshap_ray: Ray-native FreeShap instance attribution for language models.

Public API: :func:`shapley`, :func:`read_kernel` (a typed :class:`Kernel`; :func:`load_kernel` returns the
same as a mapping), :class:`ValuesResult`, :func:`load_config`, :class:`JobConfig`, :func:`run_job`,
:func:`reagent_attribute` (ReAGent token attribution of a causal LM),
:func:`explain` / :class:`Explainer` / :class:`Explanation` (which training examples drove a prediction on new texts).
"""

from __future__ import annotations

from .api import shapley
from .io import Kernel, load_kernel, read_kernel
from .config import JobConfig, load_config
from .errors import FreeShapError
from .values import ValuesResult

__version__ = "0.1.0"

__all__ = [
    "Explainer", "Explanation", "FreeShapError", "JobConfig", "Kernel", "ValuesResult", "explain", "load_config",
    "load_kernel", "read_kernel",
    "reagent_attribute", "run_job", "shapley",
    "__version__",
]


def run_job(cfg: JobConfig, **kwargs):
    """Run the whole job (kernel + Shapley) described by ``cfg``; see :func:`freeshap_ray.pipeline.run_job`."""
    from .pipeline import run_job as _run_job

    return _run_job(cfg, **kwargs)


def __getattr__(name: str):
    # reagent_attribute and explain import torch/transformers: load them on first use, not with the package.
    if name == "reagent_attribute":
        from .reagent.api import reagent_attribute

        return reagent_attribute
    if name in ("explain", "Explainer", "Explanation"):
        from .apps import explain as _explain  # apps.explain: a module named `explain` would shadow the function

        return getattr(_explain, name)
    raise AttributeError(f"module 'freeshap_ray' has no attribute {name!r}")
