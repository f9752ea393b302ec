"""Empirical NTK blocks from flattened per-example Jacobians, accumulated in float64."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["kernel_tile", "condition_number"]


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
