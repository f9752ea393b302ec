"""Exact incremental kernel regression along a growing set of training points (float64).

With ``Ks[S, S] + lam I = L L^T``, ``A = KTs[:, S] L^-T`` and ``B = L^-1 T[S]`` the predictions of
the prefix ``S`` are ``F = A B``. Appending rows ``N`` (one or more training points, ``g`` rows each):

    X  = L^-1 Ks[S, N]                      (triangular solve)
    D  = chol(Ks[N, N] + lam I - X^T X)     (small Cholesky of the Schur complement)
    A' = (KTs[:, N] - A X) D^-T
    B' = D^-1 (T[N] - X^T B)
    F += A' B'

Because ``D`` is lower triangular, the first ``j`` rows of ``A'``/``B'`` are exactly the update for
the first ``j`` appended rows, so a block of points yields every intermediate prefix's predictions
with level-3 BLAS. Each step is exact (no refresh, no drift beyond float64 rounding).
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import blas, lapack

from ..errors import KernelError
from ._blas import trsm_lower_inplace
from .problem import RegressionProblem

__all__ = ["IncrementalRegressor"]


def _solve_lower(L: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """``L^-1 rhs`` for lower-triangular ``L (k, k)`` and ``rhs (k, c)`` via BLAS ``dtrsm``.

    BLAS ``dtrsm`` is called directly rather than LAPACK ``trtrs`` (``solve_triangular``): it has
    much less call overhead and, in OpenBLAS, no multithreading on tiny systems (which makes
    thousands of small solves crawl on a busy machine).
    """
    if L.flags.f_contiguous:
        return blas.dtrsm(1.0, L, rhs, lower=1)
    # A C-ordered L is an F-ordered L^T (upper triangular): solve (L^T)^T X = rhs without a transpose copy.
    return blas.dtrsm(1.0, np.ascontiguousarray(L).T, rhs, lower=0, trans_a=1)


def _first_bad_pivot(S: np.ndarray) -> tuple[int, float]:
    """Unblocked Cholesky of the small symmetric ``S``; index and value of the first pivot ``<= 0``.

    Returns ``(-1, nan)`` if all pivots are positive (should not happen when called after a failure).
    """
    q = S.shape[0]
    L = np.zeros_like(S)
    for t in range(q):
        pivot = S[t, t] - L[t, :t] @ L[t, :t]
        if not (np.isfinite(pivot) and pivot > 0):
            return t, float(pivot)
        L[t, t] = np.sqrt(pivot)
        L[t + 1:, t] = (S[t + 1:, t] - L[t + 1:, :t] @ L[t, :t]) / L[t, t]
    return -1, float("nan")


class IncrementalRegressor:
    """Grows the Cholesky factor ``L`` of ``Ks[S, S] + lam I`` one point (or block) at a time.

    Keeps ``A = KTs[:, S] L^-T`` (stored transposed, ``(|S|*g, m*g)``), ``B = L^-1 T[S]``
    (``(|S|*g, r)``) and ``F = A B``. Memory is preallocated for all ``n*g`` rows.

    Args:
        problem: the regression problem.
    """

    def __init__(self, problem: RegressionProblem) -> None:
        self.problem = problem
        rows = problem.n * problem.group
        self._L = np.zeros((rows, rows), order="F")  # F-order: L[:s, :s] is solved in place (lda = rows)
        self._At = np.zeros((rows, problem.KT.shape[0]))
        self._B = np.zeros((rows, problem.T.shape[1]))
        self._F = np.zeros((problem.KT.shape[0], problem.T.shape[1]))
        self._rows = np.zeros(rows, dtype=np.int64)
        self._order = np.zeros(problem.n, dtype=np.int64)
        self._added = np.zeros(problem.n, dtype=bool)
        self._size = 0  # rows in S
        self._count = 0  # points in S

    @property
    def size(self) -> int:
        """Number of training points added so far."""
        return self._count

    @property
    def order(self) -> np.ndarray:
        """``(size,)`` training indices in the order they were added."""
        return self._order[: self._count].copy()

    @property
    def predictions(self) -> np.ndarray:
        """``(m, C)`` predictions of the current prefix (zeros when empty)."""
        return self.problem.reshape_predictions(self._F.copy())

    def add(self, i: int) -> np.ndarray:
        """Add training point ``i`` (its ``g`` rows).

        Returns:
            ``(m, C)`` predictions of the prefix including ``i``.

        Raises:
            KernelError: the Schur complement is not positive definite (kernel not PSD).
            ValueError: ``i`` out of range or already added.
        """
        return self.extend(np.array([i], dtype=np.int64))[0]

    def extend(self, points: np.ndarray) -> np.ndarray:
        """Add several training points in order, in one level-3 update.

        Args:
            points: ``(b,)`` distinct training indices not yet added.

        Returns:
            ``(b, m, C)``: entry ``j`` holds the predictions after adding ``points[:j+1]``.

        Raises:
            KernelError: the Schur complement is not positive definite (kernel not PSD).
            ValueError: indices out of range, repeated, or already added.
        """
        prob = self.problem
        pts = prob.check_points(points, name="points")
        if pts.size == 0:
            return np.zeros((0, prob.m, prob.n_classes))
        if np.any(self._added[pts]):
            raise ValueError(f"points: training point {int(pts[self._added[pts]][0])} was already added")
        s, new = self._size, prob.rows(pts)
        q, g = new.size, prob.group
        S = self._rows[:s]
        K_new = prob.K[new]  # (q, n*g) rows of the symmetric kernel
        if s:
            # K[S, new] = K[new, S]^T: a C-ordered (q, s) gather is an F-ordered (s, q) matrix (no copy).
            X = trsm_lower_inplace(self._L, s, np.ascontiguousarray(K_new[:, S]).T)
        else:
            X = np.zeros((0, q))
        schur = K_new[:, new] + prob.lam * np.eye(q) - X.T @ X
        D = self._factor_schur(schur, pts)
        R = prob.KT[:, new] - self._At[:s].T @ X  # (m*g, q)
        At_new = _solve_lower(D, R.T)  # (q, m*g)
        B_new = _solve_lower(D, prob.T[new] - X.T @ self._B[:s])  # (q, r)
        if not (np.all(np.isfinite(At_new)) and np.all(np.isfinite(B_new))):
            raise KernelError(f"kernel regression became non-finite while adding training points "
                              f"{pts[:5].tolist()}...; the kernel is numerically singular (lam={prob.lam:g})")
        # Commit (nothing above mutated state, so a failure leaves the regressor unchanged).
        self._L[s:s + q, :s] = X.T
        self._L[s:s + q, s:s + q] = D
        self._At[s:s + q] = At_new
        self._B[s:s + q] = B_new
        self._rows[s:s + q] = new
        self._order[self._count:self._count + pts.size] = pts
        self._added[pts] = True
        self._size += q
        self._count += pts.size
        b = pts.size
        a3, b3 = At_new.reshape(b, g, -1), B_new.reshape(b, g, -1)
        contrib = a3[:, 0, :, None] * b3[:, 0, None, :]  # (b, m*g, r): per-point rank-g updates
        for j in range(1, g):
            contrib += a3[:, j, :, None] * b3[:, j, None, :]
        cum = np.cumsum(contrib, axis=0)
        cum += self._F
        self._F = cum[-1].copy()
        return prob.reshape_predictions(cum)

    def _factor_schur(self, schur: np.ndarray, pts: np.ndarray) -> np.ndarray:
        """Lower Cholesky of the Schur complement or a KernelError naming the failing point."""
        if np.all(np.isfinite(schur)):
            c, info = lapack.dpotrf(schur, lower=1, clean=1)
            if info == 0:
                return c
        t, pivot = _first_bad_pivot(schur)
        t = max(t, 0)
        point = int(pts[t // self.problem.group])
        position = self._count + t // self.problem.group
        raise KernelError(
            f"kernel is not positive semi-definite: adding training point {point} (position {position} "
            f"in the order) gives Schur-complement pivot {pivot:.6g} <= 0 for K/kernel_divisor + lam I "
            f"(lam={self.problem.lam:g}); check that the kernel is a symmetric PSD Gram matrix or "
            f"increase lam")
