"""A plain kernel worker: holds one prompt classifier and computes Jacobian blocks and kernel tiles.

No Ray here: ``freeshap_ray.distributed`` turns it into an actor with ``ray.remote(**resources)``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import ModelConfig
from ..grads import flat_jacobian
from ..models import load_classifier, select_params
from .ntk import kernel_tile

__all__ = ["KernelWorker"]


class KernelWorker:
    """Loads the model once; ``jacobian`` and ``tile`` are called per block/tile.

    Args:
        model_dir: resolved local model directory.
        model_cfg: template, label words, parameter selection.
        param_names: the shard of the selection this worker differentiates (default: all of it).
        kind: ``first_logit`` or ``full``.
        threads: torch intra-op threads (match the CPUs reserved for this worker).
        device: ``cpu`` or ``cuda``.
    """

    def __init__(
        self,
        model_dir: str | Path,
        model_cfg: ModelConfig,
        kind: str,
        *,
        param_names: list[str] | None = None,
        threads: int = 1,
        device: str = "cpu",
    ):
        torch.set_num_threads(max(1, threads))
        self.kind = kind
        self.clf = load_classifier(model_dir, model_cfg).to(device)
        selected = select_params(self.clf, model_cfg.params)
        if param_names is not None:
            unknown = set(param_names) - set(selected)
            if unknown:
                raise ValueError(f"parameter shard names outside the selection: {sorted(unknown)[:3]}")
            selected = list(param_names)
        self.names = selected
        self.device = device

    def jacobian(self, texts: list[str]) -> np.ndarray:
        """(B, C', P) float32 per-example Jacobians of a block of texts (on the host)."""
        batch = self.clf.encode(texts)
        return flat_jacobian(self.clf, batch, self.names, self.kind).cpu().numpy()

    def tile(self, ja: np.ndarray, jb: np.ndarray, chunk: int) -> np.ndarray:
        """float64 kernel tile between two Jacobian blocks (see :func:`kernel_tile`)."""
        return kernel_tile(ja, jb, chunk=chunk)
