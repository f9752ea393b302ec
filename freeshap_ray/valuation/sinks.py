"""Where the marginals of finished permutations go: a :class:`MarginalsSink`.

The valuation engine (:func:`freeshap_ray.distributed.shapley_job.run_valuation`) hands every finished
batch to its sink before it decides whether to stop, and computes the final values from everything the
sink holds (:func:`~freeshap_ray.valuation.aggregate.aggregate`). Two implementations:

* :class:`MemorySink` (here): keeps the batches in memory (the Python API without a checkpoint);
* :class:`freeshap_ray.io.MarginalsStore`: Parquet parts on disk (or under an output URI), resumable;
  the Arrow encoding lives there, in ``io/``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .tmc import PermutationResult

__all__ = ["Batch", "MarginalsSink", "MemorySink", "StoredMarginals"]

#: One finished task: ``[(perm_id, PermutationResult), ...]`` in id order.
Batch = list[tuple[int, PermutationResult]]


@dataclass
class StoredMarginals:
    """Every stored permutation, one row each (duplicates of a ``(seed, perm_id)`` possible).

    Attributes:
        seeds, perm_ids: ``(P,)`` int64.
        orders: ``(P, n)`` int64 training indices in insertion order.
        marginals: ``(P, n)`` float64 marginal of ``orders[r, k]`` at position ``k`` (mean utility).
        truncated_at: ``(P,)`` int64 points added before truncation.
    """

    seeds: np.ndarray
    perm_ids: np.ndarray
    orders: np.ndarray
    marginals: np.ndarray
    truncated_at: np.ndarray

    @classmethod
    def empty(cls, n: int) -> StoredMarginals:
        z = np.zeros(0, dtype=np.int64)
        return cls(z, z.copy(), np.zeros((0, n), dtype=np.int64), np.zeros((0, n)), z.copy())


class MarginalsSink(Protocol):
    """A resumable stream of per-permutation marginals (see the module docstring)."""

    def open(self, key: dict[str, Any], *, resume: bool) -> dict[str, Any]:
        """Start (or resume) a run whose samples are samples of ``key`` (``ValuationSettings.run_key``).

        Returns:
            What :meth:`annotate` recorded with the stored run (e.g. the stratified plans), or ``{}``.

        Raises:
            OutputError: stored samples of another ``key`` (unless the sink was told to discard them).
        """

    def annotate(self, extra: dict[str, Any]) -> None:
        """Record ``extra`` with the run (what its sample ids mean, e.g. an allocation plan)."""

    def write(self, batch: Batch, seed: int, sampler: str, per_test_point: bool) -> None:
        """Keep one finished batch of permutations (whole samples)."""

    def write_samples(self, family: str, seed: int, records: list) -> None:
        """Keep one finished batch of ``stratified`` (StratifiedSample) or ``msr`` (MSRSample) records."""

    def samples(self, family: str, n: int, m: int | None) -> list[tuple[int, Any]]:
        """Every kept ``(seed, record)`` of ``family`` (stratified or msr), in the order they were kept."""

    def marginals(self, n: int) -> StoredMarginals:
        """Everything kept so far (``n`` training points)."""

    def per_test_parts(self, n: int, m: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per-test marginals in chunks: ``(seeds (b,), perm_ids (b,), marginals (b, n, m))`` by point index."""


class MemorySink:
    """A :class:`MarginalsSink` in memory (nothing is resumed across processes)."""

    def __init__(self) -> None:
        self._rows: list[tuple[int, int, PermutationResult]] = []
        self._samples: list[tuple[int, Any]] = []
        self._extra: dict[str, Any] = {}

    def open(self, key: dict[str, Any], *, resume: bool) -> dict[str, Any]:
        if not resume:
            self._rows.clear()
            self._samples.clear()
            self._extra = {}
        return dict(self._extra)

    def annotate(self, extra: dict[str, Any]) -> None:
        self._extra.update(extra)

    def write_samples(self, family: str, seed: int, records: list) -> None:
        self._samples += [(seed, r) for r in records]

    def samples(self, family: str, n: int, m: int | None) -> list[tuple[int, Any]]:
        return list(self._samples)

    def write(self, batch: Batch, seed: int, sampler: str, per_test_point: bool) -> None:
        self._rows += [(seed, pid, r) for pid, r in batch]

    def marginals(self, n: int) -> StoredMarginals:
        if not self._rows:
            return StoredMarginals.empty(n)
        rs = [r for _, _, r in self._rows]
        mean = [r.marginals.mean(axis=1) if r.marginals.ndim == 2 else r.marginals for r in rs]
        return StoredMarginals(
            seeds=np.array([s for s, _, _ in self._rows], dtype=np.int64),
            perm_ids=np.array([p for _, p, _ in self._rows], dtype=np.int64),
            orders=np.stack([r.permutation for r in rs]),
            marginals=np.stack([mm[r.permutation] for mm, r in zip(mean, rs)]),
            truncated_at=np.array([r.truncated_at for r in rs], dtype=np.int64),
        )

    def per_test_parts(self, n: int, m: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        if self._rows:
            yield (np.array([s for s, _, _ in self._rows], dtype=np.int64),
                   np.array([p for _, p, _ in self._rows], dtype=np.int64),
                   np.stack([r.marginals for _, _, r in self._rows]))
