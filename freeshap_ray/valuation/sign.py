"""Sign robustness: is the sign of a value stable across independent halves of the samples?

The FreeShap paper reports how often the sign of a training point's value agrees between
independent estimates. With ``S`` independent samples (permutations, or antithetic pairs) we
split them into two disjoint halves, estimate the values on each half and compare signs:

* ``halves``: the fixed split into even and odd sample positions (sorted by id); the fraction of
  points whose two half-estimates have the same sign.
* ``per_point``: for each point, the fraction of ``n_splits`` random half/half splits in which
  its two half-estimates agree in sign (1.0 = always the same sign).

The sign of 0 is 0, so a point whose marginals are all 0 (e.g. always truncated) agrees with itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["SignReport", "sign_agreement"]


@dataclass
class SignReport:
    """Result of :func:`sign_agreement`.

    Attributes:
        per_point: ``(n,)`` fraction of random half-splits in which the point's sign agrees (nan if < 2 samples).
        halves: fraction of points whose sign agrees between the even and odd halves (nan if < 2 samples).
        mean: mean of ``per_point`` (the overall random-split agreement).
        n_splits: number of random splits.
        n_samples: number of samples split.
    """

    per_point: np.ndarray
    halves: float
    mean: float
    n_splits: int
    n_samples: int

    def as_info(self) -> dict[str, float | int]:
        """Plain-number summary for a manifest."""
        return {"sign_agreement_halves": self.halves, "sign_agreement_mean": self.mean,
                "sign_agreement_splits": self.n_splits, "sign_agreement_samples": self.n_samples}


def sign_agreement(samples: np.ndarray, n_splits: int = 100, seed: int = 0) -> SignReport:
    """Sign stability of per-point values across independent halves of ``samples (S, n)``.

    Args:
        samples: ``(S, n)`` independent per-point samples (rows sorted by sample id).
        n_splits: random half/half splits for ``per_point`` (``>= 1``).
        seed: seed of the random splits.

    Returns:
        A :class:`SignReport`.
    """
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"samples: expected shape (S, n), got {x.shape}")
    if n_splits < 1:
        raise ValueError(f"n_splits: must be >= 1, got {n_splits}")
    s, n = x.shape
    if s < 2:
        return SignReport(np.full(n, np.nan), float("nan"), float("nan"), n_splits, s)
    even, odd = x[0::2].mean(axis=0), x[1::2].mean(axis=0)
    halves = float(np.mean(np.sign(even) == np.sign(odd)))
    rng = np.random.default_rng([int(seed), 0x5167])
    half = s // 2
    masks = np.zeros((n_splits, s))
    for b in range(n_splits):
        masks[b, rng.permutation(s)[:half]] = 1.0
    total = x.sum(axis=0)
    first = masks @ x  # (B, n) sums over the first half
    second = total[None, :] - first
    # signs of the half means = signs of the half sums (positive sizes)
    agree = np.sign(first) == np.sign(second)
    per_point = agree.mean(axis=0)
    return SignReport(per_point, halves, float(per_point.mean()), n_splits, s)
