"""Closed-form baselines and leave-one-out predictions of the kernel-regression surrogate.

The surrogate is the FreeShap regression on the scaled kernel: with ``N = n·g`` rows (``g = 1``
for the first-logit kernel, ``g = C`` for the full C×C kernel), ``A = K/div + λI`` (N×N),
targets ``T`` (N×r), ``α = A⁻¹T``, ``B = A⁻¹``, ``F = K_T α`` the test predictions and
``P = K_T A⁻¹`` (M×N, ``M = m·g``). Point ``i`` owns the rows ``I``.

Leave-one-out, exactly, from one factorisation (no ``n`` re-solves). The block inverse of ``A``
with the rows ``I`` split off gives ``A_{-I,-I}⁻¹ = B_{-I,-I} - B_{-I,I} B_II⁻¹ B_{I,-I}``; multiplied
by ``T_{-I}`` this is ``α_{-I} - B_{-I,I} w_i`` with ``w_i = B_II⁻¹ α_I`` (g×r). Hence

* test predictions without ``i``:   ``F_{-i} = F - P[:, I] w_i``,
* prediction of ``i`` itself by the fit without ``i`` (the LOO prediction): ``T_I - w_i``
  (the ridge-regression identity ``y_i - f_{-i}(x_i) = (A⁻¹Y)_i / (A⁻¹)_ii``, in C×C blocks for the
  full kernel). ``λ`` cancels: it holds for any ridge.

Scores (higher = more helpful, like Shapley values):

* ``loo``: ``v(N) - v(N \\ {i})`` with the run's utility (test accuracy or negative cross-entropy).
* ``influence``: the influence function of the ridge objective ``Σ ½‖f(x_j) - y_j‖² + λ/2‖θ‖²``:
  first-order decrease of the test squared loss ``Σ_t ½‖F_t - Y_t‖²`` when ``i`` is removed,
  ``Σ_t ∇L_tᵀ H⁻¹ ∇ℓ_i``. With features ``Φ`` (``K = ΦΦᵀ``), ``Φ_T H⁻¹ Φᵀ = P`` (Woodbury), and the
  training residual is ``F_I - T_I = -λ α_I``, so the score is ``Σ_{b∈I} (Pᵀ R)_b · (-λ α_b)`` with
  ``R = F - Y_test``. (LOO without the leverage correction ``(1 - h_ii)⁻¹``.)
* ``tracin``: TracIn-style gradient similarity at initialisation (the surrogate starts from f = 0):
  ``Σ_t ∇L_tᵀ ∇ℓ_i`` with cross-entropy gradients ``softmax(0) - y = 1/C - y``, i.e.
  ``Σ_t g_tᵀ K(t, i) g_i`` (one checkpoint, unit learning rate).
* ``loo_margin``: LOO prediction of the given label minus the best other class (a point the rest of
  the data contradicts has a negative margin).
* ``random``: seeded uniform scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg
from scipy.linalg import lapack

from ..errors import KernelError
from ..utility import FeatureProblem, Problem, RegressionProblem
from ..utility.metrics import accuracy_per_test, neg_cross_entropy_per_test

__all__ = [
    "BASELINES",
    "KernelSurrogate",
    "SurrogateMethods",
    "baseline_scores",
    "fit_surrogate",
    "random_scores",
]

BASELINES = ("random", "loo", "influence", "tracin", "loo_margin")

#: Elements of the (points, M, r) block of leave-one-out test predictions held at once.
_CHUNK_ELEMENTS = 1 << 23


def _utility_fn(utility: str):
    if utility == "accuracy":
        return accuracy_per_test
    if utility == "neg_ce":
        return neg_cross_entropy_per_test
    raise ValueError(f"utility: must be 'accuracy' or 'neg_ce', got {utility!r}")


def random_scores(n: int, seed: int) -> np.ndarray:
    """``(n,)`` seeded uniform scores (the random baseline)."""
    return np.random.default_rng([int(seed), 0x7A4D]).random(n)


class SurrogateMethods:
    """LOO predictions, values and margins shared by the kernel and feature surrogates.

    Needs ``problem``, ``F`` ``(M, r)``, ``_w`` ``(n, g, r)`` and ``loo_test_predictions``.
    """

    problem: Problem
    F: np.ndarray

    @property
    def _w(self) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def loo_test_predictions(self, points: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def test_predictions(self) -> np.ndarray:
        """``(m, C)`` full-data test predictions."""
        return self.problem.reshape_predictions(self.F)

    def loo_train_predictions(self) -> np.ndarray:
        """``(n, C)``: the prediction for each training point by the fit on all OTHER points."""
        p = self.problem
        T = p.T.reshape(p.n, p.group, -1)
        return (T - self._w).reshape(p.n, p.n_classes)

    def loo_margin(self) -> np.ndarray:
        """``(n,)``: LOO prediction of the given label minus the largest other class."""
        p = self.problem
        pred = self.loo_train_predictions()
        own = pred[np.arange(p.n), p.y_train]
        other = pred.copy()
        other[np.arange(p.n), p.y_train] = -np.inf
        return own - other.max(axis=1)

    def loo_values(self, utility: str = "accuracy") -> np.ndarray:
        """``(n,)`` exact leave-one-out values ``v(N) - v(N \\ {i})`` under ``utility``."""
        p = self.problem
        fn = _utility_fn(utility)
        full = float(fn(self.test_predictions(), p.y_test).mean())
        out = np.empty(p.n)
        chunk = max(1, _CHUNK_ELEMENTS // max(1, self.F.size))
        for s in range(0, p.n, chunk):
            pts = np.arange(s, min(p.n, s + chunk))
            out[pts] = full - fn(self.loo_test_predictions(pts), p.y_test).mean(axis=-1)
        return out

    def _test_targets(self) -> np.ndarray:
        """``(M, r)`` one-hot test targets, flattened like ``T``."""
        p = self.problem
        Y = np.zeros((p.m, p.n_classes))
        Y[np.arange(p.m), p.y_test] = 1.0
        return Y.reshape(p.m * p.group, -1)

    def tracin_values(self) -> np.ndarray:
        """``(n,)`` gradient similarity at initialisation (cross-entropy gradients at f = 0)."""
        return tracin_values(self.problem)


@dataclass(eq=False)
class KernelSurrogate(SurrogateMethods):
    """One Cholesky factorisation of the full-data regression and everything derived from it.

    Attributes:
        problem: the regression problem (scaled kernels, flattened targets).
        alpha: ``(N, r)`` ``A⁻¹T``.
        P: ``(M, N)`` ``K_T A⁻¹``.
        B_blocks: ``(n, g, g)`` diagonal blocks of ``A⁻¹``.
        F: ``(M, r)`` full-data test predictions.
    """

    problem: RegressionProblem
    alpha: np.ndarray
    P: np.ndarray
    B_blocks: np.ndarray
    F: np.ndarray

    @classmethod
    def fit(cls, problem: RegressionProblem) -> KernelSurrogate:
        """Factorise ``K + λI`` once (float64). O(N³/3 + M·N²) time, two N×N arrays of memory.

        Raises:
            KernelError: ``K + λI`` is not positive definite.
        """
        p = problem
        n_rows = p.K.shape[0]
        A = np.array(p.K, dtype=np.float64, order="F")
        A[np.diag_indices(n_rows)] += p.lam
        L, info = lapack.dpotrf(A, lower=1, clean=1, overwrite_a=1)
        if info != 0:
            raise KernelError(f"kernel is not positive semi-definite: K/kernel_divisor + lam I is not positive "
                              f"definite (LAPACK dpotrf info={info}, lam={p.lam:g}); check the kernel or increase lam")
        factor = (L, True)
        alpha = scipy.linalg.cho_solve(factor, p.T, check_finite=False)
        P = scipy.linalg.cho_solve(factor, np.ascontiguousarray(p.KT.T), check_finite=False).T
        inv, info = lapack.dpotri(L, lower=1, overwrite_c=1)  # lower triangle of A⁻¹
        if info != 0:  # pragma: no cover - dpotrf succeeded, so L has a positive diagonal
            raise KernelError(f"kernel regression: inverting the Cholesky factor failed (info={info})")
        g, n = p.group, p.n
        blocks = np.empty((n, g, g))
        for a in range(g):
            for b in range(a + 1):
                v = inv[np.arange(n) * g + a, np.arange(n) * g + b]
                blocks[:, a, b] = v
                blocks[:, b, a] = v
        del inv
        F = p.KT @ alpha
        return cls(problem=p, alpha=alpha, P=np.ascontiguousarray(P), B_blocks=blocks, F=F)

    # ----------------------------------------------------------------------------------------------

    @property
    def _w(self) -> np.ndarray:
        """``(n, g, r)``: ``w_i = B_II⁻¹ α_I``."""
        p = self.problem
        a = self.alpha.reshape(p.n, p.group, -1)
        if p.group == 1:
            return a / self.B_blocks
        return np.linalg.solve(self.B_blocks, a)

    def loo_test_predictions(self, points: np.ndarray) -> np.ndarray:
        """``(len(points), m, C)``: test predictions of the fit without each of ``points``."""
        p = self.problem
        pts = np.asarray(points, dtype=np.int64)
        w = self._w[pts]  # (b, g, r)
        Pb = self.P.reshape(self.P.shape[0], p.n, p.group)[:, pts, :]  # (M, b, g)
        delta = np.einsum("Mbg,bgr->bMr", Pb, w)
        return p.reshape_predictions(self.F[None] - delta)

    def influence_values(self) -> np.ndarray:
        """``(n,)`` influence-function estimate of the test squared-loss increase when ``i`` is removed."""
        p = self.problem
        R = self.F - self._test_targets()  # (M, r) test residuals
        Q = self.P.T @ R  # (N, r)
        train_resid = -p.lam * self.alpha  # F_train - T = K α - T = -λ α
        return (Q * train_resid).reshape(p.n, -1).sum(axis=1)


def tracin_values(problem: Problem) -> np.ndarray:
    """``(n,)`` ``Σ_t g_tᵀ K(t, i) g_i`` with ``g = 1/C - onehot(y)`` (needs no factorisation; features
    give ``K_Tᵀ G = Φ̃ (Φ̃_Tᵀ G)``, nothing ``n×n``)."""
    p = problem
    c = p.n_classes
    G_train = np.full((p.n, c), 1.0 / c)
    G_train[np.arange(p.n), p.y_train] -= 1.0
    G_test = np.full((p.m, c), 1.0 / c)
    G_test[np.arange(p.m), p.y_test] -= 1.0
    Gt = G_test.reshape(p.m * p.group, -1)
    Gi = G_train.reshape(p.n * p.group, -1)
    KtG = p.kt_t_times(Gt) if isinstance(p, FeatureProblem) else p.KT.T @ Gt
    return (KtG * Gi).reshape(p.n, -1).sum(axis=1)


def fit_surrogate(problem: Problem) -> SurrogateMethods:
    """:class:`KernelSurrogate` for kernels, :class:`~.feature_surrogate.FeatureSurrogate` for features."""
    if isinstance(problem, FeatureProblem):
        from .feature_surrogate import FeatureSurrogate  # it imports this module

        return FeatureSurrogate.fit(problem)
    return KernelSurrogate.fit(problem)


def baseline_scores(
    problem: Problem,
    methods: tuple[str, ...] | list[str],
    *,
    utility: str = "accuracy",
    seed: int = 0,
    surrogate: SurrogateMethods | None = None,
) -> dict[str, np.ndarray]:
    """``{method: (n,) scores}`` for the named baselines (higher = more helpful).

    Args:
        problem: kernels (:class:`KernelSurrogate`) or features (``FeatureSurrogate``, nothing ``n×n``).
        methods: any of ``BASELINES``.
        utility: utility of the ``loo`` baseline (``accuracy`` or ``neg_ce``).
        seed: seed of ``random``.
        surrogate: a fitted surrogate to reuse (fitted here when needed and not given).
    """
    unknown = [m for m in methods if m not in BASELINES]
    if unknown:
        raise ValueError(f"methods: unknown baseline(s) {unknown}; known: {list(BASELINES)}")
    out: dict[str, np.ndarray] = {}
    needs_fit = {"loo", "influence", "loo_margin"} & set(methods)
    if needs_fit and surrogate is None:
        surrogate = fit_surrogate(problem)
    for m in methods:
        if m == "random":
            out[m] = random_scores(problem.n, seed)
        elif m == "loo":
            out[m] = surrogate.loo_values(utility)
        elif m == "influence":
            out[m] = surrogate.influence_values()
        elif m == "tracin":
            out[m] = tracin_values(problem)
        elif m == "loo_margin":
            out[m] = surrogate.loo_margin()
    return out
