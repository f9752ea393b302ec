"""Baseline token attributions with the same output as ReAGent (one score per context position).

- ``input_x_gradient``: ``|| e_i ⊙ ∂ log p(y) / ∂ e_i ||_2`` per position (e = input embeddings).
- ``integrated_gradients``: zero-embedding baseline on the replaceable positions, ``ig_steps`` midpoint
  Riemann points; ``|| e_i ⊙ mean_α ∂ log p(y) / ∂ e_i(α) ||_2``.
- ``attention``: attention weights from the last position, averaged over layers and heads (the model is
  switched to eager attention for the call when it supports ``set_attn_implementation``).
- ``random``: seeded uniform scores.

Scores are normalised to sum 1 over the replaceable positions; special positions get 0 (as in ReAGent).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from ..errors import ConfigError
from .algorithm import Target
from .metrics import random_scores

__all__ = ["BASELINES", "baseline_scores"]

BASELINES = ("input_x_gradient", "integrated_gradients", "attention", "random")


def _normalise(raw: np.ndarray, pos: np.ndarray, T: int) -> np.ndarray:
    out = np.zeros(T, dtype=np.float64)
    if pos.size == 0:
        return out
    v = np.clip(np.nan_to_num(np.asarray(raw, dtype=np.float64)[pos], nan=0.0), 0.0, None)
    total = v.sum()
    out[pos] = v / total if total > 0 else 1.0 / len(pos)
    return out


def _device(model):
    return next(iter(model.parameters())).device


def _logp(model, embeds: torch.Tensor, target_id: int) -> torch.Tensor:
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    logits = model(inputs_embeds=embeds, attention_mask=mask).logits[:, -1].float()
    return torch.log_softmax(logits, dim=-1)[:, target_id]


@contextlib.contextmanager
def _eager_attention(model):
    cfg = getattr(model, "config", None)
    old = getattr(cfg, "_attn_implementation", None) if cfg is not None else None
    switch = old not in (None, "eager") and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(old)


def baseline_scores(method: str, model, target: Target, replaceable: np.ndarray, *, ig_steps: int = 32,
                    seed: int = 0) -> np.ndarray:
    """(T,) scores of ``method`` for predicting ``target.target_id`` after ``target.context``."""
    context = np.array(target.context, dtype=np.int64)  # writable copy (Ray arrays are read-only)
    target_id = target.target_id
    pos = np.asarray(replaceable, dtype=np.int64)
    T = len(context)
    if method == "random":
        raw = np.zeros(T)
        raw[pos] = random_scores(len(pos), seed=seed, prompt_id=target.prompt_id, position=target.position)
        return _normalise(raw, pos, T)
    if method not in BASELINES:
        raise ConfigError(f"evaluation.baselines: unknown method {method!r} (known: {list(BASELINES)})")
    dev = _device(model)
    ids = torch.from_numpy(context).to(dev)
    if method == "attention":
        with torch.no_grad(), _eager_attention(model):
            out = model(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None], output_attentions=True)
        atts = getattr(out, "attentions", None)
        if not atts:
            raise ConfigError("evaluation.baselines: 'attention' needs a model that returns attention weights "
                              "(output_attentions=True); this model returned none")
        raw = torch.stack([a[0, :, -1, :].float() for a in atts]).mean(dim=(0, 1)).cpu().numpy()
        return _normalise(raw, pos, T)
    emb = model.get_input_embeddings()(ids).detach()
    with torch.enable_grad():
        if method == "input_x_gradient":
            x = emb.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(_logp(model, x[None], target_id).sum(), x)
            raw = (emb * g).norm(dim=-1)
        else:
            alphas = (torch.arange(ig_steps, dtype=emb.dtype, device=dev) + 0.5) / ig_steps
            scale = torch.ones(ig_steps, T, dtype=emb.dtype, device=dev)
            scale[:, torch.from_numpy(pos).to(dev)] = alphas[:, None]
            x = (emb[None] * scale[:, :, None]).detach().requires_grad_(True)
            (g,) = torch.autograd.grad(_logp(model, x, target_id).sum(), x)
            raw = (emb * g.mean(dim=0)).norm(dim=-1)
    return _normalise(raw.detach().cpu().numpy(), pos, T)
