"""Values from every stored sample of a seed: the one place results are computed, whatever the sink.

Each ``(seed, sample id)`` is counted once (a batch written twice, e.g. by a task Ray retried after the
driver had already stored it, is ignored the second time). Values are computed in one pass over all samples
in id order, so they are bitwise independent of how the samples were batched, interrupted or resumed.
Samples of other seeds are independent replicates: they are counted and compared (``seed_spearman``), never
mixed into the values.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from typing import TYPE_CHECKING

from ..values import ValuesResult
from .samplers import samples_from_marginals
from .sign import SignReport, sign_agreement
from .sinks import MarginalsSink

if TYPE_CHECKING:
    from .estimators import Context, Estimator

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


def _per_test(sink: MarginalsSink, n: int, m: int, sampler: str, seed: int | None) -> tuple[ValuesResult, float]:
    """Per-test values of the stored permutations (of ``seed``) and the split-half Spearman of the (n, m) values."""
    per_test = ValuesResult.empty(n, m)
    halves = [ValuesResult.empty(n, m), ValuesResult.empty(n, m)]
    seen: set[tuple[int, int]] = set()
    for seeds, ids, marg in sink.per_test_parts(n, m):
        keep = []
        for r, key in enumerate(zip(seeds.tolist(), ids.tolist())):
            if key not in seen and (seed is None or key[0] == seed):
                seen.add(key)
                keep.append(r)
        if keep:
            sel = np.array(keep)
            for sd in np.unique(seeds[sel]):
                one = sel[seeds[sel] == sd]
                sample_ids, samples = samples_from_marginals(ids[one], marg[one], sampler)
                if samples.shape[0]:
                    per_test = per_test + ValuesResult.from_marginals(samples)
                    for h in (0, 1):
                        if np.any(sample_ids % 2 == h):
                            halves[h] = halves[h] + ValuesResult.from_marginals(samples[sample_ids % 2 == h])
    return per_test, _spearman(halves[0].values.ravel(), halves[1].values.ravel())


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two value vectors (nan when either is constant)."""
    from scipy.stats import spearmanr

    if a.size < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan")
    return float(spearmanr(a, b).statistic)


def _stored_permutations(sink: MarginalsSink, n: int):
    """Stored permutation rows, each ``(seed, perm_id)`` once: (seeds, ids, point-ordered marginals, truncated_at)."""
    st = sink.marginals(n)
    key = np.stack([st.seeds, st.perm_ids], axis=1) if st.perm_ids.size else np.zeros((0, 2), dtype=np.int64)
    _, first = np.unique(key, axis=0, return_index=True)
    duplicates = st.perm_ids.size - first.size
    if duplicates:
        log.warning("%d duplicate permutation rows ignored", duplicates)
    keep = np.sort(first)
    return (st.seeds[keep], st.perm_ids[keep], _scatter(st.orders[keep], st.marginals[keep]), st.truncated_at[keep],
            int(duplicates))


def _seed_counts(seeds: np.ndarray) -> dict[str, int]:
    return {str(int(sd)): int((seeds == sd).sum()) for sd in np.unique(seeds)}


def aggregate(sink: MarginalsSink, n: int, m: int, est: Estimator, ctx: Context, *, sign_splits: int = 100,
              all_seeds: bool = False) -> Estimate:
    """Values (and per-test values), sign robustness, split-half stability and counts from the samples of the
    settings' seed that ``sink`` holds (``all_seeds``: of every seed, as one estimate).

    ``info`` holds ``n_permutations`` (samples of this seed), ``n_samples`` (independent samples), ``seeds``
    (every stored seed; ``samples_per_seed``: how many each: independent replicates), ``stability_spearman`` (Spearman between the values of
    two independent halves of this seed's samples), ``seed_spearman`` (Spearman against each other stored
    seed's values) and, for permutations, ``mean_truncated_at`` and ``duplicate_rows_ignored``.
    """
    c = est.settings.config
    if est.family == "permutation":
        return _aggregate_permutations(sink, n, m, est, sign_splits=sign_splits, all_seeds=all_seeds)
    rows = sink.samples(est.family, n, None)
    seeds_all = np.array([sd for sd, _ in rows], dtype=np.int64)
    by_seed: dict[int, dict[int, Any]] = {}
    for sd, r in rows:
        by_seed.setdefault(int(sd), {}).setdefault(int(r.sample_id), r)  # each (seed, id) once
    mine = [r for sd, recs in by_seed.items() if all_seeds or sd == c.seed for r in recs.values()]
    mine.sort(key=lambda r: r.sample_id)
    overall = est.values(est.stats(mine, n, ctx), n)
    per_test, per_test_rho = None, None
    if c.per_test_point:
        full = _unique([(sd, r) for sd, r in sink.samples(est.family, n, m) if all_seeds or sd == c.seed])
        per_test = est.values(est.stats(full, n, ctx, per_test=True), n, m)
        h = [est.values(est.stats([r for r in full if est.half(r.sample_id, ctx) == k], n, ctx, per_test=True), n, m)
             for k in (0, 1)]
        per_test_rho = _spearman(h[0].values.ravel(), h[1].values.ravel())
    halves = [est.values(est.stats([r for r in mine if est.half(r.sample_id, ctx) == h], n, ctx), n) for h in (0, 1)]
    sign = _split_sign(est, mine, n, ctx, n_splits=sign_splits, seed=c.seed)
    others = {str(sd): _spearman(overall.values, est.values(est.stats(sorted(recs.values(), key=lambda r: r.sample_id),
                                                                       n, ctx), n).values)
              for sd, recs in by_seed.items() if sd != c.seed and len(recs) >= 2}
    info = {
        "n_permutations": len(mine),
        "n_samples": len(mine),
        "seeds": sorted(int(x) for x in np.unique(seeds_all)),
        "samples_per_seed": _seed_counts(seeds_all),
        "stability_spearman": _spearman(halves[0].values, halves[1].values),
        "seed_spearman": others,
        "duplicate_rows_ignored": int(len(rows) - sum(len(v) for v in by_seed.values())),
        # what the estimator says of its values (strata, tail, the measured truncation bias, ...)
        **{k: v for k, v in overall.info.items() if isinstance(v, (int, float, str)) or v is None},
    }
    if per_test_rho is not None:
        info["per_test_stability_spearman"] = per_test_rho
    return Estimate(overall, per_test, sign, info)


def _unique(rows: list[tuple[int, Any]]) -> list:
    seen, out = set(), []
    for sd, r in rows:
        if (sd, r.sample_id) not in seen:
            seen.add((sd, r.sample_id))
            out.append(r)
    return sorted(out, key=lambda r: r.sample_id)


def _split_sign(est: Estimator, records: list, n: int, ctx: Context, *, n_splits: int, seed: int) -> SignReport:
    """Sign agreement between the values of random halves of ``records`` (as :func:`sign_agreement` does for
    permutation samples): ``halves`` from the estimator's own two halves, ``per_point`` over random splits."""
    s = len(records)
    if s < 2:
        return SignReport(np.full(n, np.nan), float("nan"), float("nan"), n_splits, s)
    h = [est.values(est.stats([r for r in records if est.half(r.sample_id, ctx) == k], n, ctx), n).values
         for k in (0, 1)]
    halves = float(np.mean(np.sign(h[0]) == np.sign(h[1])))
    rng = np.random.default_rng([int(seed), 0x5167])
    agree = np.zeros(n)
    for _ in range(n_splits):
        pick = np.zeros(s, dtype=bool)
        pick[rng.permutation(s)[: s // 2]] = True
        a = est.values(est.stats([r for r, p in zip(records, pick) if p], n, ctx), n).values
        b = est.values(est.stats([r for r, p in zip(records, pick) if not p], n, ctx), n).values
        agree += np.sign(a) == np.sign(b)
    per_point = agree / n_splits
    return SignReport(per_point, halves, float(per_point.mean()), n_splits, s)


def _aggregate_permutations(sink: MarginalsSink, n: int, m: int, est: Estimator, *, sign_splits: int,
                            all_seeds: bool) -> Estimate:
    c = est.settings.config
    seeds_all, ids_all, marg_all, trunc_all, duplicates = _stored_permutations(sink, n)
    sel = np.ones(ids_all.size, dtype=bool) if all_seeds else seeds_all == c.seed
    ids, seeds, marg = ids_all[sel], seeds_all[sel], marg_all[sel]
    samples = samples_by_seed(seeds, ids, marg, c.sampler)
    if est.name == "cv":
        overall = est.values(est.stats_from_samples(seeds, ids, marg, n), n)
    else:
        overall = ValuesResult.from_marginals(samples) if samples.shape[0] else ValuesResult.empty(n)
    sign = sign_agreement(samples, n_splits=sign_splits, seed=c.seed)
    per_test, per_test_rho = None, None
    if c.per_test_point:
        per_test, per_test_rho = _per_test(sink, n, m, c.sampler, None if all_seeds else c.seed)
        if est.name == "cv":
            per_test = _cv_per_test(sink, n, m, est, None if all_seeds else c.seed)
    halves = [samples[h::2].mean(axis=0) if samples.shape[0] > h else np.zeros(n) for h in (0, 1)]
    if est.name == "cv":
        unit_ids = ids // est.unit
        halves = [est.values(est.stats_from_samples(seeds[unit_ids % 2 == h], ids[unit_ids % 2 == h],
                                                    marg[unit_ids % 2 == h], n), n).values for h in (0, 1)]
    others = {}
    for sd in np.unique(seeds_all):
        if sd != c.seed and not all_seeds and (seeds_all == sd).sum() >= 2 * est.unit:
            other = samples_by_seed(seeds_all[seeds_all == sd], ids_all[seeds_all == sd], marg_all[seeds_all == sd],
                                    c.sampler)
            others[str(int(sd))] = _spearman(overall.values, other.mean(axis=0))
    truncated = trunc_all[sel]
    info = {
        "n_permutations": int(ids.size),
        "n_samples": int(samples.shape[0]),
        "seeds": sorted(int(x) for x in np.unique(seeds_all)),
        "mean_truncated_at": float(np.mean(truncated)) if ids.size else float("nan"),
        "duplicate_rows_ignored": int(duplicates),
        "samples_per_seed": _seed_counts(seeds_all),
        "stability_spearman": _spearman(np.asarray(halves[0]), np.asarray(halves[1])),
        "seed_spearman": others,
    }
    if per_test_rho is not None:
        info["per_test_stability_spearman"] = per_test_rho
    return Estimate(overall, per_test, sign, info)


def _cv_per_test(sink: MarginalsSink, n: int, m: int, est: Estimator, seed: int | None) -> ValuesResult:
    seen: set[tuple[int, int]] = set()
    rows_s, rows_i, rows_m = [], [], []
    for seeds, ids, marg in sink.per_test_parts(n, m):
        for r, key in enumerate(zip(seeds.tolist(), ids.tolist())):
            if key not in seen and (seed is None or key[0] == seed):
                seen.add(key)
                rows_s.append(key[0])
                rows_i.append(key[1])
                rows_m.append(marg[r])
    if not rows_i:
        return ValuesResult.empty(n, m)
    return est.values(est.stats_from_samples(np.array(rows_s), np.array(rows_i), np.stack(rows_m), n), n, m)
