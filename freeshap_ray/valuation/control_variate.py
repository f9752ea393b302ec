"""Control variates for permutation sampling: a size profile whose exact mean is known.

A control variate for point ``i`` is a statistic ``Z_i`` of each sample with a known mean ``mu_Z``:

    phi_i ≈ mean_k [ Delta_i^(k) - c_i^T (Z_i^(k) - mu_Z) ],

unbiased for any fixed ``c_i``, with the least variance at ``c_i = Cov(Z)^-1 Cov(Z, Delta_i)``.

**Why not an additive surrogate game.** ``g(S) = sum_{j in S} w_j`` (``w`` = LOO values, first-point
marginals ``v({i}) - v(empty)``, a linearisation of ``v`` around the full set, ...) has exact Shapley values
``w`` for free, but its marginal ``Delta_i g = w_i`` is the same in every sample: it has no covariance with
``Delta_i v`` across samples, so it removes no variance from a per-point mean (it only helps estimators
that pool points, e.g. regression-based ones). A useful control must vary with the coalition.

**What is used.** In a permutation, ``Delta_i v`` depends on the coalition partly through its size: a
point added early moves the predictions far more than one added late. The control is a function of the
position ``p_i`` of ``i`` in the permutation (the size of its coalition), ``Z_i = b(p_i)`` with a small
basis ``b``: by default indicators of size bins of ratio 4 (:func:`default_basis`; the regression on them
is post-stratification by size), or the profile ``1/(p+1), 1/sqrt(p+1)`` (:data:`DEFAULT_BASIS`).
Positions are uniform on ``0..n-1``, so ``mu_Z = (1/n) sum_p b(p)`` exactly. Equivalently ``Z`` is the
marginal of the symmetric game ``g(S) = sum_{s < |S|} b(s)``, whose exact Shapley values are
``(1/n) sum_s b(s)``; the coefficient ``c_i`` (per point; per point and test point in per-test mode)
supplies the point-specific scale and sign.

**Does it earn its keep?** Measured (``benchmarks/bench_estimators_math.py``, equal samples): variance
ratios plain/CV of 1.2-1.7 at n = 300 on a full-rank kernel (~2,500 permutations), ~1.0-1.1 on a rank-64
kernel, and at n = 2,000 (rank 256, ~180 permutations) 0.91-1.0 for the bins and 0.76-0.85 for the
``1/(p+1)`` profile (heavy-tailed: a rare early position dominates a fold's mean). Size explains little of
a marginal's variance once the kernel regression interpolates, and a per-point coefficient needs many
samples per point. It is kept as a cheap option for small n, not as a default.

**Estimated coefficients, cross-fitted.** ``c`` fitted on the same samples makes the estimate biased by
``O(1/P)``. Samples are split by id parity into two folds and each fold is corrected with the coefficient
fitted on the other fold: then ``c`` is independent of the samples it corrects and the estimate is
unbiased. The standard error treats the corrected samples as independent (their coefficient comes from
the other fold, a dependence of order ``1/P``).

**Records**: the permutation marginals that :mod:`~freeshap_ray.valuation.tmc` already streams
(``perm_id``, ``marginals``); the positions follow from ``(n, seed, perm_id, sampler)``. Any permutation
sampler works: ``permutation`` (unbiased for Shapley), ``antithetic`` (a pair is one sample, its control
the mean over the pair's two positions, same ``mu_Z``) and ``tmc`` (unbiased for what TMC estimates).
:class:`CVStats` holds per-fold co-moments, merges exactly and gives the values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ..values import ValuesResult
from .samplers import permutations_per_sample, sampler_permutation

__all__ = ["DEFAULT_BASIS", "default_basis", "size_bin_basis", "position_basis", "control_mean", "sample_controls",
           "CVStats"]

Basis = Sequence[Callable[[np.ndarray], np.ndarray]]

#: A control's coefficient is fitted only with at least this many samples per basis function in a fold.
MIN_PER_CONTROL = 10
#: ... and kept only where its fit explains this adjusted fraction of the fold's variance.
MIN_ADJ_R2 = 0.05

#: ``1/(p+1)`` and ``1/sqrt(p+1)`` of the position ``p`` (coalition size): the size profile of the marginals'
#: magnitude. Heavy-tailed at large n (a rare early position dominates a fold's mean), where it hurts.
DEFAULT_BASIS: tuple[Callable[[np.ndarray], np.ndarray], ...] = (
    lambda p: 1.0 / (p + 1.0),
    lambda p: 1.0 / np.sqrt(p + 1.0),
)


def size_bin_basis(edges: np.ndarray) -> tuple[Callable[[np.ndarray], np.ndarray], ...]:
    """Indicators ``1[edges[h] <= p < edges[h+1]]`` of size bins: the regression on them is post-stratification
    of the permutation samples by coalition size (the indicators sum to 1; the pseudo-inverse drops that
    direction and any bin a fold never saw)."""
    e = np.asarray(edges, dtype=np.int64)
    return tuple((lambda p, lo=int(lo), hi=int(hi): ((p >= lo) & (p < hi)).astype(np.float64))
                 for lo, hi in zip(e[:-1], e[1:]))


def default_basis(n: int) -> tuple[Callable[[np.ndarray], np.ndarray], ...]:
    """The default control: indicators of size bins of ratio 4 (post-stratification; bounded, so it never
    hurt by more than a few % in the measurements, unlike :data:`DEFAULT_BASIS` at large n)."""
    from .stratified import geometric_edges

    return size_bin_basis(geometric_edges(n, ratio=4.0))


def position_basis(positions: np.ndarray, basis: Basis = DEFAULT_BASIS) -> np.ndarray:
    """``(..., q)`` basis functions of integer positions ``(...)``."""
    p = np.asarray(positions, dtype=np.float64)
    return np.stack([np.asarray(f(p), dtype=np.float64) * np.ones_like(p) for f in basis], axis=-1)


def control_mean(n: int, basis: Basis | None = None) -> np.ndarray:
    """``(q,)`` exact mean of the basis (None: :func:`default_basis`) over a uniform position in ``0..n-1``."""
    return position_basis(np.arange(n), default_basis(n) if basis is None else basis).mean(axis=0)


def sample_controls(n: int, seed: int, sample_ids: np.ndarray, sampler: str = "permutation",
                    basis: Basis | None = None) -> np.ndarray:
    """Controls of samples: ``(P, n, q)``; ``basis`` None is :func:`default_basis`.

    A sample is one permutation (``perm_id = sample_id``), or for ``antithetic`` the pair
    ``(2 sample_id, 2 sample_id + 1)`` whose control is the mean over the pair.
    """
    basis = default_basis(n) if basis is None else basis
    per = permutations_per_sample(sampler)
    out = np.zeros((len(sample_ids), n, len(basis)))
    for row, k in enumerate(np.asarray(sample_ids, dtype=np.int64)):
        for half in range(per):
            perm = sampler_permutation(n, seed, int(k) * per + half, sampler)
            pos = np.empty(n, dtype=np.int64)
            pos[perm] = np.arange(n)
            out[row] += position_basis(pos, basis)
        out[row] /= per
    return out


def _inv_psd(a: np.ndarray, scale: np.ndarray, rcond: float = 1e-10) -> np.ndarray:
    """Pseudo-inverse of a stack of small symmetric PSD matrices ``(..., q, q)``.

    Directions with eigenvalue ``<= rcond * scale`` (``scale (...)``: the size of the raw second moments, so a
    control that is constant up to rounding counts as degenerate) are dropped.
    """
    w, v = np.linalg.eigh(a)
    cut = rcond * np.maximum(np.max(np.abs(w), axis=-1), scale)[..., None]
    inv_w = np.where(w > cut, 1.0 / np.where(w > cut, w, 1.0), 0.0)
    return np.einsum("...ij,...j,...kj->...ik", v, inv_w, v)


@dataclass
class CVStats:
    """Per-fold (sample id parity) statistics of marginals ``d`` and controls ``z``; ``+`` merges exactly.

    Attributes:
        count: ``(2, n)`` int64 samples per fold (the same for every point).
        mean_d: ``(2, n)`` or ``(2, n, m)``.
        mean_z: ``(2, n, q)``.
        m2_d: like ``mean_d``: sum of squared deviations of ``d``.
        c_zd: ``(2, n, q)`` or ``(2, n, q, m)``: co-moment ``sum (z - mean_z)(d - mean_d)``.
        c_zz: ``(2, n, q, q)``.
        mu_z: ``(q,)`` exact mean of the controls.
        info: metadata.
    """

    count: np.ndarray
    mean_d: np.ndarray
    mean_z: np.ndarray
    m2_d: np.ndarray
    c_zd: np.ndarray
    c_zz: np.ndarray
    mu_z: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_samples(cls, sample_ids: np.ndarray, marginals: np.ndarray, controls: np.ndarray,
                     mu_z: np.ndarray) -> CVStats:
        """Statistics of ``marginals (P, n[, m])`` with ``controls (P, n, q)`` of known mean ``mu_z (q,)``."""
        ids = np.asarray(sample_ids, dtype=np.int64)
        d = np.asarray(marginals, dtype=np.float64)
        z = np.asarray(controls, dtype=np.float64)
        if d.ndim not in (2, 3) or d.shape[0] != ids.size or z.shape[:2] != d.shape[:2] or z.ndim != 3:
            raise ValueError(f"sample_ids/marginals/controls: expected (P,), (P, n[, m]) and (P, n, q), got "
                             f"{ids.shape}, {d.shape} and {z.shape}")
        n, q = d.shape[1], z.shape[2]
        rest = d.shape[2:]
        count = np.zeros((2, n), dtype=np.int64)
        mean_d, m2_d = np.zeros((2, n) + rest), np.zeros((2, n) + rest)
        mean_z = np.zeros((2, n, q))
        c_zd, c_zz = np.zeros((2, n, q) + rest), np.zeros((2, n, q, q))
        for f in (0, 1):
            sel = ids % 2 == f
            k = int(sel.sum())
            if k == 0:
                continue
            df, zf = d[sel], z[sel]
            count[f] = k
            mean_d[f], mean_z[f] = df.mean(axis=0), zf.mean(axis=0)
            dd, dz = df - mean_d[f], zf - mean_z[f]
            m2_d[f] = (dd * dd).sum(axis=0)
            c_zd[f] = np.einsum("pnq,pn...->nq...", dz, dd)
            c_zz[f] = np.einsum("pnq,pnr->nqr", dz, dz)
        return cls(count, mean_d, mean_z, m2_d, c_zd, c_zz, np.asarray(mu_z, dtype=np.float64))

    def __add__(self, other: CVStats) -> CVStats:
        """Exact merge (Chan et al. co-moment update per fold)."""
        if not isinstance(other, CVStats):
            return NotImplemented
        if self.mean_d.shape != other.mean_d.shape or self.mean_z.shape != other.mean_z.shape \
                or not np.array_equal(self.mu_z, other.mu_z):
            raise ValueError("cannot merge control-variate statistics of different shapes or controls")
        ea = (1,) * (self.mean_d.ndim - 2)
        na = self.count.astype(np.float64)
        nb = other.count.astype(np.float64)
        nt = np.maximum(na + nb, 1.0)
        wb = nb / nt
        w_ab = na * nb / nt
        dd = other.mean_d - self.mean_d
        dz = other.mean_z - self.mean_z
        x = lambda a, k: a.reshape(a.shape + (1,) * k)  # noqa: E731
        mean_d = self.mean_d + dd * x(wb, len(ea))
        mean_z = self.mean_z + dz * x(wb, 1)
        m2_d = self.m2_d + other.m2_d + dd * dd * x(w_ab, len(ea))
        c_zd = self.c_zd + other.c_zd + np.einsum("fnq,fn...->fnq...", dz, dd) * x(w_ab, 1 + len(ea))
        c_zz = self.c_zz + other.c_zz + np.einsum("fnq,fnr->fnqr", dz, dz) * x(w_ab, 2)
        return CVStats(self.count + other.count, mean_d, mean_z, m2_d, c_zd, c_zz, self.mu_z,
                       {**self.info, **other.info})

    def __radd__(self, other: object) -> CVStats:
        if isinstance(other, int) and other == 0:
            return self
        return NotImplemented

    def coefficients(self, fold: int) -> np.ndarray:
        """``(n, q)`` or ``(n, q, m)`` least-squares coefficient fitted on ``fold``.

        Guarded, per point (and test point): 0 with fewer than ``MIN_PER_CONTROL * q`` samples in the fold,
        and 0 where the fit's adjusted R^2 ``1 - (1 - R^2)(P - 1)/(P - q - 1)`` is below ``MIN_ADJ_R2``: a
        coefficient that explains little is mostly noise, and applying a noisy one to the other fold adds
        variance (measured: at n = 2,000 with ~90 samples per fold the unguarded size control raised the
        variance by 1/0.76). The decision uses only this fold, so the cross-fitted estimate stays unbiased.
        """
        q = self.mean_z.shape[2]
        raw = self.count[fold] * np.max(self.mean_z[fold] ** 2, axis=-1)  # (n,) size of sum z^2
        inv = _inv_psd(self.c_zz[fold], raw)
        c = np.einsum("nqr,nr...->nq...", inv, self.c_zd[fold])
        p = float(self.count[fold].min()) if self.count[fold].size else 0.0
        if p < MIN_PER_CONTROL * q:
            return np.zeros_like(c)
        explained = np.einsum("nq...,nq...->n...", c, self.c_zd[fold])
        m2 = self.m2_d[fold]
        r2 = np.divide(explained, m2, out=np.zeros_like(m2), where=m2 > 0)
        adj = 1.0 - (1.0 - r2) * (p - 1.0) / (p - q - 1.0)
        return np.where(np.expand_dims(adj >= MIN_ADJ_R2, 1), c, 0.0)

    def plain(self) -> ValuesResult:
        """The uncorrected sample means (what plain permutation sampling reports)."""
        cnt = self.count.sum(axis=0)
        e = (1,) * (self.mean_d.ndim - 2)
        w = self.count.astype(np.float64).reshape(self.count.shape + e)
        tot = np.maximum(w.sum(axis=0), 1.0)
        mean = (w * self.mean_d).sum(axis=0) / tot
        m2 = self.m2_d.sum(axis=0) + (w * (self.mean_d - mean) ** 2).sum(axis=0)
        var = np.where(tot >= 2, m2 / np.maximum(tot - 1.0, 1.0), 0.0)
        se = np.where(tot >= 2, np.sqrt(var / tot), np.inf)
        return ValuesResult(values=mean, stderr=se, counts=cnt, variances=var, info={"estimator": "permutation"})

    def values(self) -> ValuesResult:
        """Cross-fitted control-variate estimate.

        Fold ``f`` is corrected with the coefficient of fold ``1 - f``:
        ``est_f = mean_d[f] - c^T (mean_z[f] - mu_z)``; the estimate is the count-weighted mean of the two
        and ``stderr^2 = sum_f (P_f/P)^2 var_f / P_f`` with ``var_f`` the variance of the corrected samples
        of fold ``f``. Needs ``>= 2`` samples in each fold (``q + 2`` for a non-zero coefficient).

        Returns:
            A :class:`ValuesResult` (``variances = stderr^2 * counts``); ``info`` holds the mean variance
            ratio plain / corrected.
        """
        e = (1,) * (self.mean_d.ndim - 2)
        total = self.count.sum(axis=0).astype(np.float64)
        est = np.zeros(self.mean_d.shape[1:])
        var_est = np.zeros(self.mean_d.shape[1:])
        for f in (0, 1):
            pf = self.count[f].astype(np.float64)
            c = self.coefficients(1 - f)
            shift = self.mean_z[f] - self.mu_z  # (n, q)
            est_f = self.mean_d[f] - np.einsum("nq...,nq->n...", c, shift)
            # variance of corrected samples d - c^T z within fold f
            m2 = self.m2_d[f] - 2 * np.einsum("nq...,nq...->n...", c, self.c_zd[f]) \
                + np.einsum("nq...,nqr,nr...->n...", c, self.c_zz[f], c)
            var_f = np.where(pf.reshape(pf.shape + e) >= 2, m2 / np.maximum(pf - 1.0, 1.0).reshape(pf.shape + e),
                             np.inf)
            share = (pf / np.maximum(total, 1.0)).reshape(pf.shape + e)
            est += share * est_f
            var_est += share ** 2 * np.where(pf.reshape(pf.shape + e) > 0, var_f / np.maximum(pf, 1.0).reshape(
                pf.shape + e), 0.0)
        if np.any(self.count < 2):
            var_est = np.full_like(var_est, np.inf)
        cnt = self.count.sum(axis=0)
        se = np.sqrt(np.maximum(var_est, 0.0))
        plain = self.plain()
        ok = np.isfinite(se) & (se > 0)
        ratio = float(np.mean(plain.stderr[ok] ** 2 / se[ok] ** 2)) if ok.any() else float("nan")
        return ValuesResult(values=est, stderr=se, counts=cnt,
                            variances=np.where(np.isfinite(var_est), var_est, 0.0) * total.reshape(total.shape + e),
                            info={"estimator": "control_variate", "variance_ratio": ratio})
