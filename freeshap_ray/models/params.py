"""Which parameters the kernel differentiates: ``all``, ``last:K`` blocks, or a regex on names."""

from __future__ import annotations

import re

from torch import nn

from ..errors import ModelError

__all__ = ["find_blocks", "select_params"]


def find_blocks(model: nn.Module) -> tuple[str, int]:
    """Name and length of the transformer block list (the longest ``nn.ModuleList`` of one class)."""
    best: tuple[str, int] = ("", 0)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > best[1]:
            if len({type(m) for m in mod}) == 1:
                best = (name, len(mod))
    if not best[0]:
        raise ModelError("model.params: no transformer block list found; use 'all' or a regex")
    return best


def select_params(model: nn.Module, spec: str) -> list[str]:
    """Names (in ``named_parameters`` order) of the parameters selected by ``spec``.

    ``last:K`` takes the last K transformer blocks and every parameter registered after them (final
    norm, LM-head transform, label-word head); ``last:0`` only the latter. ``lora`` takes the LoRA
    factors and the label-word head.
    """
    names = [n for n, _ in model.named_parameters()]
    if spec == "all":
        return names
    if spec == "lora":
        chosen = [n for n in names if ".lora_" in n or n.startswith("head.")]
        if not any(".lora_" in n for n in chosen):
            raise ModelError("model.params: 'lora' but the model has no LoRA adapters (set model.lora_r)")
        return chosen
    if spec.startswith("last:"):
        try:
            k = int(spec.split(":", 1)[1])
        except ValueError:
            raise ModelError(f"model.params: {spec!r}: K in 'last:K' must be an integer") from None
        blocks, n_blocks = find_blocks(model)
        if not 0 <= k <= n_blocks:
            raise ModelError(f"model.params: {spec!r}: the model has {n_blocks} blocks")
        prefix = blocks + "."
        in_blocks = [i for i, n in enumerate(names) if n.startswith(prefix)]
        last_block_param = in_blocks[-1]
        keep_blocks = {f"{prefix}{j}." for j in range(n_blocks - k, n_blocks)}
        return [
            n for i, n in enumerate(names)
            if i > last_block_param or any(n.startswith(b) for b in keep_blocks)
        ]
    try:
        pattern = re.compile(spec)
    except re.error as err:
        raise ModelError(f"model.params: {spec!r} is not 'all', 'last:K' or a valid regex: {err}") from None
    chosen = [n for n in names if pattern.search(n)]
    if not chosen:
        sample = ", ".join(names[:3] + names[-3:])
        raise ModelError(f"model.params: regex {spec!r} matches no parameter (names look like: {sample})")
    return chosen
