"""LoRA adapters (via peft) whose factors can be the kernel's parameters."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ModelError

__all__ = ["add_lora"]


def add_lora(model: nn.Module, *, r: int, alpha: float, targets: tuple[str, ...] = (), seed: int = 0) -> nn.Module:
    """Inject rank-``r`` LoRA adapters into ``model`` in place (B = 0, A random from ``seed``).

    At B = 0 the model's function is unchanged; the gradient with respect to A is zero there, so the
    kernel over LoRA factors is carried by the B factors (as in LoRA-based FreeShap).
    """
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets) or None)
    try:
        inject_adapter_in_model(config, model)
    except ValueError as err:
        raise ModelError(f"model.lora_targets: {err}") from err
    return model
