"""ReAGent token attribution for causal LMs (no Ray here; see :mod:`freeshap_ray.distributed.reagent_job`;
the one-call Python API is :func:`freeshap_ray.reagent_attribute`, in :mod:`.api`).

Modules: :mod:`.algorithm` (probes, masks, updates, stop rule, speculative batched steps),
:mod:`.samplers` (uniform / POS / masked-LM replacement), :mod:`.metrics` (Soft-NS / Soft-NC),
:mod:`.gradient_baselines` (input×gradient, integrated gradients, attention, random), :mod:`.html` (heat map).
"""

from __future__ import annotations

from .algorithm import ReagentEngine, Target, TargetResult
from .gradient_baselines import BASELINES, baseline_scores
from .html import heatmap_html
from .lm import TargetLM, special_token_ids
from .metrics import soft_faithfulness
from .runner import PreparedPrompt, ReagentRunner, prepare_prompt
from .samplers import MLMSampler, PosSampler, Sampler, UniformSampler, build_sampler, valid_token_ids

__all__ = [
    "BASELINES",
    "MLMSampler",
    "PosSampler",
    "PreparedPrompt",
    "ReagentEngine",
    "ReagentRunner",
    "Sampler",
    "Target",
    "TargetLM",
    "TargetResult",
    "UniformSampler",
    "baseline_scores",
    "build_sampler",
    "heatmap_html",
    "prepare_prompt",
    "soft_faithfulness",
    "special_token_ids",
    "valid_token_ids",
]
