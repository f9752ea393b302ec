"""Shapley estimation over the kernel-regression utility: TMC permutations and exact enumeration.

Named `valuation` (not `shapley`) so that the public function `freeshap_ray.shapley` is not shadowed.
"""

from __future__ import annotations

from .exact import MAX_EXACT_N, exact_shapley, subset_utilities
from .tmc import (
    DEFAULT_BLOCK_SIZE,
    PermutationResult,
    empty_utility,
    full_utility,
    permutation_for,
    run_permutation,
    sample_permutations,
)

__all__ = [
    "PermutationResult",
    "run_permutation",
    "permutation_for",
    "sample_permutations",
    "full_utility",
    "empty_utility",
    "exact_shapley",
    "subset_utilities",
    "MAX_EXACT_N",
    "DEFAULT_BLOCK_SIZE",
]
