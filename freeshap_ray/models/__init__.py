"""Models: load a Hugging Face LM, wrap it as a prompt-based classifier, select parameters."""

from __future__ import annotations

from pathlib import Path

from .loading import LoadedLM, ModelKind, cache_root, check_model_dir, load_lm, resolve_model_path
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
    "check_model_dir",
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
    lm = load_lm(model_dir, trust_remote_code=cfg.trust_remote_code, allow_pickle=getattr(cfg, "allow_pickle", False),
                 attn_implementation=attn_implementation)
    context = getattr(lm.model.config, "max_position_embeddings", None)
    if isinstance(context, int) and cfg.max_length > context:
        from ..errors import ModelError

        raise ModelError(f"model.max_length: {cfg.max_length} exceeds the model's context of {context} tokens "
                         f"(max_position_embeddings in {Path(model_dir) / 'config.json'}); set it <= {context}")
    if cfg.lora_r > 0:
        add_lora(lm.model, r=cfg.lora_r, alpha=cfg.lora_alpha, targets=cfg.lora_targets, seed=cfg.seed)
    clf = PromptClassifier(lm, cfg.template, cfg.label_words, cfg.max_length)
    clf.encode([""])  # the template alone must fit in model.max_length: fail here, not in a Ray worker
    return clf
