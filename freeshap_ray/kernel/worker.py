"""A plain kernel worker: holds one prompt classifier and computes gradient blocks and kernel tiles.

No Ray here: ``freeshap_ray.distributed`` turns it into an actor with ``ray.remote(**resources)``.
A block is a :class:`~freeshap_ray.grads.features.FeatureBlock` (``method: hooks``) or a dense
(B, C', P) Jacobian array (``method: func``); :meth:`KernelWorker.tile` accepts either. With
``projection_dim`` D > 0 blocks hold random-projected features instead (a FeatureBlock with only ``dense``
(B·C', D_shard), or (B, C', D_shard) from ``func``; :mod:`freeshap_ray.grads.projection`), whose tiles are
unbiased estimates of the eNTK's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import logging

from ..config import KernelConfig, ModelConfig
from ..errors import ConfigError
from ..grads import flat_jacobian
from ..grads.features import FeatureBlock
from ..grads.hooks import HooksUnsupported, block_features
from ..grads.projection import ProjectionSpec, plan_projection, tensor_forms
from ..models import load_classifier, select_params
from .features import feature_tile
from .ntk import kernel_tile

log = logging.getLogger(__name__)

__all__ = ["KernelWorker"]


class KernelWorker:
    """Loads the model once; ``jacobian`` and ``tile`` are called per block/tile.

    Args:
        model_dir: resolved local model directory.
        model_cfg: template, label words, parameter selection.
        cfg: the kernel settings: ``kind``, ``method`` (hooks / func / auto: hooks when the model allows),
            ``precision`` of tile GEMMs, ``feature_memory_gb`` and ``micro_batch_tokens`` (hooks), and the
            resources (torch threads = ``num_cpus_per_actor``; CUDA when ``num_gpus_per_actor > 0``); with
            ``projection_dim`` D > 0 the features are projected to D dimensions over the whole selection.
        param_names: the shard of the selection this worker differentiates (default: all of it).
    """

    def __init__(self, model_dir: str | Path, model_cfg: ModelConfig, cfg: KernelConfig, *,
                 param_names: list[str] | None = None):
        torch.set_num_threads(cfg.threads)
        self.kind = cfg.kind
        self.precision = cfg.precision
        self.budget = int(cfg.feature_memory_gb * (1 << 30))
        self.micro_batch_tokens = cfg.micro_batch_tokens
        self.device = cfg.device
        # Fused attention for batched passes; torch.func needs eager attention (no vmap rule for SDPA).
        attn = "eager" if cfg.method == "func" else "sdpa"
        self.clf = load_classifier(model_dir, model_cfg, attn_implementation=attn).to(self.device)
        selected = select_params(self.clf, model_cfg.params)
        # Planned over the whole selection, so that every parameter shard uses the same budget.
        self.projection = (
            plan_projection(ProjectionSpec(cfg.projection_dim, cfg.projection_seed, cfg.projection_block),
                            tensor_forms(self.clf, selected)) if cfg.projection_dim > 0 else None
        )
        if param_names is not None:
            unknown = set(param_names) - set(selected)
            if unknown:
                raise ValueError(f"parameter shard names outside the selection: {sorted(unknown)[:3]}")
            selected = list(param_names)
        self.names = selected
        self.method = "func" if cfg.method == "func" else self._try_hooks(cfg.method, model_dir, model_cfg)

    def _try_hooks(self, method: str, model_dir, model_cfg: ModelConfig) -> str:
        """``hooks`` if a dry run on one short text works, else ``func`` (``auto``) or an error (``hooks``)."""
        try:
            block_features(self.clf, self.clf.encode(["a"]), self.names, self.kind, dense_budget_bytes=0)
            return "hooks"
        except HooksUnsupported as err:
            if method == "hooks":
                raise ConfigError(f"kernel.method: 'hooks' does not support this model: {err}") from err
            log.warning("kernel.method auto: falling back to torch.func (%s)", err)
            self.clf = load_classifier(model_dir, model_cfg, attn_implementation="eager").to(self.device)
            return "func"

    def jacobian(self, texts: list[str]) -> FeatureBlock | np.ndarray:
        """Gradient block of a list of texts: a FeatureBlock (hooks) or (B, C', P) float32 Jacobians (func)."""
        batch = self.clf.encode(texts)
        if self.method == "hooks":
            return block_features(self.clf, batch, self.names, self.kind, max_tokens=self.micro_batch_tokens,
                                  dense_budget_bytes=self.budget, projection=self.projection)
        jac = flat_jacobian(self.clf, batch, self.names, self.kind)
        if self.projection is not None:
            b, c, p = jac.shape
            jac = self.projection.project_flat(jac.reshape(b * c, p), self.names).reshape(b, c, -1)
        return jac.cpu().numpy()

    def features(self, texts: list[str]) -> np.ndarray:
        """Projected feature rows of a list of texts: (B·C', D_shard) float32, rows example-major
        (r = b·C' + c), columns tensor after tensor in selection order (needs ``projection_dim > 0``)."""
        if self.projection is None:
            raise ValueError("features: needs kernel.projection_dim > 0")
        block = self.jacobian(texts)
        if isinstance(block, FeatureBlock):
            return block.dense
        return block.reshape(block.shape[0] * block.shape[1], -1)

    def tile(self, ja: FeatureBlock | np.ndarray, jb: FeatureBlock | np.ndarray, chunk: int) -> np.ndarray:
        """float64 kernel tile between two blocks (see :func:`feature_tile` / :func:`kernel_tile`)."""
        if isinstance(ja, FeatureBlock):
            return feature_tile(ja, jb, chunk=chunk, precision=self.precision)
        return kernel_tile(ja, jb, chunk=chunk)
