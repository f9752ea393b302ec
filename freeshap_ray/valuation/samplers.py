"""Permutation samplers: which permutation a permutation id stands for, and what one sample is.

* ``tmc``: permutation ``k`` is ``default_rng([seed, k]).permutation(n)``; truncation as configured.
* ``permutation``: the same permutations, never truncated (plain Monte-Carlo permutation sampling).
* ``antithetic``: ids come in pairs ``(2j, 2j+1)``: ``2j`` is ``default_rng([seed, j]).permutation(n)``
  and ``2j+1`` its reverse. A pair's mean marginal is ONE sample (the two halves are negatively
  correlated, so treating them as independent would misstate the standard error): ``counts`` then
  counts pairs, and batches always hold whole pairs.
"""

from __future__ import annotations

import numpy as np

from .tmc import permutation_for

__all__ = ["SAMPLERS", "sampler_permutation", "effective_tolerance", "permutations_per_sample",
           "samples_from_marginals"]

#: The names ``shapley.sampler`` accepts (checked by the config; functions here trust their input).
SAMPLERS = ("tmc", "permutation", "antithetic")


def permutations_per_sample(sampler: str) -> int:
    """2 for ``antithetic`` (a pair is one sample), else 1."""
    return 2 if sampler == "antithetic" else 1


def effective_tolerance(sampler: str, truncation_tol: float) -> float:
    """The truncation tolerance a sampler uses: 0 for ``permutation``, else ``truncation_tol``."""
    return 0.0 if sampler == "permutation" else float(truncation_tol)


def sampler_permutation(n: int, seed: int, perm_id: int, sampler: str = "tmc") -> np.ndarray:
    """The ``(n,)`` int64 permutation that ``perm_id`` stands for under ``sampler``."""
    if sampler == "antithetic":
        if perm_id < 0:
            raise ValueError(f"perm_id: must be >= 0, got {perm_id}")
        base = permutation_for(n, seed, perm_id // 2)
        return np.ascontiguousarray(base[::-1]) if perm_id % 2 else base
    return permutation_for(n, seed, perm_id)


def samples_from_marginals(perm_ids: np.ndarray, marginals: np.ndarray, sampler: str) -> tuple[np.ndarray, np.ndarray]:
    """Turn per-permutation marginals into independent samples.

    Args:
        perm_ids: ``(P,)`` permutation ids.
        marginals: ``(P, n)`` or ``(P, n, m)``, row ``k`` from permutation ``perm_ids[k]``.
        sampler: the sampler that produced them.

    Returns:
        ``(sample_ids, samples)`` sorted by sample id: for ``antithetic`` the mean of each complete
        pair (``sample_id = perm_id // 2``; an incomplete pair is dropped), otherwise the rows
        themselves (``sample_id = perm_id``).
    """
    ids = np.asarray(perm_ids, dtype=np.int64)
    arr = np.asarray(marginals, dtype=np.float64)
    if arr.shape[:1] != ids.shape:
        raise ValueError(f"marginals: expected {ids.size} rows (one per perm id), got shape {arr.shape}")
    order = np.argsort(ids, kind="stable")
    ids, arr = ids[order], arr[order]
    if permutations_per_sample(sampler) == 1:
        return ids, arr
    pair = ids // 2
    keep = np.zeros(ids.size, dtype=bool)
    # a complete pair is two consecutive sorted ids 2j, 2j+1
    both = (ids[:-1] % 2 == 0) & (ids[1:] == ids[:-1] + 1)
    keep[:-1] |= both
    keep[1:] |= both
    ids, arr, pair = ids[keep], arr[keep], pair[keep]
    return pair[0::2], 0.5 * (arr[0::2] + arr[1::2])
