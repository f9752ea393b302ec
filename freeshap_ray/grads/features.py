"""Per-example gradient *features* of a block: dense gradients where that is cheaper, token factors elsewhere.

A block of R rows (R = B examples × C' differentiated logits) is represented by

- ``dense``: (R, P_dense) float32 per-example gradients of some parameter tensors, with a column map;
- ``linear``: :class:`LinearFactors` of Linear weights, G_r = Σ_t g_rt ⊗ a_rt over the row's active
  tokens (those with a non-zero output-gradient), never materialised unless a tile asks for it;
- ``embedding``: :class:`EmbeddingFactors` of embedding tables, G_r[v] = Σ_{t: id_rt = v} g_rt.

Everything is numpy so blocks travel through the Ray object store without copies. The Gram of two blocks
is :func:`freeshap_ray.kernel.features.feature_tile`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["DenseColumns", "EmbeddingFactors", "FeatureBlock", "LinearFactors"]


@dataclass
class LinearFactors:
    """Weight gradient of one Linear layer (d_out, d_in) as per-token factors.

    Attributes:
        key: parameter name (identifies the layer across blocks).
        a: (N, d_in) float32 inputs of the N active tokens.
        g: (N, d_out) float32 output-gradients of the same tokens.
        row: (N,) int64 row of each token, non-decreasing.
    """

    key: str
    a: np.ndarray
    g: np.ndarray
    row: np.ndarray

    @property
    def n_params(self) -> int:
        return int(self.a.shape[1] * self.g.shape[1])

    def materialize(self, rows: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """(rows, d_out·d_in) float32 per-row gradients, row-major like ``weight.reshape(-1)``.

        One ``g_rᵀ a_r`` matrix product per row written straight into ``out`` (a (rows, d_out·d_in) view
        whose rows are contiguous, e.g. a column span of a block's dense array): a batched product into a
        fresh (rows, d_out, d_in) tensor plus a copy ran ~2× slower on CPU (page faults of the new memory).
        """
        a, g, row = (torch.from_numpy(x) for x in (self.a, self.g, self.row))
        d_in, d_out = a.shape[1], g.shape[1]
        if out is None:
            out = torch.empty(rows, d_out * d_in)
        counts = torch.bincount(row, minlength=rows).tolist()
        start = 0
        for r, c in enumerate(counts):
            dst = out[r].view(d_out, d_in)
            if c:
                torch.mm(g[start : start + c].T, a[start : start + c], out=dst)
            else:
                dst.zero_()
            start += c
        return out


@dataclass
class EmbeddingFactors:
    """Gradient of an embedding table as the (id, output-gradient) pairs of the active tokens.

    Attributes:
        key: parameter name.
        ids: (N,) int64 token ids.
        g: (N, d) float32 output-gradients.
        row: (N,) int64 row of each token.
    """

    key: str
    ids: np.ndarray
    g: np.ndarray
    row: np.ndarray


@dataclass
class DenseColumns:
    """Which columns of ``FeatureBlock.dense`` hold which parameter: key → (start, stop)."""

    spans: dict[str, tuple[int, int]] = field(default_factory=dict)

    def add(self, key: str, width: int) -> tuple[int, int]:
        start = max((s for _, s in self.spans.values()), default=0)
        self.spans[key] = (start, start + width)
        return self.spans[key]


@dataclass
class FeatureBlock:
    """Per-example gradient features of one block of examples over one parameter selection.

    Attributes:
        n_examples: B.
        n_outputs: C' logits differentiated per example (rows are example-major: r = b·C' + c).
        dense: (R, P_dense) float32.
        columns: the dense column map.
        linear, embedding: factor entries.
    """

    n_examples: int
    n_outputs: int
    dense: np.ndarray
    columns: DenseColumns
    linear: list[LinearFactors] = field(default_factory=list)
    embedding: list[EmbeddingFactors] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return self.n_examples * self.n_outputs

    def nbytes(self) -> int:
        total = self.dense.nbytes
        for f in self.linear:
            total += f.a.nbytes + f.g.nbytes + f.row.nbytes
        for e in self.embedding:
            total += e.ids.nbytes + e.g.nbytes + e.row.nbytes
        return total

    def keys(self) -> set[str]:
        return set(self.columns.spans) | {f.key for f in self.linear} | {e.key for e in self.embedding}
