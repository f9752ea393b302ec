"""Closed-form baselines of the kernel-regression surrogate from features: nothing ``n×n``.

The feature-space twin of :class:`~freeshap_ray.apps.kernel_baselines.KernelSurrogate`. With scaled
features ``Φ̃`` (``N = n·g`` rows, ``D`` columns), ``A = Φ̃ᵀΦ̃ + λI_D = L Lᵀ``, ``θ = A⁻¹Φ̃ᵀT``,
training residuals ``e = T - Φ̃θ`` and test predictions ``F = Φ̃_T θ``. The push-through/Woodbury
identity ``(K + λI)⁻¹ = (I - Φ̃A⁻¹Φ̃ᵀ)/λ`` turns the dual quantities into feature-space ones:

* dual coefficients ``α = (K + λI)⁻¹T = e/λ``;
* diagonal blocks of ``(K + λI)⁻¹``: ``B_II = (I_g - H_II)/λ`` with the hat-matrix block
  ``H_II = Φ̃_I A⁻¹ Φ̃_Iᵀ = G_Iᵀ G_I``, ``G_I = L⁻¹Φ̃_Iᵀ`` (``D×g``);
* ``w_i = B_II⁻¹ α_I = (I_g - H_II)⁻¹ e_I`` (``λ`` cancels), so the LOO prediction of ``i`` is
  ``T_I - w_i`` (for ``g = 1``: ``(f_i - h_ii y_i)/(1 - h_ii)``);
* ``P = K_T(K + λI)⁻¹ = Φ̃_T A⁻¹ Φ̃ᵀ``, so ``P[:, I] = Zᵀ G_I`` with ``Z = L⁻¹Φ̃_Tᵀ`` (``D×M``) and the
  test predictions without ``i`` are ``F - Zᵀ G_I w_i`` (a rank-``g`` downdate);
* influence: ``Pᵀ R_test = Φ̃ L⁻ᵀ (Z R_test)`` times the training residual ``F_train - T = -e``.

Cost ``O(N·D² + D³ + N·M·D)``; memory ``D² + D·M + N·(g + r)`` plus one row block of features.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg
from scipy.linalg import blas, lapack

from ..errors import KernelError
from ..utility import FeatureProblem
from .kernel_baselines import SurrogateMethods

__all__ = ["FeatureSurrogate"]


def _trsm(L: np.ndarray, rhs: np.ndarray, trans: bool = False) -> np.ndarray:
    """``L⁻¹ rhs`` (or ``L⁻ᵀ rhs``) for the lower-triangular ``L (D, D)`` and ``rhs (D, k)``."""
    return blas.dtrsm(1.0, L, rhs, lower=1, trans_a=int(trans))


@dataclass(eq=False)
class FeatureSurrogate(SurrogateMethods):
    """One ``D×D`` Cholesky factorisation of the full-data feature regression and what derives from it.

    Attributes:
        problem: the feature problem.
        L: ``(D, D)`` lower Cholesky factor of ``Φ̃ᵀΦ̃ + λI`` (Fortran order).
        theta: ``(D, r)`` ridge weights ``A⁻¹Φ̃ᵀT``.
        Z: ``(D, M)`` ``L⁻¹Φ̃_Tᵀ``.
        H_blocks: ``(n, g, g)`` hat-matrix diagonal blocks ``Φ̃_I A⁻¹ Φ̃_Iᵀ``.
        resid: ``(N, r)`` training residuals ``T - Φ̃θ``.
        F: ``(M, r)`` full-data test predictions.
    """

    problem: FeatureProblem
    L: np.ndarray
    theta: np.ndarray
    Z: np.ndarray
    H_blocks: np.ndarray
    resid: np.ndarray
    F: np.ndarray

    @classmethod
    def fit(cls, problem: FeatureProblem) -> FeatureSurrogate:
        """Factorise ``Φ̃ᵀΦ̃ + λI`` (float64), then one pass over row blocks for ``H`` and residuals.

        Raises:
            KernelError: ``Φ̃ᵀΦ̃ + λI`` is not numerically positive definite.
        """
        p = problem
        A = p.gram()
        A = np.asfortranarray((A + A.T) * 0.5)
        A[np.diag_indices(p.dim)] += p.lam
        L, info = lapack.dpotrf(A, lower=1, clean=1, overwrite_a=1)
        if info != 0:
            raise KernelError(f"feature regression is numerically singular: Φ̃ᵀΦ̃ + lam I is not positive definite "
                              f"(LAPACK dpotrf info={info}, lam={p.lam:g}); increase lam")
        theta = scipy.linalg.cho_solve((L, True), p.train_t_times(p.T), check_finite=False)
        XT = p.test_features()
        Z = _trsm(L, np.asfortranarray(XT.T))
        F = XT @ theta
        g, n = p.group, p.n
        H = np.empty((n, g, g))
        resid = np.empty_like(p.T)
        step = max(1, p.row_step() // g)  # points per block
        for s in range(0, n, step):
            pts = np.arange(s, min(n, s + step))
            rows = slice(s * g, (s + pts.size) * g)
            X = p.train_features(rows)
            G = _trsm(L, np.asfortranarray(X.T)).reshape(p.dim, pts.size, g)
            H[pts] = np.einsum("dpa,dpb->pab", G, G)
            resid[rows] = p.T[rows] - X @ theta
        return cls(problem=p, L=L, theta=theta, Z=Z, H_blocks=H, resid=resid, F=F)

    @property
    def _w(self) -> np.ndarray:
        """``(n, g, r)``: ``w_i = (I - H_II)⁻¹ e_I``."""
        p = self.problem
        e = self.resid.reshape(p.n, p.group, -1)
        if p.group == 1:
            return e / (1.0 - self.H_blocks)
        return np.linalg.solve(np.eye(p.group) - self.H_blocks, e)

    def loo_test_predictions(self, points: np.ndarray) -> np.ndarray:
        """``(len(points), m, C)``: test predictions of the fit without each of ``points``."""
        p = self.problem
        pts = np.asarray(points, dtype=np.int64)
        out = np.empty((pts.size,) + self.F.shape)  # (b, M, r)
        w = self._w
        step = max(1, p.row_step() // p.group)  # points per converted feature block
        for s in range(0, pts.size, step):
            part = pts[s:s + step]
            X = p.train_features(p.rows(part))  # (b*g, D)
            G = _trsm(self.L, np.asfortranarray(X.T)).reshape(p.dim, part.size, p.group)
            U = np.einsum("dbg,bgr->dbr", G, w[part])  # (D, b, r)
            delta = (self.Z.T @ U.reshape(p.dim, -1)).reshape(self.F.shape[0], part.size, -1)  # (M, b, r)
            out[s:s + part.size] = self.F[None] - delta.transpose(1, 0, 2)
        return p.reshape_predictions(out)

    def influence_values(self) -> np.ndarray:
        """``(n,)`` influence-function estimate of the test squared-loss increase when ``i`` is removed."""
        p = self.problem
        R = self.F - self._test_targets()  # (M, r) test residuals
        Q = p.train_times(_trsm(self.L, self.Z @ R, trans=True))  # Pᵀ R, (N, r)
        return (Q * -self.resid).reshape(p.n, -1).sum(axis=1)
