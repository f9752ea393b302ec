"""Stratified Shapley sampling: each point's marginal sampled by coalition size, budgets by variance.

The Shapley value is an average over coalition sizes (Maleki et al. 2013; Castro et al. 2017):

    phi_i = (1/n) sum_{s=0}^{n-1} mu_{i,s},   mu_{i,s} = E_{S in N-{i}, |S|=s} [v(S + i) - v(S)].

Sizes are grouped into strata ``[lo_h, hi_h)`` (doubling widths by default: 0, 1, 2-3, 4-7, ...) of
width ``w_h``; with ``mu_{i,h}`` the mean of ``mu_{i,s}`` over the sizes of stratum ``h``,
``phi_i = sum_h (w_h / n) mu_{i,h}``. Each stratum mean is estimated from its own samples, so

    value_i = sum_h (w_h/n) mean_{i,h},   stderr_i^2 = sum_h (w_h/n)^2 var_{i,h} / count_{i,h}

(strata of one point come from different samples, hence are independent).

**One sample** (a function of ``(seed, sample_id, plan)`` only, like ``permutation_for``):

1. the plan's cycle names the stratum ``h`` of this sample and its occurrence ``r``; points ``j`` with
   ``plan.counts[j, h] > r`` take part (all of them for a pooled plan);
2. ``pi = permutation_for(n, seed, sample_id)``, ``pos`` its inverse;
3. each taking-part point gets a size ``t_j``: ``pos_j`` if ``pos_j`` lies in the stratum (its ordinary
   permutation marginal, free), else ``lo_h + floor(u_j w_h)`` with ``u = default_rng([seed, sample_id,
   TAG]).random(n)``; either way ``t_j`` is uniform on the stratum;
4. the coalition ``S_j`` is the first ``t_j`` points of ``pi`` other than ``j``. Given ``t_j`` it is a
   uniform size-``t_j`` subset of ``N - {j}``: ``t_j`` depends on ``pi`` only through ``pos_j``, and the
   order of the other points is independent of ``pos_j``;
5. ``pi`` is walked (exact incremental Cholesky) only as far as the stratum needs; ``v(S_j + j)`` and
   ``v(S_j)`` are prefix utilities, or one triangular solve away from one:
   ``pos_j == t_j``: ``v(pi[:t+1]) - v(pi[:t])``; ``pos_j > t_j``: ``S_j = pi[:t]`` and ``j`` is
   branched onto it; ``pos_j < t_j``: ``S_j + j = pi[:t+1]`` and ``j`` is removed from it.

All taking-part points share the sample's stratum, so a sample in a small stratum walks a short prefix:
its cost is ``~hi_h^3/3`` for the walk plus ``~t^2 + 2 m t`` per point (dual solver). On ``D`` features
(:class:`~freeshap_ray.utility.FeatureProblem`, the primal QR solver) the walk costs ``~2 D^2`` per row and
stops at every size of the stratum, and each point ``O(D^2 + m D)``, independent of ``t``; the records are
the same up to rounding.

**Record** (one per sample, the unit that is streamed and resumed): ``sample_id``, ``sizes (n,)`` int
(``-1`` = not taking part) and ``marginals (n,)`` or ``(n, m)`` per test point. The stratum of a record
follows from its size and the edges, so aggregation (:class:`StrataStats`) needs only the records and
the edges; records from any plans and any batching merge.

**Truncation**, explicit: strata at or beyond a truncation length ``L`` (an edge) form the tail, where a
saturated utility makes marginals small but not zero. A plan either samples the tail by its Neyman
allocation (usually small, tail samples being expensive: ``tail="sample"``), samples it at a fixed
minimum rate only to measure the bias (``tail="thin"``), or never samples it (``tail="zero"``).
:meth:`StrataStats.values` with ``tail="zero"`` drops the tail's contribution; the bias of doing so is
``-(1/n) sum_{s >= L} mu_{i,s}``, estimated with its standard error by
:meth:`StrataStats.tail_contribution` whenever tail samples exist. Stated bound: the true tail
contribution lies within ``|estimate| + z stderr`` (``z = 3``).

**Allocation** (:func:`allocate`): optimum (Neyman) allocation with costs, per cycle of the plan,
``n_{i,h} ∝ w_h sigma_{i,h} / sqrt(c_h)`` (``c_h`` the cost of one marginal in stratum ``h``), from the
stratum standard deviations of a pilot (two-stage, Castro et al. 2017), pooled over points (default:
per-point variances by size are alike and the pooled ones are far less noisy) or per point. Every
sampled stratum keeps at least ``min_count`` samples per cycle. Pilot samples may be kept in the
estimate; the allocation then depends on them, an ``O(1/count)`` effect (not detected by the exact
enumeration tests, which keep them; drop the pilot's records to exclude it). Standard errors of strata with
few samples of a skewed marginal (accuracy) are themselves noisy: keep ``min_count`` cycles' worth (>= ~20
samples per stratum) before trusting them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..utility.features import FeatureProblem
from ..utility.incremental import IncrementalRegressor
from ..utility.metrics import Utility, UtilitySpec, resolve_utility
from ..utility.primal import MAX_UPDATE_ROWS, PrimalRegressor
from ..utility.problem import RegressionProblem
from ..values import ValuesResult
from .tmc import DEFAULT_BLOCK_SIZE, empty_utility, permutation_for

__all__ = [
    "StrataPlan",
    "StratifiedSample",
    "StrataStats",
    "geometric_edges",
    "uniform_plan",
    "allocate",
    "marginal_cost",
    "marginal_cost_primal",
    "stratified_sample",
    "run_stratified",
    "TAIL_TREATMENTS",
]

#: Key mixed into the seed of the within-stratum size draws (distinct from other streams of the same seed).
_SIZE_TAG = 0x5747
#: Points whose prediction changes are held at once (bounds memory to ``chunk * m * C`` floats).
_CHUNK = 512
#: How a plan treats the strata at or beyond the truncation length (see :func:`allocate`).
TAIL_TREATMENTS = ("sample", "thin", "zero")


def geometric_edges(n: int, ratio: float = 2.0, truncation: int | None = None) -> np.ndarray:
    """Stratum edges ``0, 1, 2, 4, ...`` (widths growing by ``ratio``) up to ``n``, with ``truncation`` as an edge.

    Returns:
        ``(H + 1,)`` int64, strictly increasing, ``edges[0] = 0`` and ``edges[-1] = n``.
    """
    if n < 1:
        raise ValueError(f"n: must be >= 1, got {n}")
    if not ratio > 1:
        raise ValueError(f"ratio: must be > 1, got {ratio}")
    edges = [0]
    width = 1.0
    while edges[-1] < n:
        edges.append(min(n, edges[-1] + max(1, int(round(width)))))
        width *= ratio
    if truncation is not None:
        if not 0 < truncation <= n:
            raise ValueError(f"truncation: must be in [1, {n}], got {truncation}")
        edges.append(int(truncation))
    return np.unique(np.asarray(edges, dtype=np.int64))


@dataclass(frozen=True, eq=False)
class StrataPlan:
    """Which stratum each sample id draws and which points take part.

    Attributes:
        edges: ``(H + 1,)`` int64 size edges; stratum ``h`` holds sizes ``[edges[h], edges[h+1])``.
        counts: ``(H,)`` (pooled) or ``(n, H)`` (per point) int64 samples per cycle; 0 = never sampled.
        n: number of training points.

    The cycle lists each stratum ``h`` ``max_j counts[j, h]`` times, interleaved by stride scheduling
    (occurrence ``r`` of ``h`` at virtual time ``(r + 1/2) / count_h``), so any run of consecutive
    sample ids is close to proportional; sample ``k`` is slot ``k mod len(cycle)``.
    """

    edges: np.ndarray
    counts: np.ndarray
    n: int

    def __post_init__(self) -> None:
        e = np.asarray(self.edges)
        if e.ndim != 1 or e.size < 2 or e.dtype.kind not in "iu" or e[0] != 0 or e[-1] != self.n \
                or np.any(np.diff(e) <= 0):
            raise ValueError(f"edges: must be strictly increasing integers from 0 to n = {self.n}, got {e}")
        c = np.asarray(self.counts)
        h = e.size - 1
        if c.dtype.kind not in "iu" or c.shape not in ((h,), (self.n, h)) or np.any(c < 0):
            raise ValueError(f"counts: expected non-negative integers of shape ({h},) or ({self.n}, {h}), "
                             f"got {c.dtype} {c.shape}")
        if c.max(initial=0) == 0:
            raise ValueError("counts: at least one stratum must be sampled")
        object.__setattr__(self, "edges", e.astype(np.int64))
        object.__setattr__(self, "counts", c.astype(np.int64))

    @property
    def strata(self) -> int:
        """Number of strata ``H``."""
        return int(self.edges.size - 1)

    @property
    def widths(self) -> np.ndarray:
        """``(H,)`` number of sizes in each stratum."""
        return np.diff(self.edges)

    @functools.cached_property
    def cycle(self) -> np.ndarray:
        """``(C, 2)`` int64 ``(stratum, occurrence)`` per slot."""
        mult = self.counts.max(axis=0) if self.counts.ndim == 2 else self.counts
        slots = [((r + 0.5) / m, h, r) for h, m in enumerate(mult.tolist()) for r in range(m)]
        slots.sort()
        return np.array([(h, r) for _, h, r in slots], dtype=np.int64)

    def slot(self, sample_id: int) -> tuple[int, int]:
        """``(stratum, occurrence)`` of sample ``sample_id``."""
        if sample_id < 0:
            raise ValueError(f"sample_id: must be >= 0, got {sample_id}")
        h, r = self.cycle[sample_id % len(self.cycle)]
        return int(h), int(r)

    def participants(self, stratum: int, occurrence: int) -> np.ndarray:
        """``(n,)`` bool: points that take part in a sample of ``(stratum, occurrence)``."""
        c = self.counts[..., stratum]
        return np.broadcast_to(c > occurrence, (self.n,)).copy()

    def describe(self) -> dict[str, Any]:
        """Plain-data form for a manifest (the plan is part of what sample ids mean)."""
        return {"edges": self.edges.tolist(), "counts": self.counts.tolist(), "n": self.n}

    @classmethod
    def from_description(cls, desc: dict[str, Any]) -> StrataPlan:
        """Inverse of :meth:`describe` (a resumed run rebuilds its plans from the manifest)."""
        return cls(np.asarray(desc["edges"], dtype=np.int64), np.asarray(desc["counts"], dtype=np.int64),
                   int(desc["n"]))


def uniform_plan(n: int, edges: np.ndarray | None = None, per_cycle: int = 1,
                 tail_from: int | None = None) -> StrataPlan:
    """Pilot plan: ``per_cycle`` samples of every stratum below ``tail_from`` (all strata if None) per cycle."""
    e = geometric_edges(n, truncation=tail_from) if edges is None else np.asarray(edges, dtype=np.int64)
    counts = np.full(e.size - 1, int(per_cycle), dtype=np.int64)
    if tail_from is not None:
        if tail_from not in e:
            raise ValueError(f"tail_from: {tail_from} must be one of the edges {e.tolist()}")
        counts[e[:-1] >= tail_from] = 0
    return StrataPlan(e, counts, n)


def marginal_cost(edges: np.ndarray, n: int, m: int, group: int = 1, overhead: float = 2.0e4) -> np.ndarray:
    """Model flops of one marginal in each stratum (dual solver).

    Per point: the branch solve ``(t g)^2`` and test rows ``2 m g^2 t`` at the mean size ``t`` of the
    stratum, plus its share of the walk to ``hi`` (``(hi g)^3 / 3`` over ``n`` points) and a fixed
    ``overhead`` (utility evaluation, calls).

    Returns:
        ``(H,)`` float64.
    """
    e = np.asarray(edges, dtype=np.float64)
    lo, hi = e[:-1], e[1:]
    t = 0.5 * (lo + hi - 1)
    g = float(group)
    return (t * g) ** 2 + 2 * m * g * g * t + (hi * g) ** 3 / (3.0 * n) + overhead


def marginal_cost_primal(edges: np.ndarray, n: int, m: int, dim: int, group: int = 1,
                         overhead: float = 2.0e4) -> np.ndarray:
    """Model flops of one marginal in each stratum (primal solver on ``dim`` features).

    Per point: the branch solve ``D² g`` and test rows ``2 m g² D``, independent of the size, plus its share of
    the walk to ``hi`` (a QR row update ``2 D² g`` per row, over ``n`` points; one size per sample, so two
    stops) and a fixed ``overhead``.

    Returns:
        ``(H,)`` float64.
    """
    hi = np.asarray(edges, dtype=np.float64)[1:]
    d, g = float(dim), float(group)
    return d * d * g + 2 * m * g * g * d + 2 * hi * g * d * d / n + overhead


def stratum_costs(problem: RegressionProblem, edges: np.ndarray) -> np.ndarray:
    """Model flops of one marginal per stratum for ``problem``'s solver (primal on features, dual on kernels)."""
    if isinstance(problem, FeatureProblem):
        return marginal_cost_primal(edges, problem.n, problem.m, problem.dim, problem.group)
    return marginal_cost(edges, problem.n, problem.m, problem.group)


def _round_to_total(share: np.ndarray, total: int, floor: np.ndarray) -> np.ndarray:
    """Integers ``>= floor`` near ``share * total`` (largest remainder on what is left above the floors)."""
    share = np.asarray(share, dtype=np.float64)
    left = max(total - int(floor.sum()), 0)
    if share.sum() <= 0 or left == 0:
        return floor.astype(np.int64)
    want = share / share.sum() * left
    base = np.floor(want).astype(np.int64)
    rest = left - int(base.sum())
    if rest > 0:
        base[np.argsort(-(want - base), kind="stable")[:rest]] += 1
    return floor.astype(np.int64) + base


def allocate(stats: StrataStats, cost: np.ndarray, *, per_cycle: int = 64, pooled: bool = True,
             tail_from: int | None = None, tail: str = "sample", min_count: int = 1) -> StrataPlan:
    """Optimum (Neyman, cost-weighted) allocation ``n_{i,h} ∝ w_h sigma_{i,h} / sqrt(c_h)`` from a pilot.

    Args:
        stats: pilot statistics (every sampled stratum needs ``>= 2`` samples per point for a variance).
        cost: ``(H,)`` cost of one marginal per stratum (any unit; e.g. :func:`marginal_cost` or seconds).
        per_cycle: samples per cycle (per point for a per-point plan), the rounding resolution.
        pooled: one allocation for all points from ``sigma_h^2 = mean_i sigma_{i,h}^2``; else per point.
        tail_from: truncation length ``L`` (an edge) or None.
        tail: ``"sample"``: the tail is allocated like any stratum; ``"thin"``: each tail stratum gets exactly
            ``min_count`` samples per cycle (enough to measure the bias of dropping it, with a standard
            error, at a small share of the cost); ``"zero"``: the tail gets no samples.
        min_count: samples per cycle that every sampled stratum keeps (so its variance stays estimable).

    Returns:
        A :class:`StrataPlan` on the same edges.
    """
    if tail not in TAIL_TREATMENTS:
        raise ValueError(f"tail: must be one of {list(TAIL_TREATMENTS)}, got {tail!r}")
    e = stats.edges
    h = e.size - 1
    c = np.asarray(cost, dtype=np.float64)
    if c.shape != (h,) or not np.all(np.isfinite(c) & (c > 0)):
        raise ValueError(f"cost: expected ({h},) positive finite numbers, got {c}")
    if min_count < 1 or per_cycle < h * min_count:
        raise ValueError(f"per_cycle/min_count: need min_count >= 1 and per_cycle >= strata * min_count "
                         f"= {h * min_count}, got {per_cycle} and {min_count}")
    sampled = np.ones(h, dtype=bool)  # gets >= min_count per cycle
    neyman = np.ones(h, dtype=bool)  # shares the rest by variance and cost
    if tail_from is not None:
        if tail_from not in e:
            raise ValueError(f"tail_from: {tail_from} must be one of the edges {e.tolist()}")
        body = e[:-1] < tail_from
        if tail != "sample":
            neyman = body
        if tail == "zero":
            sampled = body
    var = stats.variances_by_stratum()  # (n, H), nan where fewer than 2 samples
    if np.any(np.isnan(var[:, neyman])):
        raise ValueError("stats: every stratum allocated by variance needs >= 2 pilot samples per point")
    var = np.where(np.isnan(var), 0.0, var)
    w = np.diff(e).astype(np.float64)
    floor = np.where(sampled, min_count, 0)
    if pooled:
        score = np.where(neyman, w * np.sqrt(var.mean(axis=0)) / np.sqrt(c), 0.0)
        counts = _round_to_total(score, per_cycle, floor)
    else:
        score = np.where(neyman, w * np.sqrt(var) / np.sqrt(c), 0.0)
        counts = np.stack([_round_to_total(row, per_cycle, floor) for row in score])
    return StrataPlan(e, counts, stats.n)


@dataclass
class StratifiedSample:
    """One stratified sample (the streamed record).

    Attributes:
        sample_id: the sample's id.
        sizes: ``(n,)`` int64 coalition size of each point's marginal; ``-1`` = not taking part.
        marginals: ``(n,)`` float64, or ``(n, m)`` per test point; 0 where not taking part.
        walked: prefix length the permutation was walked to (cost indicator).
    """

    sample_id: int
    sizes: np.ndarray
    marginals: np.ndarray
    walked: int


def _target_sizes(plan: StrataPlan, seed: int, sample_id: int, pos: np.ndarray, shared: bool = False) -> np.ndarray:
    """Per point: its coalition size in the sample's stratum ``[lo, hi)`` (uniform), or -1 if not taking part.

    Independent sizes (a point whose position falls in the stratum keeps it: an ordinary marginal, no branch),
    or with ``shared`` one size for all points of the sample: each point's size is still uniform on the
    stratum and independent across samples (the same per-point estimator), and the walk stops twice instead
    of at every size of the stratum (what the primal solver needs: its requests are batched per stop)."""
    h, r = plan.slot(sample_id)
    lo, hi = int(plan.edges[h]), int(plan.edges[h + 1])
    rng = np.random.default_rng([int(seed), int(sample_id), _SIZE_TAG])
    if shared:
        t = np.full(plan.n, min(lo + int(np.floor(rng.random() * (hi - lo))), hi - 1), dtype=np.int64)
    else:
        u = rng.random(plan.n)
        t = lo + np.floor(u * (hi - lo)).astype(np.int64)
        t = np.where((pos >= lo) & (pos < hi), pos, np.minimum(t, hi - 1))
    return np.where(plan.participants(h, r), t, -1)


def _zero_absent_classes(preds: np.ndarray, problem: RegressionProblem, perm: np.ndarray, tops: np.ndarray,
                         removed: np.ndarray) -> None:
    """Set exactly to 0 the class columns of ``preds (b, m, C)`` that ``perm[:tops_b] - removed_b`` has no
    training point of (first-logit kernels with one-hot targets predict exactly 0 there, as the direct
    solve and the walk do; a subtraction leaves rounding, which would break accuracy's ties differently)."""
    c = problem.n_classes
    onehot = np.zeros((perm.size + 1, c), dtype=np.int64)
    onehot[1:][np.arange(perm.size), problem.y_train[perm]] = 1
    present = np.cumsum(onehot, axis=0)[tops]  # (b, C) class counts of perm[:top]
    present[np.arange(removed.size), problem.y_train[removed]] -= 1
    preds *= (present > 0)[:, None, :]


def stratified_sample(problem: RegressionProblem, plan: StrataPlan, seed: int, sample_id: int,
                      utility: UtilitySpec = "accuracy", *, per_test_point: bool = False,
                      block_size: int = DEFAULT_BLOCK_SIZE, shared_size: bool | None = None) -> StratifiedSample:
    """Sample ``sample_id``: one marginal per taking-part point at a size in the sample's stratum.

    Args:
        problem: the regression problem (``plan.n == problem.n``).
        plan: the allocation plan.
        seed: run seed (the permutation of sample ``k`` is ``permutation_for(n, seed, k)``).
        sample_id: ``>= 0``.
        utility: ``"accuracy"``, ``"neg_ce"``, ``"margin"``, a :class:`Utility` or a callable.
        per_test_point: ``(n, m)`` marginals.
        block_size: points per level-3 step of the kernel (dual) walk (does not change the result); the primal
            walk updates in blocks of :attr:`PrimalRegressor.block_size`.
        shared_size: one coalition size for all points of the sample (see :func:`_target_sizes`); default:
            on feature problems (the primal walk batches its requests per stop), not on kernels.

    Returns:
        A :class:`StratifiedSample`.
    """
    n = problem.n
    if plan.n != n:
        raise ValueError(f"plan: built for n = {plan.n}, the problem has n = {n}")
    util: Utility = resolve_utility(utility)
    y = problem.y_test
    perm = permutation_for(n, seed, sample_id)
    pos = np.empty(n, dtype=np.int64)
    pos[perm] = np.arange(n)
    if shared_size is None:
        shared_size = isinstance(problem, FeatureProblem)
    t = _target_sizes(plan, seed, sample_id, pos, shared_size)
    take = t >= 0
    ordinary = take & (pos == t)
    branch = take & (pos > t)
    loo = take & (pos < t)
    # prefix lengths whose predictions are needed: t (ordinary, branch) and t + 1 (ordinary, loo)
    need = np.unique(np.concatenate([t[ordinary | branch], t[ordinary | loo] + 1]))
    walk = int(need.max(initial=0))
    if isinstance(problem, FeatureProblem):
        saved, other = _walk_primal(problem, perm, t, branch, loo, need, walk, util, per_test_point)
    else:
        saved, other = _walk_dual(problem, perm, t, branch, loo, need, walk, util, per_test_point, block_size)
    prefix_u = util.batch(saved, y, per_test=per_test_point)  # (len(need),) or (len(need), m)
    if need.size and need[0] == 0:
        prefix_u[0] = empty_utility(problem, util, per_test_point)

    def prefix(sizes: np.ndarray) -> np.ndarray:
        return np.searchsorted(need, sizes)

    marg = np.zeros((n, problem.m) if per_test_point else n)
    j = np.flatnonzero(ordinary)
    marg[j] = prefix_u[prefix(t[j] + 1)] - prefix_u[prefix(t[j])]
    j = np.flatnonzero(branch)
    marg[j] = other[j] - prefix_u[prefix(t[j])]
    j = np.flatnonzero(loo)
    marg[j] = prefix_u[prefix(t[j] + 1)] - other[j]
    return StratifiedSample(int(sample_id), t, marg, walk)


def _walk_dual(problem: RegressionProblem, perm: np.ndarray, t: np.ndarray, branch: np.ndarray, loo: np.ndarray,
               need: np.ndarray, walk: int, util: Utility, per_test: bool, block_size: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Walk ``perm`` to ``walk`` (incremental Cholesky), then branch/remove points onto leading blocks.

    Returns ``saved (len(need), m, C)``: predictions of the prefixes of sizes ``need``, and ``other``:
    ``(n,)`` / ``(n, m)`` utility of ``S_j + j`` for branched points, of ``S_j`` for removed ones (0 elsewhere).
    """
    reg = IncrementalRegressor(problem)
    saved = np.zeros((need.size, problem.m, problem.n_classes))
    slot = {int(k): i for i, k in enumerate(need)}
    for start in range(0, walk, block_size):
        preds = reg.extend(perm[start:min(start + block_size, walk)])
        sizes_here = np.arange(start + 1, start + 1 + preds.shape[0])
        keep = np.isin(sizes_here, need)
        for k, p in zip(sizes_here[keep], preds[keep]):
            saved[slot[int(k)]] = p
    y = problem.y_test
    other = np.zeros((problem.n, problem.m) if per_test else problem.n)
    for pts, removing in ((np.flatnonzero(branch), False), (np.flatnonzero(loo), True)):
        for c0 in range(0, pts.size, _CHUNK):
            jj = pts[c0:c0 + _CHUNK]
            if removing:
                rest = saved[np.searchsorted(need, t[jj] + 1)] - reg.loo_updates(jj, t[jj] + 1)
                if problem.group == 1:
                    _zero_absent_classes(rest, problem, perm, t[jj] + 1, jj)
                other[jj] = util.batch(rest, y, per_test=per_test)
            else:
                new = saved[np.searchsorted(need, t[jj])] + reg.branch_updates(jj, t[jj])
                other[jj] = util.batch(new, y, per_test=per_test)
    return saved, other


def _walk_primal(problem: FeatureProblem, perm: np.ndarray, t: np.ndarray, branch: np.ndarray, loo: np.ndarray,
                 need: np.ndarray, walk: int, util: Utility, per_test: bool) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_walk_dual` on the feature-space (QR) regression: its factor is not nested by prefix, so the walk
    stops at every size some point is branched onto (``t_j``) or removed from (``t_j + 1``) and does those
    requests there (``D² g`` each, independent of the size; with a shared size, two stops). Same records up to
    rounding."""
    reg = PrimalRegressor(problem)
    saved = np.zeros((need.size, problem.m, problem.n_classes))
    y = problem.y_test
    other = np.zeros((problem.n, problem.m) if per_test else problem.n)
    bpts, lpts = np.flatnonzero(branch), np.flatnonzero(loo)
    at = np.concatenate([t[bpts], t[lpts] + 1])
    pts = np.concatenate([bpts, lpts])
    removing = np.concatenate([np.zeros(bpts.size, bool), np.ones(lpts.size, bool)])
    order = np.argsort(at, kind="stable")
    at, pts, removing = at[order], pts[order], removing[order]
    bounds = np.searchsorted(at, np.append(np.unique(at), walk + 1))

    def advance(to: int) -> None:
        while reg.size < to:
            start = reg.size
            preds = reg.extend(perm[start:min(to, start + MAX_UPDATE_ROWS)])
            sizes_here = np.arange(start + 1, start + 1 + preds.shape[0])
            hit = np.searchsorted(need, sizes_here)
            keep = (hit < need.size) & (need[np.minimum(hit, need.size - 1)] == sizes_here)
            saved[hit[keep]] = preds[keep]

    for a, b in zip(bounds[:-1], bounds[1:]):
        size = int(at[a])
        advance(size)
        base = saved[np.searchsorted(need, size)]
        for c0 in range(a, b, _CHUNK):
            sl = slice(c0, min(c0 + _CHUNK, b))
            for rem in (False, True):
                jj = pts[sl][removing[sl] == rem]
                if jj.size == 0:
                    continue
                if rem:
                    rest = base - reg.loo_updates(jj)
                    if problem.group == 1:
                        _zero_absent_classes(rest, problem, perm, np.full(jj.size, size), jj)
                    other[jj] = util.batch(rest, y, per_test=per_test)
                else:
                    other[jj] = util.batch(base + reg.branch_updates(jj), y, per_test=per_test)
    advance(walk)
    return saved, other


def run_stratified(problem: RegressionProblem, plan: StrataPlan, seed: int, sample_ids, utility: UtilitySpec =
                   "accuracy", *, per_test_point: bool = False) -> list[StratifiedSample]:
    """:func:`stratified_sample` for each id (a batch, as one task would run it)."""
    return [stratified_sample(problem, plan, seed, int(k), utility, per_test_point=per_test_point)
            for k in sample_ids]


def _welford(x: np.ndarray, groups: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts, means and M2 of rows ``x (P, ...)`` by group ``(P,)`` in ``[0, n_groups)`` (two-pass, sorted
    segments summed with ``np.add.reduceat``)."""
    cnt = np.bincount(groups, minlength=n_groups).astype(np.int64)
    flat = x.reshape(x.shape[0], -1)
    rest = x.shape[1:]
    sums = np.zeros((n_groups, flat.shape[1]))
    m2 = np.zeros_like(sums)
    if flat.shape[0]:
        order = np.argsort(groups, kind="stable")
        sorted_x, sorted_g = flat[order], groups[order]
        starts = np.flatnonzero(np.r_[True, sorted_g[1:] != sorted_g[:-1]])
        present = sorted_g[starts]
        sums[present] = np.add.reduceat(sorted_x, starts, axis=0)
        mean = sums / np.maximum(cnt, 1)[:, None]
        dev = sorted_x - mean[sorted_g]
        m2[present] = np.add.reduceat(dev * dev, starts, axis=0)
    else:
        mean = sums
    return cnt, mean.reshape((n_groups,) + rest), m2.reshape((n_groups,) + rest)


@dataclass
class StrataStats:
    """Per (point, stratum) sample counts, means and M2 of marginals; ``+`` merges exactly (Chan et al.).

    Attributes:
        edges: ``(H + 1,)`` stratum edges.
        counts: ``(n, H)`` int64.
        means: ``(n, H)`` or ``(n, H, m)``.
        m2: same shape as ``means``: sums of squared deviations.
        samples: number of records aggregated.
        info: free-form metadata.
    """

    edges: np.ndarray
    counts: np.ndarray
    means: np.ndarray
    m2: np.ndarray
    samples: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        """Number of training points."""
        return int(self.counts.shape[0])

    @classmethod
    def empty(cls, n: int, edges: np.ndarray, m: int | None = None) -> StrataStats:
        """No samples."""
        e = np.asarray(edges, dtype=np.int64)
        shape = (n, e.size - 1) + (() if m is None else (m,))
        return cls(e, np.zeros((n, e.size - 1), dtype=np.int64), np.zeros(shape), np.zeros(shape))

    @classmethod
    def from_records(cls, edges: np.ndarray, sizes: np.ndarray, marginals: np.ndarray) -> StrataStats:
        """Statistics of records ``sizes (P, n)`` and ``marginals (P, n)`` or ``(P, n, m)``."""
        e = np.asarray(edges, dtype=np.int64)
        sz = np.asarray(sizes, dtype=np.int64)
        mg = np.asarray(marginals, dtype=np.float64)
        if sz.ndim != 2 or mg.shape[:2] != sz.shape or mg.ndim not in (2, 3):
            raise ValueError(f"sizes/marginals: expected (P, n) and (P, n[, m]), got {sz.shape} and {mg.shape}")
        p, n = sz.shape
        h = e.size - 1
        if e[0] != 0 or e[-1] != n or np.any(np.diff(e) <= 0):
            raise ValueError(f"edges: must be strictly increasing from 0 to n = {n}, got {e.tolist()}")
        if np.any(sz >= e[-1]):
            raise ValueError(f"sizes: must be < n = {int(e[-1])} (or -1 for not taking part)")
        taken = sz >= 0
        point = np.broadcast_to(np.arange(n), sz.shape)[taken]
        stratum = np.searchsorted(e, sz[taken], side="right") - 1
        cnt, mean, m2 = _welford(mg[taken], point * h + stratum, n * h)
        rest = mg.shape[2:]
        return cls(e, cnt.reshape(n, h), mean.reshape((n, h) + rest), m2.reshape((n, h) + rest), samples=p)

    @classmethod
    def from_samples(cls, edges: np.ndarray, samples: list[StratifiedSample]) -> StrataStats:
        """Statistics of a list of :class:`StratifiedSample`."""
        if not samples:
            raise ValueError("samples: need at least one (use StrataStats.empty for none)")
        return cls.from_records(edges, np.stack([s.sizes for s in samples]), np.stack([s.marginals for s in samples]))

    def __add__(self, other: StrataStats) -> StrataStats:
        """Exact merge of two independent sets of records on the same edges."""
        if not isinstance(other, StrataStats):
            return NotImplemented
        if not np.array_equal(self.edges, other.edges) or self.means.shape != other.means.shape:
            raise ValueError("cannot merge stratified statistics with different edges or shapes")
        expand = (1,) * (self.means.ndim - 2)
        fa = self.counts.astype(np.float64).reshape(self.counts.shape + expand)
        fb = other.counts.astype(np.float64).reshape(other.counts.shape + expand)
        ft = np.maximum(fa + fb, 1.0)
        delta = other.means - self.means
        means = self.means + delta * (fb / ft)
        m2 = self.m2 + other.m2 + delta * delta * (fa * fb / ft)
        return StrataStats(self.edges, self.counts + other.counts, means, m2, self.samples + other.samples,
                           {**self.info, **other.info})

    def __radd__(self, other: object) -> StrataStats:
        if isinstance(other, int) and other == 0:
            return self
        return NotImplemented

    def variances_by_stratum(self) -> np.ndarray:
        """``(n, H)`` (or ``(n, H, m)``) unbiased variances; nan where fewer than 2 samples."""
        c = self.counts.astype(np.float64).reshape(self.counts.shape + (1,) * (self.means.ndim - 2))
        out = np.full(self.m2.shape, np.nan)
        np.divide(self.m2, c - 1.0, out=out, where=np.broadcast_to(c >= 2, self.m2.shape))
        if out.ndim == 3:  # allocation uses the mean over test points
            return out.mean(axis=2)
        return out

    def _parts(self, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Weighted sum of stratum means over ``mask (H,)``, its variance (inf where unestimable), counts."""
        n_pts = float(self.edges[-1])
        w = (np.diff(self.edges) / n_pts)[mask]
        cnt = self.counts[:, mask]
        expand = (1,) * (self.means.ndim - 2)
        c = cnt.astype(np.float64).reshape(cnt.shape + expand)
        value = np.tensordot(self.means[:, mask], w, axes=([1], [0])) if self.means.ndim == 2 else \
            np.einsum("ihm,h->im", self.means[:, mask], w)
        var_mean = np.full(self.m2[:, mask].shape, np.inf)
        ok = np.broadcast_to(c >= 2, var_mean.shape)
        np.divide(self.m2[:, mask], (c - 1.0) * c, out=var_mean, where=ok)
        wb = (w ** 2).reshape((1, -1) + expand)
        var = (var_mean * wb).sum(axis=1)
        return value, var, cnt.sum(axis=1)

    def tail_contribution(self, tail_from: int) -> tuple[np.ndarray, np.ndarray]:
        """Estimated ``(1/n) sum_{s >= L} mu_{i,s}`` (what ``tail="zero"`` drops) and its standard error.

        Returns:
            ``(estimate, stderr)``, each ``(n,)`` or ``(n, m)``; stderr is inf where a tail stratum has
            fewer than 2 samples.
        """
        if tail_from not in self.edges:
            raise ValueError(f"tail_from: {tail_from} must be one of the edges {self.edges.tolist()}")
        value, var, _ = self._parts(self.edges[:-1] >= tail_from)
        return value, np.sqrt(var)

    def values(self, tail_from: int | None = None, tail: str = "sample") -> ValuesResult:
        """Stratified Shapley values.

        Args:
            tail_from: truncation length ``L`` (an edge), or None for no tail.
            tail: ``"sample"``: every stratum counts (the tail from its samples); ``"zero"``: strata
                ``>= L`` contribute 0 (bias ``-tail_contribution``, reported in ``info``).

        Returns:
            A :class:`ValuesResult`: ``values``, ``stderr`` (inf if a counted stratum has < 2 samples for
            a point), ``counts`` (marginals per point), ``variances = stderr^2 * counts``. Merge the
            :class:`StrataStats`, not the results.
        """
        if tail not in ("sample", "zero"):
            raise ValueError(f"tail: must be 'sample' or 'zero', got {tail!r}")
        mask = np.ones(self.edges.size - 1, dtype=bool)
        info: dict[str, Any] = {"estimator": "stratified", "strata": int(mask.size), "samples": self.samples,
                                "tail": tail, "tail_from": tail_from}
        if tail_from is not None:
            if tail_from not in self.edges:
                raise ValueError(f"tail_from: {tail_from} must be one of the edges {self.edges.tolist()}")
            if tail == "zero":
                mask = self.edges[:-1] < tail_from
        value, var, cnt = self._parts(mask)
        if tail_from is not None and tail == "zero":
            est, se = self.tail_contribution(tail_from)
            finite = np.isfinite(se)
            info["tail_bias_mean_abs"] = float(np.abs(est[finite]).mean()) if finite.any() else float("nan")
            info["tail_bias_max_bound"] = float((np.abs(est) + 3 * se).max()) if finite.all() else float("inf")
        expand = (1,) * (value.ndim - 1)
        c = cnt.astype(np.float64).reshape(cnt.shape + expand)
        return ValuesResult(values=value, stderr=np.sqrt(var), counts=cnt.astype(np.int64),
                            variances=np.where(np.isfinite(var), var, 0.0) * c, info=info)
