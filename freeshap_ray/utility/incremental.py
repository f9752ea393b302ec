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

The factor of every prefix ``order[:t]`` is the leading block of ``L``, so once the order has been
walked to some length, coalitions one point away from any prefix cost one triangular solve each
(read-only, batched over points, level-3):

* :meth:`IncrementalRegressor.branch_updates`: ``F(order[:t] + j) - F(order[:t])`` for ``j`` not in
  the prefix: the step above with ``S = order[:t]``, ``Delta F = R schur^-1 (T[j] - X^T B)``;
* :meth:`IncrementalRegressor.loo_updates`: ``F(order[:t]) - F(order[:t] - j)`` for ``j`` in the
  prefix: with ``U = L_t^-1 E_j`` (``E_j`` selects ``j``'s rows), ``Delta F = (A U) (U^T U)^-1 (U^T B)``
  (block removal from ``(K + lam I)^-1 = L^-T L^-1``).
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import blas, lapack

from ..errors import KernelError
from ._blas import trsm_lower_inplace
from .problem import RegressionProblem

__all__ = ["IncrementalRegressor", "PrefixRegressor"]


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


class PrefixRegressor:
    """What every regressor that grows a training prefix exposes (this class keeps the order of the ``n`` points;
    subclasses keep ``problem`` and the current predictions ``_F``, and implement :meth:`extend`)."""

    #: Points per :meth:`extend` call that the walks use by default (level-3 blocks; performance only).
    block_size: int = 64

    def __init__(self, n: int) -> None:
        self._order = np.zeros(n, dtype=np.int64)  # training indices in the order they were added
        self._added = np.zeros(n, dtype=bool)
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
        """Add training point ``i`` (its ``g`` rows); returns the ``(m, C)`` predictions of the new prefix."""
        return self.extend(np.array([i], dtype=np.int64))[0]

    def extend(self, points: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _apply_blocks(self, left: np.ndarray, mid: np.ndarray, right: np.ndarray, pts: np.ndarray) -> np.ndarray:
        """``left_j mid_j^-1 right_j`` per point: ``left (M, b*g)``, ``mid (b, g, g)`` SPD, ``right (b*g, r)``.

        Returns ``(b, M, r)``; KernelError if a ``mid_j`` is not positive definite.
        """
        b, g = mid.shape[0], mid.shape[1]
        if g == 1:
            d = mid[:, 0, 0]
            if not np.all(np.isfinite(d) & (d > 0)):
                bad = int(np.flatnonzero(~(np.isfinite(d) & (d > 0)))[0])
                self._not_pd(int(pts[bad]), float(d[bad]))
            return left.T[:, :, None] * (right / d[:, None])[:, None, :]
        try:
            chol = np.linalg.cholesky(mid)
        except np.linalg.LinAlgError:
            for j in range(b):
                t, pivot = _first_bad_pivot(mid[j])
                if t >= 0:
                    self._not_pd(int(pts[j]), pivot)
            raise  # pragma: no cover - some block failed above
        rhs = right.reshape(b, g, -1)
        sol = np.linalg.solve(np.swapaxes(chol, 1, 2), np.linalg.solve(chol, rhs))  # (b, g, r)
        return np.einsum("mbi,bir->bmr", left.reshape(left.shape[0], b, g), sol)

    def _not_pd(self, point: int, pivot: float) -> None:
        raise KernelError(f"kernel is not positive semi-definite: training point {point} next to a prefix "
                          f"gives Schur-complement pivot {pivot:.6g} <= 0 for K/kernel_divisor + lam I "
                          f"(lam={self.problem.lam:g}); check the kernel or increase lam")


class IncrementalRegressor(PrefixRegressor):
    """Grows the Cholesky factor ``L`` of ``Ks[S, S] + lam I`` one point (or block) at a time.

    Keeps ``A = KTs[:, S] L^-T`` (stored transposed, ``(|S|*g, m*g)``), ``B = L^-1 T[S]``
    (``(|S|*g, r)``) and ``F = A B``. Memory is preallocated for all ``n*g`` rows.

    Args:
        problem: the regression problem.
    """

    def __init__(self, problem: RegressionProblem) -> None:
        super().__init__(problem.n)
        self.problem = problem
        rows = problem.n * problem.group
        self._L = np.zeros((rows, rows), order="F")  # F-order: L[:s, :s] is solved in place (lda = rows)
        self._At = np.zeros((rows, problem.KT.shape[0]))
        self._B = np.zeros((rows, problem.T.shape[1]))
        self._F = np.zeros((problem.KT.shape[0], problem.T.shape[1]))
        self._rows = np.zeros(rows, dtype=np.int64)
        self._size = 0  # rows in S

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

    # ---- coalitions one point away from a prefix -----------------------------------------------------

    def _check_requests(self, points: np.ndarray, sizes: np.ndarray, inside: bool) -> tuple[np.ndarray, np.ndarray]:
        prob = self.problem
        pts = np.asarray(points)
        sz = np.asarray(sizes)
        if pts.ndim != 1 or sz.shape != pts.shape or (pts.size and (pts.dtype.kind not in "iu"
                                                                     or sz.dtype.kind not in "iu")):
            raise ValueError(f"points/sizes: expected two integer arrays of the same shape (b,), "
                             f"got {pts.dtype} {pts.shape} and {sz.dtype} {sz.shape}")
        pts, sz = pts.astype(np.int64), sz.astype(np.int64)
        if pts.size and (pts.min() < 0 or pts.max() >= prob.n):
            raise ValueError(f"points: indices must be in [0, {prob.n - 1}]")
        if sz.size and (sz.min() < (1 if inside else 0) or sz.max() > self._count):
            raise ValueError(f"sizes: prefix lengths must be in [{1 if inside else 0}, {self._count}] "
                             f"(points added so far)")
        position = np.full(prob.n, prob.n, dtype=np.int64)
        position[self._order[: self._count]] = np.arange(self._count)
        ok = position[pts] < sz if inside else position[pts] >= sz
        if not np.all(ok):
            bad = int(np.flatnonzero(~ok)[0])
            where = "inside" if inside else "outside"
            raise ValueError(f"points: point {int(pts[bad])} must lie {where} the prefix of length {int(sz[bad])}")
        return pts, sz

    @staticmethod
    def _windows(rows: np.ndarray, max_cols: int, slack: float = 0.125, min_width: int = 64):
        """Group requests sorted by prefix rows so a shared solve of order ``r1`` pads each by little.

        Yields index arrays (into ``rows``) whose rows lie in ``[r0, r1]`` with
        ``r1 <= (1 + slack) r0 + min_width``: the padded solve costs at most ``(1 + slack)^2`` times the
        exact ones plus a ``min_width`` strip.
        """
        order = np.argsort(rows, kind="stable")
        start = 0
        while start < order.size:
            r0 = rows[order[start]]
            limit = (1.0 + slack) * r0 + min_width
            stop = start + 1
            while stop < order.size and stop - start < max_cols and rows[order[stop]] <= limit:
                stop += 1
            yield order[start:stop]
            start = stop

    def _leading_solve(self, r1: int, rhs: np.ndarray, rowlim: np.ndarray) -> np.ndarray:
        """``L[:r1, :r1]^-1 rhs`` with column ``c`` cut to its first ``rowlim[c]`` rows (the leading-block
        solve: forward substitution never reads below the row it computes)."""
        x = trsm_lower_inplace(self._L, r1, np.asfortranarray(rhs))
        x[np.arange(r1)[:, None] >= rowlim[None, :]] = 0.0
        return x

    def branch_updates(self, points: np.ndarray, sizes: np.ndarray, max_cols: int = 256) -> np.ndarray:
        """Prediction changes from adding each point to a prefix of the current order (nothing is added).

        Cost per request ``O((t g)^2 g + m g^2 t)`` for a prefix of ``t`` points; requests are grouped by
        similar ``t`` into level-3 triangular solves of at most ``max_cols`` points.

        Args:
            points: ``(b,)`` training indices (a point may repeat with other sizes).
            sizes: ``(b,)`` prefix lengths ``t_j`` in ``[0, size]`` with ``points[j]`` not in ``order[:t_j]``.

        Returns:
            ``(b, m, C)``: ``F(order[:t_j] + points[j]) - F(order[:t_j])``.

        Raises:
            ValueError: bad requests. KernelError: a Schur complement is not positive definite.
        """
        pts, sz = self._check_requests(points, sizes, inside=False)
        prob, g = self.problem, self.problem.group
        out = np.zeros((pts.size, prob.KT.shape[0], prob.T.shape[1]))
        for idx in self._windows(sz * g, max_cols):
            q_pts = pts[idx]
            cols = prob.rows(q_pts)
            r1 = int(sz[idx].max()) * g
            S = self._rows[:r1]
            K_new = prob.K[cols]  # (q, n*g)
            X = self._leading_solve(r1, np.ascontiguousarray(K_new[:, S]).T, np.repeat(sz[idx] * g, g))
            Xb = X.reshape(r1, q_pts.size, g)
            Kjj = K_new[:, cols].reshape(q_pts.size, g, q_pts.size, g)[np.arange(q_pts.size), :, np.arange(q_pts.size)]
            schur = Kjj + prob.lam * np.eye(g) - np.einsum("rbi,rbj->bij", Xb, Xb)
            R = prob.KT[:, cols] - self._At[:r1].T @ X  # (m*g, q)
            Bm = prob.T[cols] - X.T @ self._B[:r1]  # (q, r)
            out[idx] = self._apply_blocks(R, schur, Bm, q_pts)
        return prob.reshape_predictions(out)

    def loo_updates(self, points: np.ndarray, sizes: np.ndarray, max_cols: int = 256) -> np.ndarray:
        """Prediction changes from removing each point from a prefix that contains it (nothing is removed).

        Same cost as :meth:`branch_updates`.

        Args:
            points: ``(b,)`` training indices.
            sizes: ``(b,)`` prefix lengths ``t_j`` in ``[1, size]`` with ``points[j]`` in ``order[:t_j]``.

        Returns:
            ``(b, m, C)``: ``F(order[:t_j]) - F(order[:t_j] - points[j])``.

        Raises:
            ValueError: bad requests. KernelError: non-finite or non positive definite ``U^T U``.
        """
        pts, sz = self._check_requests(points, sizes, inside=True)
        prob, g = self.problem, self.problem.group
        out = np.zeros((pts.size, prob.KT.shape[0], prob.T.shape[1]))
        position = np.empty(prob.n, dtype=np.int64)
        position[self._order[: self._count]] = np.arange(self._count)
        for idx in self._windows(sz * g, max_cols):
            q_pts = pts[idx]
            q = q_pts.size * g
            r1 = int(sz[idx].max()) * g
            E = np.zeros((r1, q), order="F")
            E[(position[q_pts][:, None] * g + np.arange(g)).reshape(-1), np.arange(q)] = 1.0
            U = self._leading_solve(r1, E, np.repeat(sz[idx] * g, g))
            Ub = U.reshape(r1, q_pts.size, g)
            gram = np.einsum("rbi,rbj->bij", Ub, Ub)
            out[idx] = self._apply_blocks(self._At[:r1].T @ U, gram, U.T @ self._B[:r1], q_pts)
        if not np.all(np.isfinite(out)):
            raise KernelError(f"kernel regression became non-finite removing a point from a prefix; the kernel "
                              f"is numerically singular (lam={prob.lam:g})")
        return prob.reshape_predictions(out)
