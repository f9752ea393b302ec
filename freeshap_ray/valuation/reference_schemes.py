"""Baseline prefix-utility paths, for benchmarks and stability tests (not used by the engine).

* :class:`ResolveBaseline`: every prefix re-solved from scratch in float64 (``cho_factor`` /
  ``cho_solve``): exact, ``O(k^3)`` per prefix.
* :class:`SchurFloat32Baseline`: our re-implementation of the reference FreeShap scheme: the
  inverse of ``K[S, S] + lam I`` is kept in float32 and grown one point at a time with the
  block-inverse (Schur-complement) formula, starting from a direct inverse of the first
  ``start`` points and replaced by a direct inverse every ``refresh`` steps. With
  ``faithful_order=True`` the update is evaluated with the reference's left-to-right association
  ``A + (((A b) s^-1) c) A`` (an ``O(k^3)`` product per step, which is what makes the reference
  slow); ``False`` uses the ``O(k^2)`` rank-one ordering of the same float32 update.

Both yield test predictions ``(m, C)`` of each prefix for first-logit problems (``group == 1``).
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from ..utility.problem import RegressionProblem

__all__ = ["ResolveBaseline", "SchurFloat32Baseline"]


def _first_logit(problem: RegressionProblem) -> None:
    if problem.group != 1:
        raise ValueError("baselines support first_logit problems only (group == 1)")


class ResolveBaseline:
    """Predictions of a prefix by a direct float64 Cholesky solve."""

    def __init__(self, problem: RegressionProblem, permutation: np.ndarray) -> None:
        _first_logit(problem)
        self.problem, self.perm = problem, np.asarray(permutation, dtype=np.int64)

    def predict(self, k: int) -> np.ndarray:
        """``(m, C)`` predictions of ``perm[:k]`` (``k >= 1``)."""
        p = self.problem
        s = self.perm[:k]
        a = p.K[np.ix_(s, s)] + p.lam * np.eye(k)
        coef = scipy.linalg.cho_solve(scipy.linalg.cho_factor(a, lower=True, check_finite=False), p.T[s],
                                      check_finite=False)
        return p.KT[:, s] @ coef


class SchurFloat32Baseline:
    """The reference's float32 Schur-complement inverse updates with periodic direct refresh."""

    def __init__(self, problem: RegressionProblem, permutation: np.ndarray, *, start: int = 500,
                 refresh: int = 500, faithful_order: bool = True) -> None:
        _first_logit(problem)
        self.problem, self.perm = problem, np.asarray(permutation, dtype=np.int64)
        self.start, self.refresh, self.faithful = start, refresh, faithful_order
        self.K32 = (problem.K + problem.lam * np.eye(problem.n)).astype(np.float32)
        self.KT32 = problem.KT.astype(np.float32)
        self.T32 = problem.T.astype(np.float32)
        self.inv: np.ndarray | None = None
        self.k = 0

    def _direct(self, k: int) -> None:
        s = self.perm[:k]
        self.inv = np.linalg.inv(self.K32[np.ix_(s, s)]).astype(np.float32)
        self.k = k

    def _grow(self) -> None:
        """Append ``perm[k]`` to the inverse with the block-inverse formula (float32)."""
        k, j = self.k, self.perm[self.k]
        s = self.perm[:k]
        a = self.inv
        b = self.K32[s, j][:, None]  # (k, 1)
        c = b.T  # symmetric kernel
        d = self.K32[j, j]
        ab = a @ b
        schur = np.float32(d - (c @ ab)[0, 0])
        sinv = np.float32(1.0) / schur
        if self.faithful:
            upper_left = a + ((ab * sinv) @ c) @ a  # reference association: an O(k^3) product
        else:
            upper_left = a + (ab * sinv) @ ab.T
        new = np.empty((k + 1, k + 1), dtype=np.float32)
        new[:k, :k] = upper_left
        new[:k, k:] = -ab * sinv
        new[k:, :k] = -(c @ a) * sinv if self.faithful else new[:k, k:].T
        new[k, k] = sinv
        self.inv, self.k = new, k + 1

    def advance_to(self, k: int) -> None:
        """Bring the inverse to prefix ``k`` (direct at ``start`` and every ``refresh`` steps after it)."""
        while self.k < k:
            nxt = self.k + 1
            if nxt == 1 or nxt == self.start or (nxt > self.start and (nxt - self.start) % self.refresh == 0):
                self._direct(nxt)
            else:
                self._grow()

    def predict(self, k: int) -> np.ndarray:
        """``(m, C)`` predictions of ``perm[:k]`` (float32 arithmetic, returned as float64)."""
        self.advance_to(k)
        s = self.perm[:k]
        return (self.KT32[:, s] @ (self.inv @ self.T32[s])).astype(np.float64)

    def train_loss(self) -> float:
        """Mean squared error of the current prefix's fit on its own training targets (float64)."""
        s = self.perm[: self.k]
        fit = self.problem.K[np.ix_(s, s)] @ (self.inv.astype(np.float64) @ self.problem.T[s])
        return float(np.mean((fit - self.problem.T[s]) ** 2))
