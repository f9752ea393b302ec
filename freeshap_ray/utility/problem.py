"""Kernel-regression problem in canonical "grouped" form.

Two kernel kinds are accepted and flattened into one representation:

* ``first_logit``: ``k_train (n, n)``, ``k_test_train (m, n)``; one kernel shared by all ``C``
  classes. Group size ``g = 1``, targets ``T (n, C)`` are one-hot rows.
* ``full``: ``k_train (n, n, C, C)``, ``k_test_train (m, n, C, C)`` with entry ``[i, j, c, d] =
  <grad f_c(x_i), grad f_d(x_j)>``. Group size ``g = C``: training point ``i`` owns flat rows
  ``i*C .. i*C + C - 1``, ``K[i*C+c, j*C+d] = k[i, j, c, d]`` and ``T[i*C+c, 0] = [y_i == c]``.

Predictions of a subset ``S`` of training points are ``F = KT[:, S] (K[S, S] + lam I)^-1 T[S]``
with the kernels already divided by ``kernel_divisor``, reshaped to ``(m, C)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

from ..errors import KernelError

__all__ = ["RegressionProblem", "SYMMETRY_RTOL"]

#: Largest accepted ``max|K - K^T| / max|K|`` for the training kernel.
SYMMETRY_RTOL = 1e-6


def _as_float_array(name: str, value: object) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise KernelError(f"{name}: cannot be read as a float array ({err})") from err
    return arr


def _check_finite(name: str, arr: np.ndarray) -> None:
    bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if bad:
        raise KernelError(f"{name}: {bad} non-finite (nan/inf) entries out of {arr.size}")


def _as_labels(name: str, value: object, length: int) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != 1 or arr.shape[0] != length:
        raise KernelError(f"{name}: expected shape ({length},), got {arr.shape}")
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64)
    if arr.dtype.kind in "fb":
        if arr.dtype.kind == "f" and not (np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))):
            raise KernelError(f"{name}: labels must be integers, got non-integral values")
        return arr.astype(np.int64)
    raise KernelError(f"{name}: labels must be integers, got dtype {arr.dtype}")


def _max_asymmetry(k: np.ndarray, block: int = 1024) -> float:
    """``max|k - k^T|`` computed in row blocks to bound temporary memory."""
    worst = 0.0
    for start in range(0, k.shape[0], block):
        stop = min(start + block, k.shape[0])
        diff = np.abs(k[start:stop] - k[:, start:stop].T)
        if diff.size:
            worst = max(worst, float(diff.max()))
    return worst


def _flatten_full(k: np.ndarray) -> np.ndarray:
    """``(a, b, C, C) -> (a*C, b*C)`` with ``out[i*C+c, j*C+d] = k[i, j, c, d]``."""
    a, b, c, _ = k.shape
    return np.ascontiguousarray(k.transpose(0, 2, 1, 3)).reshape(a * c, b * c)


def _check_kernel_shapes(k_train: np.ndarray, k_test: np.ndarray) -> tuple[str, int, int, int | None]:
    """Return ``(kind, n, m, C or None)`` or raise KernelError naming the bad argument."""
    if k_train.ndim == 2:
        n = k_train.shape[0]
        if k_train.shape != (n, n) or n == 0:
            raise KernelError(f"k_train: expected a non-empty square (n, n) matrix, "
                              f"got shape {k_train.shape}")
        if k_test.ndim != 2 or k_test.shape[1] != n or k_test.shape[0] == 0:
            raise KernelError(f"k_test_train: expected shape (m, {n}) with m >= 1 (first_logit kernel), "
                              f"got {k_test.shape}")
        return "first_logit", n, k_test.shape[0], None
    if k_train.ndim == 4:
        n, _, c, _ = k_train.shape
        if k_train.shape != (n, n, c, c) or n == 0 or c < 2:
            raise KernelError(f"k_train: expected shape (n, n, C, C) with n >= 1 and C >= 2 (full kernel), "
                              f"got {k_train.shape}")
        if k_test.ndim != 4 or k_test.shape[1:] != (n, c, c) or k_test.shape[0] == 0:
            raise KernelError(f"k_test_train: expected shape (m, {n}, {c}, {c}) with m >= 1 (full kernel), "
                              f"got {k_test.shape}")
        return "full", n, k_test.shape[0], c
    raise KernelError(f"k_train: expected 2 dims (n, n) for a first_logit kernel or 4 dims (n, n, C, C) "
                      f"for a full kernel, got shape {k_train.shape}")


def _resolve_n_classes(n_classes: int | None, kernel_c: int | None, y_train: np.ndarray,
                       y_test: np.ndarray) -> int:
    if kernel_c is not None:
        if n_classes is not None and n_classes != kernel_c:
            raise KernelError(f"n_classes: {n_classes} given but the full kernel has {kernel_c} classes "
                              f"(k_train shape (n, n, {kernel_c}, {kernel_c}))")
        return kernel_c
    if n_classes is None:
        top = max(int(y_train.max(initial=0)), int(y_test.max(initial=0)))
        return max(2, top + 1)
    if int(n_classes) != n_classes or n_classes < 2:
        raise KernelError(f"n_classes: must be an integer >= 2, got {n_classes!r}")
    return int(n_classes)


def _check_label_range(name: str, y: np.ndarray, n_classes: int) -> None:
    bad = (y < 0) | (y >= n_classes)
    if np.any(bad):
        first = int(np.flatnonzero(bad)[0])
        raise KernelError(f"{name}: {int(bad.sum())} labels outside [0, {n_classes - 1}] "
                          f"(first at index {first}: {int(y[first])})")


def _readonly(arr: np.ndarray) -> np.ndarray:
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, eq=False, repr=False)
class RegressionProblem:
    """Kernel ridge regression problem on scaled kernels, flattened to groups of ``g`` rows per point.

    Attributes:
        K: ``(n*g, n*g)`` float64 training kernel, already divided by ``kernel_divisor``.
        KT: ``(m*g, n*g)`` float64 test-train kernel, already divided.
        T: ``(n*g, r)`` float64 targets (``r = C`` for first_logit, ``r = 1`` for full).
        y_train: ``(n,)`` int64 training labels.
        y_test: ``(m,)`` int64 test labels.
        n_classes: number of classes ``C``.
        group: rows per training point ``g`` (1 for first_logit, ``C`` for full).
        lam: ridge added to the scaled kernel.
    """

    K: np.ndarray
    KT: np.ndarray
    T: np.ndarray
    y_train: np.ndarray
    y_test: np.ndarray
    n_classes: int
    group: int
    lam: float

    @property
    def n(self) -> int:
        """Number of training points."""
        return int(self.y_train.shape[0])

    @property
    def m(self) -> int:
        """Number of test points."""
        return int(self.y_test.shape[0])

    @property
    def kind(self) -> str:
        """``"first_logit"`` (``g == 1``) or ``"full"``."""
        return "first_logit" if self.group == 1 else "full"

    def __repr__(self) -> str:
        return (f"RegressionProblem(kind={self.kind!r}, n={self.n}, m={self.m}, "
                f"n_classes={self.n_classes}, lam={self.lam:g})")

    @classmethod
    def from_kernels(
        cls,
        k_train: np.ndarray,
        k_test_train: np.ndarray,
        y_train: np.ndarray,
        y_test: np.ndarray,
        *,
        n_classes: int | None = None,
        lam: float = 1e-6,
        kernel_divisor: float = 1e4,
    ) -> RegressionProblem:
        """Validate raw kernels and labels and build the scaled, flattened problem.

        Args:
            k_train: ``(n, n)`` (first_logit) or ``(n, n, C, C)`` (full) training kernel.
            k_test_train: ``(m, n)`` or ``(m, n, C, C)`` test-by-train kernel.
            y_train: ``(n,)`` integer labels.
            y_test: ``(m,)`` integer labels.
            n_classes: number of classes; default ``max(label) + 1`` (at least 2), or ``C`` for full.
            lam: ridge ``> 0`` added after scaling.
            kernel_divisor: the kernels are divided by this (``> 0``).

        Raises:
            KernelError: bad shapes, non-finite entries, asymmetric ``k_train``, bad labels.
            ValueError: ``lam`` or ``kernel_divisor`` not a positive finite number.
        """
        if not (np.isfinite(lam) and lam > 0):
            raise ValueError(f"lam: must be a finite number > 0, got {lam!r}")
        if not (np.isfinite(kernel_divisor) and kernel_divisor > 0):
            raise ValueError(f"kernel_divisor: must be a finite number > 0, got {kernel_divisor!r}")
        k_tr = _as_float_array("k_train", k_train)
        k_te = _as_float_array("k_test_train", k_test_train)
        kind, n, m, kernel_c = _check_kernel_shapes(k_tr, k_te)
        yt = _as_labels("y_train", y_train, n)
        ye = _as_labels("y_test", y_test, m)
        _check_finite("k_train", k_tr)
        _check_finite("k_test_train", k_te)
        c = _resolve_n_classes(n_classes, kernel_c, yt, ye)
        _check_label_range("y_train", yt, c)
        _check_label_range("y_test", ye, c)

        if kind == "full":
            K, KT, g = _flatten_full(k_tr), _flatten_full(k_te), c
            T = np.zeros((n * c, 1))
            T[np.arange(n) * c + yt, 0] = 1.0
        else:
            K, KT, g = np.array(k_tr, dtype=np.float64), np.array(k_te, dtype=np.float64), 1
            T = np.zeros((n, c))
            T[np.arange(n), yt] = 1.0
        scale = float(np.abs(K).max())
        asym = _max_asymmetry(K)
        if asym > SYMMETRY_RTOL * scale:
            raise KernelError(f"k_train: not symmetric (max |K - K^T| = {asym:.3e} is "
                              f"{asym / scale:.3e} of max |K| = {scale:.3e}; tolerance {SYMMETRY_RTOL:g})")
        K = (K + K.T) * (0.5 / kernel_divisor)
        KT = KT / kernel_divisor
        return cls(K=_readonly(K), KT=_readonly(np.ascontiguousarray(KT)), T=_readonly(T),
                   y_train=_readonly(yt), y_test=_readonly(ye), n_classes=c, group=g, lam=float(lam))

    def digest(self) -> str:
        """Hex digest of everything that determines the regression (scaled kernels, targets, labels, lam).

        Identifies the problem a stream of marginals belongs to (resume refuses a different one).
        """
        import hashlib

        h = hashlib.blake2b(digest_size=16)
        h.update(repr((self.n, self.m, self.n_classes, self.group, float(self.lam))).encode())
        for arr in (self.K, self.KT, self.T, self.y_train, self.y_test):
            h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()

    def rows(self, points: np.ndarray) -> np.ndarray:
        """Flat row indices ``(len(points)*g,)`` owned by training points ``points``, in order."""
        pts = np.asarray(points, dtype=np.int64).reshape(-1)
        g = self.group
        return (pts[:, None] * g + np.arange(g)).reshape(-1)

    def check_points(self, points: np.ndarray, name: str = "subset") -> np.ndarray:
        """Return ``points`` as a 1-D int64 array; ValueError if out of range or repeated."""
        pts = np.asarray(points)
        if pts.ndim != 1:
            raise ValueError(f"{name}: expected a 1-D array of training indices, got shape {pts.shape}")
        if pts.size and pts.dtype.kind not in "iu":
            raise ValueError(f"{name}: expected integer training indices, got dtype {pts.dtype}")
        pts = pts.astype(np.int64)
        if pts.size and (pts.min() < 0 or pts.max() >= self.n):
            raise ValueError(f"{name}: indices must be in [0, {self.n - 1}]")
        if np.unique(pts).size != pts.size:
            raise ValueError(f"{name}: repeated training indices")
        return pts

    def reshape_predictions(self, flat: np.ndarray) -> np.ndarray:
        """``(..., m*g, r) -> (..., m, C)``."""
        return flat.reshape(flat.shape[:-2] + (self.m, self.n_classes))

    def predict(self, subset: np.ndarray | None = None) -> np.ndarray:
        """Direct float64 kernel-regression predictions of a subset.

        Args:
            subset: ``(s,)`` distinct training indices; ``None`` means all points.

        Returns:
            ``(m, C)`` predictions; zeros for an empty subset.

        Raises:
            KernelError: ``K[S, S] + lam I`` is not positive definite.
        """
        pts = np.arange(self.n) if subset is None else self.check_points(subset)
        if pts.size == 0:
            return np.zeros((self.m, self.n_classes))
        rows = self.rows(pts)
        if subset is None:  # no gather (a copy of K either way, for the ridge)
            A = np.array(self.K, dtype=np.float64)
            A[np.diag_indices(rows.size)] += self.lam
        else:
            A = self.K[np.ix_(rows, rows)] + self.lam * np.eye(rows.size)
        try:
            factor = scipy.linalg.cho_factor(A, lower=True, check_finite=False)
        except np.linalg.LinAlgError as err:
            raise KernelError(f"kernel is not positive semi-definite: K[S, S] + lam I is not positive "
                              f"definite for a subset of {pts.size} points (lam={self.lam:g})") from err
        coef = scipy.linalg.cho_solve(factor, self.T[rows], check_finite=False)
        return self.reshape_predictions((self.KT if subset is None else self.KT[:, rows]) @ coef)
