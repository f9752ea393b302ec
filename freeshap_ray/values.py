"""Running Shapley-value estimates with standard errors, mergeable across workers.

A :class:`ValuesResult` holds per-point sample means, unbiased variances and counts of marginal
contributions. ``a + b`` merges two results exactly (Chan et al. parallel update of mean and M2),
so partial results from independent tasks combine to what :meth:`ValuesResult.from_marginals`
gives on all marginals at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["ValuesResult"]


def _stderr(variances: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``sqrt(var / count)`` where ``count >= 2``, else ``inf``."""
    c = counts.reshape(counts.shape + (1,) * (variances.ndim - 1)).astype(np.float64)
    out = np.full(variances.shape, np.inf)
    ok = np.broadcast_to(c >= 2, variances.shape)
    np.divide(variances, c, out=out, where=ok)
    np.sqrt(out, out=out, where=ok)
    return out


@dataclass
class ValuesResult:
    """Shapley-value estimates.

    Attributes:
        values: ``(n,)`` or ``(n, m)`` mean marginal contribution.
        stderr: same shape; ``sqrt(variances / counts)``, ``inf`` where ``counts < 2``.
        counts: ``(n,)`` int64 number of sampled marginals per point.
        variances: same shape as ``values``; unbiased (ddof=1), 0 where ``counts < 2``.
        status: ``"ok"`` or a short reason the run ended otherwise.
        info: free-form metadata (permutation count, truncation statistics, ...).
    """

    values: np.ndarray
    stderr: np.ndarray
    counts: np.ndarray
    variances: np.ndarray
    status: str = "ok"
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        """Number of training points."""
        return int(self.counts.shape[0])

    @classmethod
    def empty(cls, n: int, m: int | None = None) -> ValuesResult:
        """No samples yet: zeros, ``inf`` standard errors; ``(n,)`` or ``(n, m)``."""
        shape = (n,) if m is None else (n, m)
        return cls(values=np.zeros(shape), stderr=np.full(shape, np.inf),
                   counts=np.zeros(n, dtype=np.int64), variances=np.zeros(shape))

    @classmethod
    def from_marginals(cls, marginals: np.ndarray) -> ValuesResult:
        """Statistics of ``marginals (P, n)`` or ``(P, n, m)`` (one row per permutation)."""
        arr = np.asarray(marginals, dtype=np.float64)
        if arr.ndim not in (2, 3):
            raise ValueError(f"marginals: expected shape (P, n) or (P, n, m), got {arr.shape}")
        p = arr.shape[0]
        counts = np.full(arr.shape[1], p, dtype=np.int64)
        if p == 0:
            return cls.empty(arr.shape[1], arr.shape[2] if arr.ndim == 3 else None)
        values = arr.mean(axis=0)
        variances = arr.var(axis=0, ddof=1) if p >= 2 else np.zeros(values.shape)
        return cls(values=values, stderr=_stderr(variances, counts), counts=counts, variances=variances)

    def _m2(self) -> np.ndarray:
        c = np.maximum(self.counts - 1, 0).astype(np.float64)
        return self.variances * c.reshape(c.shape + (1,) * (self.values.ndim - 1))

    def __add__(self, other: ValuesResult) -> ValuesResult:
        """Exact merge of two independent sample sets (means, M2 and counts)."""
        if not isinstance(other, ValuesResult):
            return NotImplemented
        if other.values.shape != self.values.shape:
            raise ValueError(f"cannot merge values of shape {self.values.shape} and {other.values.shape}")
        na, nb = self.counts, other.counts
        total = na + nb
        expand = (1,) * (self.values.ndim - 1)
        fa = na.astype(np.float64).reshape(na.shape + expand)
        fb = nb.astype(np.float64).reshape(nb.shape + expand)
        ft = np.maximum(fa + fb, 1.0)
        delta = other.values - self.values
        values = self.values + delta * (fb / ft)
        m2 = self._m2() + other._m2() + delta * delta * (fa * fb / ft)
        variances = np.where(fa + fb >= 2, m2 / np.maximum(fa + fb - 1.0, 1.0), 0.0)
        status = self.status if self.status != "ok" else other.status
        return ValuesResult(values=values, stderr=_stderr(variances, total), counts=total,
                            variances=variances, status=status, info={**self.info, **other.info})

    def __radd__(self, other: object) -> ValuesResult:
        """Support ``sum(results)`` (which starts from 0)."""
        if isinstance(other, int) and other == 0:
            return self
        return NotImplemented
