"""Empirical NTK blocks from flattened per-example Jacobians, accumulated in float64."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["kernel_tile", "condition_number", "spectrum_summary", "feature_kernel"]


def kernel_tile(ja: np.ndarray, jb: np.ndarray, *, chunk: int = 1 << 20) -> np.ndarray:
    """K[i, j(, c, d)] = <Ja[i, c], Jb[j, d]> summed over parameter chunks in float64.

    Args:
        ja: (Ba, C', P) Jacobians (any float dtype).
        jb: (Bb, C', P) Jacobians over the same parameter layout.
        chunk: parameters per float64 GEMM (bounds the temporary float64 copies).

    Returns:
        (Ba, Bb) float64 if C' == 1, else (Ba, Bb, C', C') float64.
    """
    if ja.ndim != 3 or jb.ndim != 3 or ja.shape[1:] != jb.shape[1:]:
        raise ValueError(f"kernel_tile: Jacobian shapes {ja.shape} and {jb.shape} do not match")
    ba, c, p = ja.shape
    bb = jb.shape[0]
    a = torch.from_numpy(np.ascontiguousarray(ja).reshape(ba * c, p))
    b = torch.from_numpy(np.ascontiguousarray(jb).reshape(bb * c, p))
    acc = torch.zeros((ba * c, bb * c), dtype=torch.float64)
    for start in range(0, p, chunk):
        stop = min(p, start + chunk)
        acc += a[:, start:stop].double() @ b[:, start:stop].double().T  # torch's BLAS (numpy's is far slower here)
    acc = acc.numpy()
    if c == 1:
        return acc
    return acc.reshape(ba, c, bb, c).transpose(0, 2, 1, 3).copy()


def condition_number(k: np.ndarray) -> float:
    """2-norm condition number of a symmetric PSD (n, n) kernel (inf if singular)."""
    eig = np.linalg.eigvalsh(k)
    top = float(eig[-1])
    low = float(eig[0])
    return float("inf") if low <= 0 else top / low


def spectrum_summary(k: np.ndarray, lam: float, kernel_divisor: float) -> dict[str, float | int | None]:
    """What the solver faces on a symmetric PSD ``(n, n)`` kernel, JSON-safe (no inf/nan).

    Returns:
        ``condition_number``: ``λ_max / λ_min`` of ``k``, None when ``k`` is numerically singular
        (``λ_min <= n·eps·λ_max``: more points than parameters, or repeated texts);
        ``numerical_rank``: eigenvalues above ``n·eps·λ_max``;
        ``condition_number_regularized``: of ``k / kernel_divisor + lam·I``, the matrix the regression solves
        (finite for ``lam > 0``).
    """
    eig = np.linalg.eigvalsh(k)
    top, low = float(eig[-1]), float(eig[0])
    cut = k.shape[0] * np.finfo(np.float64).eps * max(top, 0.0)
    reg = (max(top, 0.0) / kernel_divisor + lam) / (max(low, 0.0) / kernel_divisor + lam) if lam > 0 else None
    return {"condition_number": top / low if low > cut else None, "numerical_rank": int(np.count_nonzero(eig > cut)),
            "condition_number_regularized": reg}


def feature_kernel(a: np.ndarray, b: np.ndarray, c: int) -> np.ndarray:
    """float64 ``⟨φ(x), φ(x')⟩`` of feature rows ``a (p·c, D)`` against ``b (q·c, D)`` (rows example-major,
    ``i·c + class``): ``(p, q)`` for ``c == 1``, ``(p, q, c, c)`` otherwise (the kernel tiles' layout)."""
    k = np.asarray(a, dtype=np.float64) @ np.asarray(b, dtype=np.float64).T
    if c == 1:
        return k
    return np.ascontiguousarray(k.reshape(-1, c, k.shape[1] // c, c).transpose(0, 2, 1, 3))
