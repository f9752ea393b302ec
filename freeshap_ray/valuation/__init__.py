"""Data values over the kernel-regression utility: exact enumeration (tests), TMC/permutation/antithetic
sampling (:mod:`.tmc`, :mod:`.samplers`), stratified Shapley (:mod:`.stratified`), control variates for
permutations (:mod:`.control_variate`) and MSR-Banzhaf (:mod:`.banzhaf`).

Named `valuation` (not `shapley`) so that the public function `freeshap_ray.shapley` is not shadowed.
"""

from __future__ import annotations

from .banzhaf import BanzhafStats, MSRSample, msr_sample, msr_subset, run_msr
from .control_variate import CVStats, control_mean, sample_controls, size_bin_basis
from .convergence import CRITERIA, StoppingRule
from .exact import MAX_EXACT_N, exact_banzhaf, exact_shapley, exact_stratum_means, subset_utilities
from .samplers import (
    SAMPLERS,
    effective_tolerance,
    permutations_per_sample,
    sampler_permutation,
    samples_from_marginals,
)
from .sign import SignReport, sign_agreement
from .stratified import (
    StrataPlan,
    StrataStats,
    StratifiedSample,
    allocate,
    geometric_edges,
    marginal_cost,
    run_stratified,
    stratified_sample,
    uniform_plan,
)
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
    "exact_banzhaf",
    "exact_stratum_means",
    "subset_utilities",
    "MAX_EXACT_N",
    "DEFAULT_BLOCK_SIZE",
    "SAMPLERS",
    "effective_tolerance",
    "permutations_per_sample",
    "sampler_permutation",
    "samples_from_marginals",
    "CRITERIA",
    "StoppingRule",
    "SignReport",
    "sign_agreement",
    "BanzhafStats",
    "MSRSample",
    "msr_sample",
    "msr_subset",
    "run_msr",
    "CVStats",
    "control_mean",
    "sample_controls",
    "size_bin_basis",
    "StrataPlan",
    "StrataStats",
    "StratifiedSample",
    "allocate",
    "geometric_edges",
    "marginal_cost",
    "run_stratified",
    "stratified_sample",
    "uniform_plan",
]
