"""Exact incremental kernel regression in feature space (float64): no ``n×n`` matrix, O(D²) per point.

The ridge regression on scaled features ``Φ̃`` is the least-squares problem
``min_θ ‖[√λ I; Φ̃_S] θ - [0; T_S]‖`` (its normal matrix is ``A_S = Φ̃_SᵀΦ̃_S + λI``). We keep its QR
form ("square-root information" form), never ``A_S`` itself:

    R    (D, D)    upper triangular, RᵀR = A_S
    Z    (D, M)    R⁻ᵀ Φ̃_Tᵀ        (test features in the rotated basis)
    w    (D, r)    R⁻ᵀ Φ̃_Sᵀ T_S    (targets in the rotated basis)
    F    (M, r)    Zᵀ w = Φ̃_T A_S⁻¹ Φ̃_Sᵀ T_S, the predictions

Appending the ``q`` rows ``Φ̃_N`` is one orthogonal QR row update (LAPACK ``dtpqrt``, blocked
Householder, 2qD² flops): ``[R; Φ̃_N] = Q [R'; 0]``; applying ``Qᵀ`` (``dtpmqrt``, 4qD(M+r) flops) to
``[Z w; 0 T_N]`` gives ``[Z' w'; ζ ρ]``. Orthogonality gives ``Zᵀw = Z'ᵀw' + ζᵀρ``, so ``F' = F - ζᵀρ``.

Every prefix inside the block comes from the ``q×q`` corner ``Q₂₂`` of ``Q`` and its RQ factorisation
``Q₂₂ = G O`` (``G`` upper triangular, ``O`` orthogonal). From ``QᵀQ = I`` one finds
``Φ̃_N R⁻¹ = -Q₂₂⁻ᵀQ₁₂ᵀ`` and ``I + Φ̃_N A_S⁻¹ Φ̃_Nᵀ = (Q₂₂Q₂₂ᵀ)⁻¹ = E Eᵀ`` with ``E = G⁻ᵀ`` lower
triangular. The kernel (dual) incremental update of :mod:`.incremental` with that Schur complement
then reads ``F += a bᵀ`` with ``aᵀ = -O ζ`` and ``b = O ρ`` (``λ`` cancels), and, ``E`` being lower
triangular, the first ``j`` rows of ``aᵀ``/``b`` are exactly the update for the first ``j`` new rows.
So a block of points yields every intermediate prefix's predictions, with no triangular solve, no
inverse and no normal matrix: only orthogonal transformations (backward stable; the error is governed
by ``cond(A_S)``, as for the dual's Cholesky of ``K_SS + λI``).
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
from scipy.linalg import lapack

from ..errors import KernelError
from .features import FeatureProblem
from .incremental import PrefixRegressor

__all__ = ["PrimalRegressor", "DEFAULT_PANEL", "MAX_UPDATE_ROWS"]

#: Column panel width of the blocked Householder row update (LAPACK ``dtpqrt``'s ``nb``).
DEFAULT_PANEL = 32

#: Most rows in one orthogonal update; longer ``extend`` calls are split (the ``q×q`` corner ``Q₂₂``
#: costs ``q²`` memory and ``4q²D + 4q³/3`` flops per update). 128 rows run 1.2-1.3× faster per point
#: than 64 at D = 512-4,096 with m = 1,000 (``dtpqrt``/``dtpmqrt`` reach a larger share of the GEMM rate)
#: and as fast as 256 (whose ``Q₂₂`` costs more at small D): ``benchmarks/bench_primal.py --blocks``.
MAX_UPDATE_ROWS = 128


class PrimalRegressor(PrefixRegressor):
    """Grows the QR form of the feature-space ridge regression one point (or block) at a time.

    Same interface as :class:`~freeshap_ray.utility.IncrementalRegressor`. Memory: ``D² + D·(M + r)``
    float64 (``M = m*g`` test rows), independent of ``n``.

    Args:
        problem: the feature problem.
        panel: Householder panel width (performance only).
    """

    block_size = MAX_UPDATE_ROWS

    def __init__(self, problem: FeatureProblem, panel: int = DEFAULT_PANEL) -> None:
        if panel < 1:
            raise ValueError(f"panel: must be >= 1, got {panel}")
        super().__init__(problem.n)
        self.problem = problem
        D, lam = problem.dim, problem.lam
        M, r = problem.phi_test.shape[0], problem.T.shape[1]
        self._panel = min(int(panel), D)
        self._R = np.asfortranarray(np.sqrt(lam) * np.eye(D))
        self._ZW = np.zeros((D, M + r), order="F")  # [Z | w]; w starts at 0
        self._ZW[:, :M] = problem.test_features().T / np.sqrt(lam)
        self._M = M
        self._F = np.zeros((M, r))
        self._broken: str | None = None

    def extend(self, points: np.ndarray) -> np.ndarray:
        """Add several training points in order, in one blocked orthogonal update.

        Args:
            points: ``(b,)`` distinct training indices not yet added.

        Returns:
            ``(b, m, C)``: entry ``j`` holds the predictions after adding ``points[:j+1]``.

        Raises:
            KernelError: the update overflowed (non-finite); the regressor is unusable afterwards.
            ValueError: indices out of range, repeated, or already added.
        """
        prob = self.problem
        pts = self._requests(points, inside=False)
        if pts.size == 0:
            return np.zeros((0, prob.m, prob.n_classes))
        step = max(1, MAX_UPDATE_ROWS // prob.group)
        if pts.size > step:
            return np.concatenate([self._update(pts[s:s + step]) for s in range(0, pts.size, step)])
        return self._update(pts)

    def branch_updates(self, points: np.ndarray) -> np.ndarray:
        """Prediction changes from adding each point alone to the current prefix ``S`` (nothing is added).

        With ``U = R⁻ᵀ Φ̃_jᵀ`` (``D×g``, one triangular solve): ``F(S + j) - F(S) = Zᵀ U (I + UᵀU)⁻¹ (T_j - Uᵀw)``
        (Sherman–Morrison–Woodbury on ``A_S``). Cost ``D² g + M D g`` per point, independent of ``|S|``.

        Args:
            points: ``(b,)`` distinct training indices not in the prefix.

        Returns:
            ``(b, m, C)``.
        """
        pts = self._requests(points, inside=False)
        return self._rank_g(pts, +1.0)

    def loo_updates(self, points: np.ndarray) -> np.ndarray:
        """Prediction changes from removing each point alone from the current prefix (nothing is removed).

        ``F(S) - F(S - j) = Zᵀ U (I - UᵀU)⁻¹ (T_j - Uᵀw)``: ``UᵀU`` is the leverage of ``j`` (< 1 for
        ``lam > 0``), ``T_j - Uᵀw`` its residual; both lose ``~eps / (1 - leverage)`` relative accuracy, like
        any leave-one-out downdate (``1 - leverage >= lam / (‖K̃‖ + lam)``).

        Args:
            points: ``(b,)`` distinct training indices in the prefix.

        Returns:
            ``(b, m, C)``.
        """
        pts = self._requests(points, inside=True)
        out = self._rank_g(pts, -1.0)
        if not np.all(np.isfinite(out)):
            raise KernelError("feature regression became non-finite removing a point from the prefix (leverage 1: "
                              f"lam={self.problem.lam:g} too small for these features)")
        return out

    def _requests(self, points: np.ndarray, inside: bool) -> np.ndarray:
        """Validated ``points`` that must all be in the prefix (``inside``) or all outside it."""
        if self._broken is not None:
            raise KernelError(f"feature regression: this regressor failed earlier ({self._broken}); start a new one")
        pts = self.problem.check_points(points, name="points")
        wrong = self._added[pts] != inside
        if np.any(wrong):
            raise ValueError(f"points: training point {int(pts[wrong][0])} is "
                             + ("not in the prefix" if inside else "in the prefix (already added)"))
        return pts

    def _rank_g(self, pts: np.ndarray, sign: float) -> np.ndarray:
        """``Zᵀ U (I + sign·UᵀU)⁻¹ (T_J - Uᵀw)`` per point, ``(b, m, C)``."""
        prob, g, M = self.problem, self.problem.group, self._M
        if pts.size == 0:
            return np.zeros((0, prob.m, prob.n_classes))
        rows = prob.rows(pts)
        U = scipy.linalg.solve_triangular(self._R, prob.train_features(rows).T, trans="T", lower=False,
                                          check_finite=False)  # (D, b*g)
        Ub = U.reshape(U.shape[0], pts.size, g)
        mid = np.eye(g) + sign * np.einsum("dbi,dbj->bij", Ub, Ub)
        right = prob.T[rows] - U.T @ self._ZW[:, M:]  # (b*g, r) residuals of the current fit
        left = self._ZW[:, :M].T @ U  # (M, b*g)
        return prob.reshape_predictions(self._apply_blocks(left, mid, right, pts))

    def _update(self, pts: np.ndarray) -> np.ndarray:
        """One orthogonal update with the validated points ``pts``; ``(b, m, C)`` prefix predictions."""
        prob = self.problem
        new = prob.rows(pts)
        q, g, M = new.size, prob.group, self._M
        phi_new = np.asfortranarray(prob.train_features(new))
        # [R; Φ̃_N] = Q [R'; 0], in place (R is overwritten by R', phi_new by the Householder vectors).
        R, V, Tf, info = lapack.dtpqrt(0, self._panel, self._R, phi_new, overwrite_a=1, overwrite_b=1)
        bottom = np.zeros((q, self._ZW.shape[1]), order="F")
        bottom[:, M:] = prob.T[new]
        ZW, bottom, info2 = lapack.dtpmqrt(0, V, Tf, self._ZW, bottom, side="L", trans="T",
                                          overwrite_a=1, overwrite_b=1)
        _, Q22, info3 = lapack.dtpmqrt(0, V, Tf, np.zeros((prob.dim, q), order="F"),
                                       np.asfortranarray(np.eye(q)), side="L", trans="N")
        if info or info2 or info3:  # pragma: no cover - only on invalid arguments
            self._broken = f"LAPACK info {info}/{info2}/{info3}"
            raise KernelError(f"feature regression: LAPACK QR update failed ({self._broken})")
        self._R, self._ZW = R, ZW
        _, O = scipy.linalg.rq(Q22, check_finite=False)
        a = -(O @ bottom[:, :M])  # (q, M): rows are the per-row updates' test parts
        b = O @ bottom[:, M:]  # (q, r)
        if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b)) and np.all(np.isfinite(np.diagonal(R)))):
            self._broken = f"non-finite values after adding points {pts[:5].tolist()}"
            raise KernelError(f"feature regression became non-finite while adding training points "
                              f"{pts[:5].tolist()}...: the features overflow float64 (scaled by "
                              f"1/sqrt(kernel_divisor) = {prob.scale:g}); rescale them")
        self._order[self._count:self._count + pts.size] = pts
        self._added[pts] = True
        self._count += pts.size
        a3, b3 = a.reshape(pts.size, g, M), b.reshape(pts.size, g, -1)
        contrib = a3[:, 0, :, None] * b3[:, 0, None, :]  # (b, M, r): per-point rank-g updates
        for j in range(1, g):
            contrib += a3[:, j, :, None] * b3[:, j, None, :]
        cum = np.cumsum(contrib, axis=0)
        cum += self._F
        self._F = cum[-1].copy()
        return prob.reshape_predictions(cum)
