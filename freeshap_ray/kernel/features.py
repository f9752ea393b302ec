"""eNTK tiles from gradient features (:class:`~freeshap_ray.grads.features.FeatureBlock`), accumulated in float64.

Per parameter tensor the tile uses whichever exact formula is cheaper:

- dense × dense: ``Ga Gbᵀ`` over parameter chunks (float64 GEMMs, or float32 GEMMs over short chunks
  summed in float64 with ``precision="mixed"``);
- Linear factors × factors: the per-token formula K_ij = Σ_{t,t'} (a_it·a_jt')(g_it·g_jt') when tokens
  are few (e.g. layers that only the read position reaches), else materialise both sides and GEMM;
- embedding × embedding: K_ij = Σ_{t,t'} [id_it = id_jt'] (g_it·g_jt').
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import numpy as np
import torch

from ..grads.features import EmbeddingFactors, FeatureBlock, LinearFactors

__all__ = ["feature_tile"]

Precision = Literal["float64", "mixed"]
MIXED_CHUNK = 8192  # float32 partial sums over at most this many parameters (relative error ≲ 1e-6)
TOKEN_ROWS = 2048  # token rows per per-token-formula step (bounds the (Na, Nb) float64 temporary)


def _same(fa: FeatureBlock, fb: FeatureBlock) -> bool:
    if fa is fb:
        return True
    return (
        fa.dense.shape == fb.dense.shape
        and fa.dense.size > 0
        and fa.dense.__array_interface__["data"][0] == fb.dense.__array_interface__["data"][0]
    )


def _gram(a: np.ndarray, b: np.ndarray | None, chunk: int, precision: Precision) -> np.ndarray:
    """Σ over column chunks of a·bᵀ accumulated in float64; ``b is None`` means a·aᵀ.

    torch's BLAS, not numpy's: for these short-and-wide GEMMs (rows ≪ parameters) numpy's OpenBLAS ran
    ~20× slower on the development machine.
    """
    ta = torch.from_numpy(a)
    tb = ta if b is None else torch.from_numpy(b)
    acc = torch.zeros(ta.shape[0], tb.shape[0], dtype=torch.float64)
    step = min(chunk, MIXED_CHUNK) if precision == "mixed" else chunk
    for s in range(0, ta.shape[1], step):
        e = min(ta.shape[1], s + step)
        if precision == "mixed":
            acc += (ta[:, s:e] @ tb[:, s:e].T).double()
        else:
            x = ta[:, s:e].double()
            acc += x @ (x if b is None else tb[:, s:e].double()).T
    return acc.numpy()


class _Tokens(NamedTuple):
    """One side of the per-token formula: per active token its input ``a`` (N, d_in) — or its token id (N,) for
    an embedding table — its output-gradient ``g`` (N, d_out) and the row ``row`` (N,) it belongs to."""

    a: torch.Tensor
    g: torch.Tensor
    row: torch.Tensor

    @classmethod
    def of(cls, first: np.ndarray, g: np.ndarray, row: np.ndarray) -> _Tokens:
        return cls(torch.from_numpy(first), torch.from_numpy(g), torch.from_numpy(row))


def _token_formula(t1: _Tokens, t2: _Tokens, out: torch.Tensor, *, ids: bool = False) -> None:
    """out[r1_t, r2_t'] += (a1_t·a2_t')(g1_t·g2_t') (or [ids equal]·(g1_t·g2_t') when the ``a`` are token ids)."""
    for s in range(0, t1.g.shape[0], TOKEN_ROWS):
        e = min(t1.g.shape[0], s + TOKEN_ROWS)
        m = (t1.g[s:e] @ t2.g.T).double()
        if ids:
            m *= (t1.a[s:e, None] == t2.a[None, :]).double()
        else:
            m *= (t1.a[s:e] @ t2.a.T).double()
        tmp = torch.zeros(e - s, out.shape[1], dtype=torch.float64).index_add_(1, t2.row, m)
        out.index_add_(0, t1.row[s:e], tmp)


class _Scratch:
    """Reusable float32 buffers for gradients materialised inside a tile (one per side).

    Layers are materialised one after another; writing each into the same already-touched memory
    instead of a fresh allocation avoids the page faults of new memory, which cost as much as the
    materialising products themselves on the development VM.
    """

    def __init__(self) -> None:
        self.bufs: dict[str, torch.Tensor] = {}

    def get(self, side: str, rows: int, width: int) -> torch.Tensor:
        need = rows * width
        buf = self.bufs.get(side)
        if buf is None or buf.numel() < need:
            buf = self.bufs[side] = torch.empty(need)
        return buf[:need].view(rows, width)


@dataclass
class _Tile:
    """A tile being accumulated: ``out`` (ra, rb) float64, the GEMM settings, and the scratch buffers."""

    out: torch.Tensor
    same: bool
    chunk: int
    precision: Precision
    scratch: _Scratch = field(default_factory=_Scratch)

    def gram(self, a: np.ndarray, b: np.ndarray | None) -> None:
        self.out += torch.from_numpy(_gram(a, b, self.chunk, self.precision))

    def materialized(self, f: LinearFactors, side: str) -> np.ndarray:
        rows = self.out.shape[0 if side == "a" else 1]
        return f.materialize(rows, out=self.scratch.get(side, rows, f.n_params)).numpy()


def _linear_pair(fa: LinearFactors, fb: LinearFactors, tile: _Tile) -> None:
    """One Linear weight's part of the tile, by the per-token formula or materialised gradients, whichever is cheaper."""
    (ra, rb), na, nb, p = tile.out.shape, len(fa.row), len(fb.row), fa.n_params
    d = fa.a.shape[1] + fa.g.shape[1]
    token_cost = na * nb * d
    dense_cost = (na + nb) * p + ra * rb * p
    if tile.same:
        token_cost /= 2
        dense_cost = na * p + ra * ra * p / 2
    if token_cost <= dense_cost:
        _token_formula(_Tokens.of(fa.a, fa.g, fa.row), _Tokens.of(fb.a, fb.g, fb.row), tile.out)
        return
    tile.gram(tile.materialized(fa, "a"), None if tile.same else tile.materialized(fb, "b"))


def _embedding_pair(ea: EmbeddingFactors, eb: EmbeddingFactors, out: torch.Tensor) -> None:
    _token_formula(_Tokens.of(ea.ids, ea.g, ea.row), _Tokens.of(eb.ids, eb.g, eb.row), out, ids=True)


def feature_tile(
    fa: FeatureBlock, fb: FeatureBlock, *, chunk: int = 1 << 20, precision: Precision = "float64"
) -> np.ndarray:
    """The eNTK tile between two feature blocks of the same parameter selection.

    Args:
        fa, fb: blocks of Ba and Bb examples with the same C' rows per example.
        chunk: parameters per float64 GEMM (bounds temporary copies).
        precision: ``float64`` GEMMs, or ``mixed`` (float32 GEMMs over ≤ 8,192 parameters, float64 sums).

    Returns:
        (Ba, Bb) float64 if C' == 1, else (Ba, Bb, C', C') float64.
    """
    with warnings.catch_warnings():
        # Blocks fetched from the Ray object store are read-only numpy arrays; they are only read here.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        return _feature_tile(fa, fb, chunk=chunk, precision=precision)


def _feature_tile(fa: FeatureBlock, fb: FeatureBlock, *, chunk: int, precision: Precision) -> np.ndarray:
    """Body of :func:`feature_tile`."""
    if fa.n_outputs != fb.n_outputs or fa.keys() != fb.keys():
        raise ValueError("feature_tile: the two blocks cover different parameters or outputs")
    tile = _Tile(torch.zeros(fa.rows, fb.rows, dtype=torch.float64), _same(fa, fb), chunk, precision)
    lin_a = {f.key: f for f in fa.linear}
    lin_b = {f.key: f for f in fb.linear}
    if fa.columns.spans == fb.columns.spans:
        if fa.dense.shape[1]:
            tile.gram(fa.dense, None if tile.same else fb.dense)
    else:  # the blocks materialised different layers: per parameter tensor
        for key, (s, e) in fa.columns.spans.items():
            if key in fb.columns.spans:
                s2, e2 = fb.columns.spans[key]
                tile.gram(fa.dense[:, s:e], fb.dense[:, s2:e2])
            else:
                tile.gram(fa.dense[:, s:e], tile.materialized(lin_b[key], "b"))
        for key, (s2, e2) in fb.columns.spans.items():
            if key not in fa.columns.spans:
                tile.gram(tile.materialized(lin_a[key], "a"), fb.dense[:, s2:e2])
    for key, f in lin_a.items():
        if key in lin_b:
            _linear_pair(f, lin_b[key], tile)
    emb_b = {e.key: e for e in fb.embedding}
    for e in fa.embedding:
        _embedding_pair(e, emb_b[e.key], tile.out)
    k = tile.out.numpy()
    c = fa.n_outputs
    if c == 1:
        return k
    return k.reshape(fa.n_examples, c, fb.n_examples, c).transpose(0, 2, 1, 3).copy()
