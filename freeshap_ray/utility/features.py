"""Kernel-regression problem given by features instead of kernels: ``K = Φ Φᵀ / kernel_divisor``.

Rows are flattened like :class:`~freeshap_ray.utility.RegressionProblem`'s kernel rows:

* ``first_logit``: ``phi_train (n, D)``, ``phi_test (m, D)``; group ``g = 1``, targets ``T (n, C)``.
* ``full``: ``phi_train (n, C, D)`` (or ``(n*C, D)``), row ``i*C + c`` the feature of logit ``c`` of
  example ``i``; group ``g = C``, ``T[i*C+c, 0] = [y_i == c]``. Then ``Φ Φᵀ`` is exactly the flattened
  full kernel ``K[i*C+c, j*C+d] = k[i, j, c, d]``.

With scaled features ``Φ̃ = Φ / sqrt(kernel_divisor)`` the predictions of a subset ``S`` are (push-through)

    F = Φ̃_T Φ̃_Sᵀ (Φ̃_S Φ̃_Sᵀ + λI)⁻¹ T_S = Φ̃_T (Φ̃_Sᵀ Φ̃_S + λI_D)⁻¹ Φ̃_Sᵀ T_S,

so nothing ``n×n`` is needed. Features are kept in their own storage dtype (float16/32/64, memmaps
too, never copied) and converted to scaled float64 one row block at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg
from scipy.linalg import lapack

from ..errors import KernelError
from .problem import RegressionProblem, _as_labels, _check_label_range, _readonly, _resolve_n_classes

__all__ = ["FeatureProblem", "ROW_BLOCK_ELEMENTS"]

#: Float64 elements of one converted feature row block (64 MiB).
ROW_BLOCK_ELEMENTS = 1 << 23


def _as_features(name: str, value: object) -> np.ndarray:
    """A read-only view of ``value`` in its float dtype (integers become float64)."""
    arr = np.asarray(value)
    if arr.dtype.kind in "iub":
        arr = arr.astype(np.float64)
    elif arr.dtype.kind != "f":
        raise KernelError(f"{name}: expected a real float array, got dtype {arr.dtype}")
    view = arr.view()
    view.setflags(write=False)
    return view


def _check_finite_rows(name: str, arr: np.ndarray) -> None:
    """Non-finite check one row block at a time (no full-size boolean temporary)."""
    step = max(1, ROW_BLOCK_ELEMENTS // max(1, arr.shape[1]))
    bad = 0
    for s in range(0, arr.shape[0], step):
        block = arr[s:s + step]
        bad += int(block.size - np.count_nonzero(np.isfinite(block)))
    if bad:
        raise KernelError(f"{name}: {bad} non-finite (nan/inf) entries out of {arr.size}")


def _flat_features(name: str, arr: np.ndarray, kind: str, n: int | None, c: int | None) -> np.ndarray:
    """``(n, D)`` / ``(n, C, D)`` / ``(n*C, D)`` -> ``(n*g, D)``, or KernelError naming ``name``."""
    if kind == "first_logit":
        if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
            raise KernelError(f"{name}: expected a non-empty (n, D) array for a first_logit problem, "
                              f"got shape {arr.shape}")
        return arr
    if arr.ndim == 3:
        if arr.shape[0] == 0 or arr.shape[2] == 0 or arr.shape[1] != c:
            raise KernelError(f"{name}: expected a non-empty (n, {c}, D) array for a full problem, "
                              f"got shape {arr.shape}")
        return arr.reshape(arr.shape[0] * c, arr.shape[2])
    if arr.ndim == 2 and n is not None and arr.shape[0] == n * c and arr.shape[1] > 0 and n > 0:
        return arr
    raise KernelError(f"{name}: expected (n, {c}, D) or (n*{c}, D) rows for a full problem "
                      f"(n = number of labels), got shape {arr.shape}")


@dataclass(frozen=True, eq=False, repr=False)
class FeatureProblem:
    """Kernel ridge regression given by features, flattened to groups of ``g`` rows per point.

    Attributes:
        phi_train: ``(n*g, D)`` raw training features (storage dtype, read-only, unscaled).
        phi_test: ``(m*g, D)`` raw test features.
        T: ``(n*g, r)`` float64 targets (``r = C`` for first_logit, ``r = 1`` for full).
        y_train: ``(n,)`` int64 training labels.
        y_test: ``(m,)`` int64 test labels.
        n_classes: number of classes ``C``.
        group: rows per training point ``g`` (1 for first_logit, ``C`` for full).
        lam: ridge added to the scaled kernel.
        kernel_divisor: ``K = Φ Φᵀ / kernel_divisor``.
    """

    phi_train: np.ndarray
    phi_test: np.ndarray
    T: np.ndarray
    y_train: np.ndarray
    y_test: np.ndarray
    n_classes: int
    group: int
    lam: float
    kernel_divisor: float

    # Point / row bookkeeping is RegressionProblem's (it reads only n, m, group and n_classes).
    n = RegressionProblem.n
    m = RegressionProblem.m
    kind = RegressionProblem.kind
    rows = RegressionProblem.rows
    check_points = RegressionProblem.check_points
    reshape_predictions = RegressionProblem.reshape_predictions

    @property
    def dim(self) -> int:
        """Feature dimension ``D``."""
        return int(self.phi_train.shape[1])

    @property
    def scale(self) -> float:
        """``1 / sqrt(kernel_divisor)``: scaled features are ``Φ̃ = scale · Φ``."""
        return float(1.0 / np.sqrt(self.kernel_divisor))

    def __repr__(self) -> str:
        return (f"FeatureProblem(kind={self.kind!r}, n={self.n}, m={self.m}, D={self.dim}, "
                f"n_classes={self.n_classes}, lam={self.lam:g}, dtype={self.phi_train.dtype})")

    @classmethod
    def from_features(
        cls,
        phi_train: np.ndarray,
        phi_test: np.ndarray,
        y_train: np.ndarray,
        y_test: np.ndarray,
        *,
        n_classes: int | None = None,
        lam: float = 1e-6,
        kernel_divisor: float = 1e4,
        kind: str | None = None,
    ) -> FeatureProblem:
        """Validate features and labels and build the problem (features are not copied).

        Args:
            phi_train: ``(n, D)`` (first_logit) or ``(n, C, D)`` / ``(n*C, D)`` (full) features.
            phi_test: ``(m, D)`` or ``(m, C, D)`` / ``(m*C, D)``.
            y_train: ``(n,)`` integer labels.
            y_test: ``(m,)`` integer labels.
            n_classes: number of classes; default ``max(label) + 1`` (at least 2), or ``C`` of 3-D features.
            lam: ridge ``> 0`` added after scaling.
            kernel_divisor: the kernel ``Φ Φᵀ`` is divided by this (``> 0``).
            kind: ``"first_logit"`` or ``"full"``; default full for 3-D ``phi_train``, else first_logit.

        Raises:
            KernelError: bad shapes or dtypes, non-finite entries, bad labels.
            ValueError: ``lam``, ``kernel_divisor`` or ``kind`` invalid.
        """
        if not (np.isfinite(lam) and lam > 0):
            raise ValueError(f"lam: must be a finite number > 0, got {lam!r}")
        if not (np.isfinite(kernel_divisor) and kernel_divisor > 0):
            raise ValueError(f"kernel_divisor: must be a finite number > 0, got {kernel_divisor!r}")
        ftr, fte = _as_features("phi_train", phi_train), _as_features("phi_test", phi_test)
        if kind is None:
            kind = "full" if ftr.ndim == 3 else "first_logit"
        if kind not in ("first_logit", "full"):
            raise ValueError(f"kind: must be 'first_logit' or 'full', got {kind!r}")
        y_tr, y_te = np.asarray(y_train), np.asarray(y_test)
        c: int | None = None
        if kind == "full":
            c = ftr.shape[1] if ftr.ndim == 3 else n_classes
            if c is None or int(c) != c or c < 2:
                raise KernelError(f"n_classes: a full problem needs C >= 2 classes (n_classes, or phi_train's "
                                  f"shape (n, C, D)), got {c!r}")
            c = int(c)
            if n_classes is not None and n_classes != c:
                raise KernelError(f"n_classes: {n_classes} given but phi_train has {c} classes "
                                  f"(shape {ftr.shape})")
        n = y_tr.shape[0] if y_tr.ndim == 1 else None
        m = y_te.shape[0] if y_te.ndim == 1 else None
        ftr = _flat_features("phi_train", ftr, kind, n, c)
        fte = _flat_features("phi_test", fte, kind, m, c)
        if fte.shape[1] != ftr.shape[1]:
            raise KernelError(f"phi_test: feature dimension {fte.shape[1]} differs from phi_train's {ftr.shape[1]}")
        g = 1 if kind == "first_logit" else c
        yt = _as_labels("y_train", y_tr, ftr.shape[0] // g)
        ye = _as_labels("y_test", y_te, fte.shape[0] // g)
        _check_finite_rows("phi_train", ftr)
        _check_finite_rows("phi_test", fte)
        c = _resolve_n_classes(n_classes if c is None else c, None, yt, ye)
        _check_label_range("y_train", yt, c)
        _check_label_range("y_test", ye, c)
        n = yt.shape[0]
        if kind == "full":
            T = np.zeros((n * c, 1))
            T[np.arange(n) * c + yt, 0] = 1.0
        else:
            T = np.zeros((n, c))
            T[np.arange(n), yt] = 1.0
        return cls(phi_train=ftr, phi_test=fte, T=_readonly(T), y_train=_readonly(yt), y_test=_readonly(ye),
                   n_classes=c, group=g, lam=float(lam), kernel_divisor=float(kernel_divisor))

    # ---- scaled float64 feature blocks ---------------------------------------------------------------

    def row_step(self) -> int:
        """Rows per converted block (``ROW_BLOCK_ELEMENTS / D``)."""
        return max(1, ROW_BLOCK_ELEMENTS // self.dim)

    def train_features(self, rows: np.ndarray | slice | None = None) -> np.ndarray:
        """Scaled float64 training features ``Φ̃[rows]``: ``(len(rows), D)`` (all rows when None)."""
        block = self.phi_train if rows is None else self.phi_train[rows]
        return np.multiply(block, self.scale, dtype=np.float64)

    def test_features(self) -> np.ndarray:
        """Scaled float64 test features ``Φ̃_T``: ``(m*g, D)``."""
        return np.multiply(self.phi_test, self.scale, dtype=np.float64)

    def gram(self, rows: np.ndarray | None = None) -> np.ndarray:
        """``Φ̃_Sᵀ Φ̃_S`` (``(D, D)`` float64, symmetric) over ``rows`` (all when None), in row blocks."""
        idx = np.arange(self.phi_train.shape[0]) if rows is None else np.asarray(rows, dtype=np.int64)
        out = np.zeros((self.dim, self.dim))
        step = self.row_step()
        for s in range(0, idx.size, step):
            X = self.train_features(idx[s:s + step] if rows is not None else slice(s, s + step))
            out += X.T @ X
        return out

    def train_times(self, X: np.ndarray) -> np.ndarray:
        """``Φ̃ X``: ``(n*g, k)`` for ``X (D, k)``, in row blocks."""
        N, step = self.phi_train.shape[0], self.row_step()
        out = np.empty((N, X.shape[1]))
        for s in range(0, N, step):
            out[s:s + step] = self.train_features(slice(s, s + step)) @ X
        return out

    def train_t_times(self, Y: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """``Φ̃_Sᵀ Y_S``: ``(D, k)`` for ``Y (len(rows), k)`` (``(n*g, k)`` when ``rows`` is None)."""
        idx = np.arange(self.phi_train.shape[0]) if rows is None else np.asarray(rows, dtype=np.int64)
        out = np.zeros((self.dim, Y.shape[1]))
        step = self.row_step()
        for s in range(0, idx.size, step):
            X = self.train_features(idx[s:s + step] if rows is not None else slice(s, s + step))
            out += X.T @ Y[s:s + step]
        return out

    def kt_t_times(self, Y: np.ndarray) -> np.ndarray:
        """``KTᵀ Y = Φ̃ (Φ̃_Tᵀ Y)``: ``(n*g, k)`` for ``Y (m*g, k)`` (what ``problem.KT.T @ Y`` is for kernels)."""
        return self.train_times(self.test_features().T @ Y)

    # ---- problem surface shared with RegressionProblem -----------------------------------------------

    def digest(self) -> str:
        """Hex digest of everything that determines the regression (features, dtype, targets, labels, lam, divisor)."""
        import hashlib

        h = hashlib.blake2b(digest_size=16)
        h.update(repr(("features", self.n, self.m, self.dim, self.n_classes, self.group, float(self.lam),
                       float(self.kernel_divisor), str(self.phi_train.dtype), str(self.phi_test.dtype))).encode())
        for arr in (self.phi_train, self.phi_test):
            step = self.row_step()
            for s in range(0, arr.shape[0], step):
                h.update(np.ascontiguousarray(arr[s:s + step]).tobytes())
        for arr in (self.T, self.y_train, self.y_test):
            h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()

    def predict(self, subset: np.ndarray | None = None) -> np.ndarray:
        """Direct float64 kernel-regression predictions of a subset, never forming anything ``n×n``.

        Solves in whichever space is smaller: the dual ``(s*g)×(s*g)`` system ``Φ̃_S Φ̃_Sᵀ + λI`` when
        ``s*g <= D``, else the primal ``D×D`` system ``Φ̃_Sᵀ Φ̃_S + λI`` (Cholesky either way).

        Args:
            subset: ``(s,)`` distinct training indices; ``None`` means all points.

        Returns:
            ``(m, C)`` predictions; zeros for an empty subset.

        Raises:
            KernelError: the system is not numerically positive definite.
        """
        pts = np.arange(self.n) if subset is None else self.check_points(subset)
        if pts.size == 0:
            return np.zeros((self.m, self.n_classes))
        rows = self.rows(pts)
        if rows.size <= self.dim:
            X = self.train_features(rows)
            A = X @ X.T
            A = (A + A.T) * 0.5
            A[np.diag_indices(rows.size)] += self.lam
            coef = self._cho_solve(A, self.T[rows], pts.size)
            return self.reshape_predictions(self.test_features() @ (X.T @ coef))
        A = self.gram(None if subset is None else rows)
        A = (A + A.T) * 0.5
        A[np.diag_indices(self.dim)] += self.lam
        rhs = self.train_t_times(self.T if subset is None else self.T[rows], None if subset is None else rows)
        theta = self._cho_solve(A, rhs, pts.size)
        return self.reshape_predictions(self.test_features() @ theta)

    def _cho_solve(self, A: np.ndarray, rhs: np.ndarray, points: int) -> np.ndarray:
        L, info = lapack.dpotrf(A, lower=1, clean=1, overwrite_a=1)
        if info != 0:
            raise KernelError(f"feature regression is numerically singular: the {A.shape[0]}x{A.shape[0]} system "
                              f"for a subset of {points} points is not positive definite (LAPACK dpotrf "
                              f"info={info}, lam={self.lam:g}); increase lam")
        return scipy.linalg.cho_solve((L, True), rhs, check_finite=False)

    def to_dual(self) -> RegressionProblem:
        """The equivalent kernel problem ``K = Φ̃ Φ̃ᵀ`` (``(n*g)²`` memory: tests and small ``n`` only)."""
        X, XT = self.train_features(), self.test_features()
        K = X @ X.T
        K = (K + K.T) * 0.5
        return RegressionProblem(K=_readonly(K), KT=_readonly(np.ascontiguousarray(XT @ X.T)), T=self.T,
                                 y_train=self.y_train, y_test=self.y_test, n_classes=self.n_classes,
                                 group=self.group, lam=self.lam)
