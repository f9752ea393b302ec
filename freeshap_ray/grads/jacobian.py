"""Per-example Jacobians J[b, c, :] = d f_c(x_b) / dθ_selected, flattened over the selected parameters."""

from __future__ import annotations

from typing import Literal

import torch
from torch.func import functional_call, grad, jacrev, vmap

from ..models.prompt import EncodedBatch, PromptClassifier

__all__ = ["flat_jacobian", "param_sizes"]

KernelKind = Literal["first_logit", "full"]


def param_sizes(clf: PromptClassifier, names: list[str]) -> list[int]:
    """Number of scalars of each selected parameter tensor, in ``names`` order."""
    params = dict(clf.named_parameters())
    return [params[n].numel() for n in names]


def flat_jacobian(
    clf: PromptClassifier, batch: EncodedBatch, names: list[str], kind: KernelKind = "first_logit"
) -> torch.Tensor:
    """Per-example Jacobians of one block of examples.

    Args:
        clf: the prompt classifier (eval mode).
        batch: B encoded examples.
        names: selected parameter names, in the order that defines the flattened layout.
        kind: ``first_logit`` differentiates f_0 only; ``full`` all C label logits.

    Returns:
        (B, C', P) float32 on the model's device, C' = 1 for ``first_logit`` and C for ``full``.
    """
    all_params = dict(clf.named_parameters())
    params = {n: all_params[n].detach() for n in names}

    def logits(p: dict[str, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return functional_call(clf, p, (ids, mask, pos), {"single": True})

    if kind == "first_logit":
        fn = grad(lambda p, ids, mask, pos: logits(p, ids, mask, pos)[0])
    else:
        fn = jacrev(logits)
    dev = next(iter(params.values())).device
    per_example = vmap(fn, in_dims=(None, 0, 0, 0))(
        params, batch.input_ids.to(dev), batch.attention_mask.to(dev), batch.read_pos.to(dev)
    )
    b = len(batch)
    c = 1 if kind == "first_logit" else clf.n_classes
    return torch.cat([per_example[n].reshape(b, c, -1) for n in names], dim=-1).detach()
