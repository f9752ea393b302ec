"""Kernel rows of new texts against a finished run's training set, tile by tile as the kernel job computes them.

The kernel job computes a test×train tile as ``worker.tile(J(test block), J(train block))`` with the test
texts in blocks of ``kernel.block_size`` and the training set in the plan's blocks. :func:`kernel_rows` does
exactly that for new texts, with the training blocks' gradient features taken from a
:class:`TrainFeatures` source (a cache on disk, a stored feature dataset, or blocks computed on the spot),
so its rows are the rows the kernel job would write for these texts appended to the test set.
"""

from __future__ import annotations

from typing import Protocol, Union

import numpy as np

from ..grads.features import FeatureBlock
from .plan import blocks

__all__ = ["Block", "BlockWorker", "TrainFeatures", "kernel_rows"]

#: A gradient block: :class:`FeatureBlock` (hooks, projected or exact) or a dense (B, C', P) Jacobian (func).
Block = Union[FeatureBlock, np.ndarray]


class BlockWorker(Protocol):
    """What computes gradient blocks and tiles (:class:`~freeshap_ray.kernel.worker.KernelWorker`)."""

    def jacobian(self, texts: list[str]) -> Block:
        """Gradient block of ``texts``."""

    def tile(self, ja: Block, jb: Block, chunk: int) -> np.ndarray:
        """(Ba, Bb) or (Ba, Bb, C, C) float64 tile between two blocks."""


class TrainFeatures(Protocol):
    """The training set's gradient blocks, in the kernel plan's blocks."""

    @property
    def bounds(self) -> list[tuple[int, int]]:
        """``[start, stop)`` of each training block (``kernel.plan.blocks(n, block_size)``)."""

    def block(self, b: int) -> Block:
        """Gradient block ``b`` (examples ``bounds[b]``)."""


def kernel_rows(worker: BlockWorker, texts: list[str], train: TrainFeatures, *, block_size: int,
                chunk: int) -> np.ndarray:
    """Kernel rows of ``texts`` against the training set.

    Args:
        worker: computes the texts' gradient blocks and the tiles (same model, selection, projection).
        texts: m new texts, taken in blocks of ``block_size`` as the kernel job takes test texts.
        train: the training blocks.
        block_size: ``kernel.block_size``.
        chunk: ``kernel.chunk_params``.

    Returns:
        ``(m, n)`` float64 (first-logit kernel) or ``(m, n, C, C)`` (full kernel).
    """
    out = []
    for start, stop in blocks(len(texts), block_size):
        ja = worker.jacobian(list(texts[start:stop]))
        out.append(np.concatenate([worker.tile(ja, train.block(b), chunk) for b in range(len(train.bounds))], axis=1))
    return np.concatenate(out, axis=0)
