"""Values from every stored permutation: the one place results are computed, whatever the sink.

Each ``(seed, perm_id)`` is counted once (a batch written twice, e.g. by a task Ray retried after the
driver had already stored it, is ignored the second time). Overall values are computed in one pass over
all samples in (seed, id) order, so they are bitwise independent of how the permutations were batched,
interrupted or resumed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..values import ValuesResult
from .samplers import samples_from_marginals
from .sign import SignReport, sign_agreement
from .sinks import MarginalsSink

__all__ = ["Estimate", "aggregate", "samples_by_seed"]

log = logging.getLogger(__name__)


@dataclass
class Estimate:
    """Values from a sink's samples.

    Attributes:
        values: overall values (n,).
        per_test: per-test values (n, m), or None.
        sign: sign robustness across independent halves of the samples.
        info: counts (permutations, samples, seeds, mean truncation point, duplicate rows ignored).
    """

    values: ValuesResult
    per_test: ValuesResult | None
    sign: SignReport
    info: dict[str, Any] = field(default_factory=dict)


def _scatter(orders: np.ndarray, by_position: np.ndarray) -> np.ndarray:
    """``out[r, orders[r, k]] = by_position[r, k]`` (position order -> point order)."""
    out = np.zeros_like(by_position)
    out[np.arange(orders.shape[0])[:, None], orders] = by_position
    return out


def samples_by_seed(seeds: np.ndarray, ids: np.ndarray, marg: np.ndarray, sampler: str) -> np.ndarray:
    """Independent samples ``(S, n[, m])``, grouped by seed then sorted by sample id."""
    out = [samples_from_marginals(ids[seeds == sd], marg[seeds == sd], sampler)[1] for sd in np.unique(seeds)]
    return np.concatenate(out, axis=0) if out else marg[:0]


def _per_test(sink: MarginalsSink, n: int, m: int, sampler: str) -> ValuesResult:
    per_test = ValuesResult.empty(n, m)
    seen: set[tuple[int, int]] = set()
    for seeds, ids, marg in sink.per_test_parts(n, m):
        keep = []
        for r, key in enumerate(zip(seeds.tolist(), ids.tolist())):
            if key not in seen:
                seen.add(key)
                keep.append(r)
        if keep:
            sel = np.array(keep)
            samples = samples_by_seed(seeds[sel], ids[sel], marg[sel], sampler)
            if samples.shape[0]:
                per_test = per_test + ValuesResult.from_marginals(samples)
    return per_test


def aggregate(sink: MarginalsSink, n: int, m: int, *, sampler: str, per_test_point: bool, sign_splits: int = 100,
              sign_seed: int = 0) -> Estimate:
    """Values (and per-test values), sign robustness and counts from every permutation ``sink`` holds."""
    st = sink.marginals(n)
    key = np.stack([st.seeds, st.perm_ids], axis=1) if st.perm_ids.size else np.zeros((0, 2), dtype=np.int64)
    _, first = np.unique(key, axis=0, return_index=True)
    duplicates = st.perm_ids.size - first.size
    if duplicates:
        log.warning("%d duplicate permutation rows ignored", duplicates)
    keep = np.sort(first)
    ids, seeds = st.perm_ids[keep], st.seeds[keep]
    samples = samples_by_seed(seeds, ids, _scatter(st.orders[keep], st.marginals[keep]), sampler)
    overall = ValuesResult.from_marginals(samples) if samples.shape[0] else ValuesResult.empty(n)
    sign = sign_agreement(samples, n_splits=sign_splits, seed=sign_seed)
    per_test = _per_test(sink, n, m, sampler) if per_test_point else None
    truncated = st.truncated_at[keep]
    info = {
        "n_permutations": int(ids.size),
        "n_samples": int(samples.shape[0]),
        "seeds": sorted(int(x) for x in np.unique(seeds)),
        "mean_truncated_at": float(np.mean(truncated)) if ids.size else float("nan"),
        "duplicate_rows_ignored": int(duplicates),
    }
    return Estimate(overall, per_test, sign, info)
