"""MSR-Banzhaf: Banzhaf values by maximum sample reuse (Wang & Jia 2023, "Data Banzhaf").

The Banzhaf value weighs every coalition alike:

    beta_i = 2^-(n-1) sum_{S in N - {i}} (v(S + i) - v(S)) = E[v(S) | i in S] - E[v(S) | i not in S]

for ``S`` uniform over all subsets (each point in with probability 1/2). MSR samples such subsets, one
utility evaluation each, and every sample updates every point: ``beta_i`` is estimated by the mean
utility of the samples containing ``i`` minus that of the samples without it, with standard error
``sqrt(var_in / count_in + var_out / count_out)`` (two independent sample means given the counts; the
estimate is unbiased given both counts >= 1). It is robust to utility noise (a semivalue that does not
lean on the tiny coalitions where kernel regression is most erratic), but it is not Shapley: ranks
agree only as far as the two semivalues do, and efficiency does not hold.

**Sample** ``k``: ``S_k = {i : u_i < 1/2}`` with ``u = default_rng([seed, k, TAG]).random(n)``, a function
of ``(seed, k)`` only. **Record**: ``sample_id``, the inclusion mask bit-packed (``np.packbits``, ``ceil(n/8)``
bytes) and ``v(S_k)`` (a float, or ``(m,)`` per test point).

**Cost**: ``|S| ≈ n/2``, one direct Cholesky solve per sample: ``O((n/2)^3 / 3 + m (n/2)^2)`` with the
dual kernel (n = 6,000: ~1e10 flops, ~0.3 s on one core per sample); with a feature map of dimension ``D``
the primal solve is ``O(n D^2 / 2 + D^3 / 3)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..utility.metrics import UtilitySpec, resolve_utility
from ..utility.problem import RegressionProblem
from ..values import ValuesResult
from .tmc import empty_utility

__all__ = ["msr_subset", "MSRSample", "msr_sample", "run_msr", "BanzhafStats"]

#: Key mixed into the seed of the subset draws.
_MSR_TAG = 0xBA2F


def msr_subset(n: int, seed: int, sample_id: int) -> np.ndarray:
    """``(n,)`` bool inclusion mask of sample ``sample_id`` (each point in with probability 1/2)."""
    if seed < 0 or sample_id < 0:
        raise ValueError(f"seed/sample_id: must be >= 0, got {seed} and {sample_id}")
    return np.random.default_rng([int(seed), int(sample_id), _MSR_TAG]).random(n) < 0.5


@dataclass
class MSRSample:
    """One MSR record.

    Attributes:
        sample_id: the sample's id.
        mask: ``(ceil(n/8),)`` uint8, the inclusion mask packed by ``np.packbits``.
        utility: ``v(S)``: a float, or ``(m,)`` per test point.
    """

    sample_id: int
    mask: np.ndarray
    utility: float | np.ndarray

    def included(self, n: int) -> np.ndarray:
        """``(n,)`` bool inclusion mask."""
        return np.unpackbits(self.mask, count=n).astype(bool)


def msr_sample(problem: RegressionProblem, seed: int, sample_id: int, utility: UtilitySpec = "accuracy", *,
               per_test_point: bool = False) -> MSRSample:
    """Evaluate ``v(S)`` for the subset of sample ``sample_id`` (one direct solve)."""
    util = resolve_utility(utility)
    mask = msr_subset(problem.n, seed, sample_id)
    pts = np.flatnonzero(mask)
    if pts.size == 0:
        value = empty_utility(problem, util, per_test_point)
    else:
        pred = problem.predict(pts)
        value = util.per_test(pred, problem.y_test) if per_test_point else util(pred, problem.y_test)
    return MSRSample(int(sample_id), np.packbits(mask), value)


def run_msr(problem: RegressionProblem, seed: int, sample_ids, utility: UtilitySpec = "accuracy", *,
            per_test_point: bool = False) -> list[MSRSample]:
    """:func:`msr_sample` for each id (a batch, as one task would run it)."""
    return [msr_sample(problem, seed, int(k), utility, per_test_point=per_test_point) for k in sample_ids]


def _side_stats(mask: np.ndarray, v: np.ndarray, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts, means and M2 of the rows of ``v (P, ...)`` selected per point by ``mask (P, n)``.

    Sums are taken of ``v - shift`` (the batch mean) so that ``M2 = sum x^2 - count mean^2`` does not cancel
    against a large common offset.
    """
    w = mask.astype(np.float64)
    x = (v - shift).reshape(v.shape[0], -1)
    cnt = mask.sum(axis=0).astype(np.int64)
    s1 = w.T @ x
    s2 = w.T @ (x * x)
    c = np.maximum(cnt, 1).astype(np.float64)[:, None]
    mean = s1 / c
    m2 = np.maximum(s2 - s1 * mean, 0.0)
    rest = v.shape[1:]
    return cnt, (mean + shift.reshape(1, -1)).reshape((-1,) + rest), m2.reshape((-1,) + rest)


@dataclass
class BanzhafStats:
    """Per point: counts, means and M2 of ``v(S)`` over samples with and without the point; ``+`` merges exactly.

    Attributes:
        count_in, count_out: ``(n,)`` int64.
        mean_in, mean_out: ``(n,)`` or ``(n, m)``.
        m2_in, m2_out: like the means: sums of squared deviations.
        samples: number of records.
        info: metadata.
    """

    count_in: np.ndarray
    mean_in: np.ndarray
    m2_in: np.ndarray
    count_out: np.ndarray
    mean_out: np.ndarray
    m2_out: np.ndarray
    samples: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_records(cls, masks: np.ndarray, utilities: np.ndarray) -> BanzhafStats:
        """Statistics of ``masks (P, n)`` bool and ``utilities (P,)`` or ``(P, m)``."""
        mk = np.asarray(masks, dtype=bool)
        v = np.asarray(utilities, dtype=np.float64)
        if mk.ndim != 2 or v.ndim not in (1, 2) or v.shape[0] != mk.shape[0] or mk.shape[0] == 0:
            raise ValueError(f"masks/utilities: expected (P, n) and (P,) or (P, m) with P >= 1, "
                             f"got {mk.shape} and {v.shape}")
        shift = v.mean(axis=0)
        ci, mi, si = _side_stats(mk, v, np.atleast_1d(shift))
        co, mo, so = _side_stats(~mk, v, np.atleast_1d(shift))
        return cls(ci, mi, si, co, mo, so, samples=int(mk.shape[0]))

    @classmethod
    def from_samples(cls, n: int, samples: list[MSRSample]) -> BanzhafStats:
        """Statistics of a list of :class:`MSRSample` over ``n`` points."""
        if not samples:
            raise ValueError("samples: need at least one")
        return cls.from_records(np.stack([s.included(n) for s in samples]),
                                np.stack([np.asarray(s.utility, dtype=np.float64) for s in samples]))

    @staticmethod
    def _merge(ca, ma, sa, cb, mb, sb):
        e = (1,) * (ma.ndim - 1)
        fa = ca.astype(np.float64).reshape(ca.shape + e)
        fb = cb.astype(np.float64).reshape(cb.shape + e)
        ft = np.maximum(fa + fb, 1.0)
        d = mb - ma
        return ca + cb, ma + d * (fb / ft), sa + sb + d * d * (fa * fb / ft)

    def __add__(self, other: BanzhafStats) -> BanzhafStats:
        """Exact merge (Chan et al.) of two independent sets of records."""
        if not isinstance(other, BanzhafStats):
            return NotImplemented
        if self.mean_in.shape != other.mean_in.shape:
            raise ValueError(f"cannot merge Banzhaf statistics of shapes {self.mean_in.shape} and "
                             f"{other.mean_in.shape}")
        inside = self._merge(self.count_in, self.mean_in, self.m2_in, other.count_in, other.mean_in, other.m2_in)
        outside = self._merge(self.count_out, self.mean_out, self.m2_out, other.count_out, other.mean_out,
                              other.m2_out)
        return BanzhafStats(*inside, *outside, samples=self.samples + other.samples, info={**self.info, **other.info})

    def __radd__(self, other: object) -> BanzhafStats:
        if isinstance(other, int) and other == 0:
            return self
        return NotImplemented

    def values(self) -> ValuesResult:
        """MSR-Banzhaf values ``mean_in - mean_out`` with two-sample standard errors.

        Returns:
            A :class:`ValuesResult`; ``counts`` = samples (each updates every point), ``stderr`` inf where
            either side has fewer than 2 samples, ``variances = stderr^2 * counts``.
        """
        e = (1,) * (self.mean_in.ndim - 1)
        ci = self.count_in.astype(np.float64).reshape(self.count_in.shape + e)
        co = self.count_out.astype(np.float64).reshape(self.count_out.shape + e)
        ok = np.broadcast_to((ci >= 2) & (co >= 2), self.mean_in.shape)
        var = np.full(self.mean_in.shape, np.inf)
        np.divide(self.m2_in / np.maximum(ci - 1, 1) / np.maximum(ci, 1)
                  + self.m2_out / np.maximum(co - 1, 1) / np.maximum(co, 1), 1.0, out=var, where=ok)
        total = (self.count_in + self.count_out).astype(np.int64)
        return ValuesResult(values=self.mean_in - self.mean_out, stderr=np.sqrt(var), counts=total,
                            variances=np.where(ok, var, 0.0) * total.reshape(total.shape + e),
                            info={"estimator": "msr_banzhaf", "samples": self.samples})
