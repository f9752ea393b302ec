"""Empirical NTK: float64 tiles from per-example Jacobians, tiling plan, checks."""

from __future__ import annotations

from .ntk import condition_number, feature_kernel, kernel_tile, spectrum_summary
from .plan import Tile, blocks, plan_signature, tiles

__all__ = ["Tile", "blocks", "condition_number", "feature_kernel", "kernel_tile", "plan_signature", "spectrum_summary",
           "tiles"]
