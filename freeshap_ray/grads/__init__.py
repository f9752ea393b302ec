"""Per-example Jacobians of label-word logits with ``torch.func`` (vmap over examples, no Python loop)."""

from __future__ import annotations

from .jacobian import flat_jacobian, param_sizes

__all__ = ["flat_jacobian", "param_sizes"]
