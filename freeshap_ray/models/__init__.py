"""Models: load a Hugging Face LM, wrap it as a prompt-based classifier, select parameters."""

from __future__ import annotations

from pathlib import Path

from .loading import LoadedLM, ModelKind, cache_root, load_lm, resolve_model_path
from .lora import add_lora
from .params import find_blocks, select_params
from .prompt import EncodedBatch, PromptClassifier
from .tiny import TINY_ARCHS, build_tiny_model

__all__ = [
    "EncodedBatch",
    "LoadedLM",
    "ModelKind",
    "PromptClassifier",
    "TINY_ARCHS",
    "add_lora",
    "build_tiny_model",
    "cache_root",
    "find_blocks",
    "load_classifier",
    "load_lm",
    "resolve_model_path",
    "select_params",
]


def load_classifier(model_dir: str | Path, cfg, *, attn_implementation: str | None = "eager") -> PromptClassifier:
    """Load a resolved model directory as a :class:`PromptClassifier` per a ``ModelConfig``.

    Eager attention by default: the classifier exists to be differentiated per example under
    ``torch.func.vmap``, where fused SDPA has no batching rule and falls back to a slow loop.
    """
    lm = load_lm(model_dir, trust_remote_code=cfg.trust_remote_code, attn_implementation=attn_implementation)
    if cfg.lora_r > 0:
        add_lora(lm.model, r=cfg.lora_r, alpha=cfg.lora_alpha, targets=cfg.lora_targets, seed=cfg.seed)
    return PromptClassifier(lm, cfg.template, cfg.label_words, cfg.max_length)
