"""The estimators behind ``shapley.estimator``: how samples are drawn, what a sample records, how records turn
into values. Pure compute; the engine (:mod:`freeshap_ray.distributed.shapley_job`) fans samples out on Ray,
streams their records to a sink and stops.

Every estimator draws sample ``k`` of seed ``s`` as a function of ``(s, k)`` (and, for ``stratified``, of the
allocation plan recorded with the run), so batching, workers and resumption never change a result. Records
merge exactly (:meth:`Stats.__add__`), so running estimates, split halves and resumed runs all use the same
statistics.

=============== ================================= ========================================= ==================
estimator       sample ``k``                      record                                    values
=============== ================================= ========================================= ==================
``tmc``         permutation ``k`` (``sampler``)    marginals along it                        sample means
``cv``          the same permutations              the same records                          control variates
``stratified``  one permutation walk, each point   coalition size and marginal of each       stratum means
                at a size in the sample's stratum  point
``msr_banzhaf`` a subset, each point in w.p. 1/2   the packed subset and its utility          in minus out means
=============== ================================= ========================================= ==================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..utility.problem import RegressionProblem
from ..values import ValuesResult
from .banzhaf import BanzhafStats, MSRSample, msr_sample
from .control_variate import CVStats, control_mean, sample_controls
from .samplers import sampler_permutation, samples_from_marginals
from .pilot import truncation_point
from .settings import ValuationSettings
from .stratified import StrataPlan, StrataStats, StratifiedSample, allocate, geometric_edges, stratified_sample, \
    stratum_costs, uniform_plan
from .tmc import PermutationResult, run_permutation

__all__ = ["ESTIMATORS", "Estimator", "Context", "estimator_for"]

#: Pilot samples per stratum before the stratified allocation (two: a variance per point and stratum).
PILOT_PER_STRATUM = 2
#: Samples per allocation cycle of the stratified plan (the rounding resolution of the allocation).
CYCLE = 64


@dataclass(frozen=True)
class Context:
    """What a task needs besides the problem and the settings (built on the driver, shipped with the task).

    Attributes:
        v_full: mean utility of the full training set (truncation reference).
        plans: ``stratified``: ``[(first sample id, plan), ...]`` in id order (the pilot, then the allocation).
        tail_from: ``stratified``: the truncation length (an edge) or None.
    """

    v_full: float
    plans: tuple[tuple[int, StrataPlan], ...] = ()
    tail_from: int | None = None

    def plan_of(self, sample_id: int) -> StrataPlan:
        plan = self.plans[0][1]
        for start, p in self.plans:
            if sample_id >= start:
                plan = p
        return plan


@dataclass
class Stats:
    """Mergeable statistics of some records of one estimator (``+``), and their values."""

    estimator: str
    inner: Any = None  # ValuesResult (tmc), CVStats (cv), StrataStats, BanzhafStats; None when empty
    info: dict[str, Any] = field(default_factory=dict)

    def __add__(self, other: Stats) -> Stats:
        if other.inner is None:
            return self
        if self.inner is None:
            return other
        return Stats(self.estimator, self.inner + other.inner, {**self.info, **other.info})


class Estimator:
    """Base class: one sample per id, plain sample means of permutation marginals (``tmc``)."""

    name = "tmc"
    family = "permutation"  # what the sink stores: "permutation" | "stratified" | "msr"

    def __init__(self, settings: ValuationSettings) -> None:
        self.settings = settings

    @property
    def unit(self) -> int:
        """Ids per independent sample (2 for antithetic pairs)."""
        return self.settings.per_sample

    def context(self, problem: RegressionProblem, v_full: float, stored: list | None = None,
                run: dict[str, Any] | None = None) -> Context:
        """The task context (``stored``/``run``: what a resumed run already holds)."""
        return Context(v_full)

    def run(self, problem: RegressionProblem, ids: list[int], ctx: Context) -> list:
        """Task body: the records of samples ``ids`` (pure compute)."""
        c = self.settings.config
        return [(pid, run_permutation(
            problem, sampler_permutation(problem.n, c.seed, pid, c.sampler), self.settings.utility,
            truncation_tol=self.settings.truncation_tol, truncation_patience=c.truncation_patience,
            v_full=ctx.v_full, per_test_point=c.per_test_point)) for pid in ids]

    def half(self, sample_id: int, ctx: Context) -> int:
        """Which of two independent halves a sample belongs to (split-half stability)."""
        return (sample_id // self.unit) % 2

    def stats(self, records: list, n: int, ctx: Context, per_test: bool = False) -> Stats:
        """Statistics of records over the mean utility (or per test point)."""
        if not records:
            return Stats(self.name)
        ids = np.array([pid for pid, _ in records], dtype=np.int64)
        marg = np.stack([_marginals(r, per_test) for _, r in records])
        return Stats(self.name, ValuesResult.from_marginals(samples_from_marginals(ids, marg,
                                                                                   self.settings.config.sampler)[1]))

    def values(self, stats: Stats, n: int, m: int | None = None) -> ValuesResult:
        return stats.inner if stats.inner is not None else ValuesResult.empty(n, m)


def _marginals(r: PermutationResult, per_test: bool) -> np.ndarray:
    return r.marginals if per_test or r.marginals.ndim == 1 else r.marginals.mean(axis=1)


class CVEstimator(Estimator):
    """``cv``: the permutation samples with cross-fitted control variates (:mod:`.control_variate`)."""

    name = "cv"

    def stats(self, records: list, n: int, ctx: Context, per_test: bool = False) -> Stats:
        if not records:
            return Stats(self.name)
        c = self.settings.config
        ids = np.array([pid for pid, _ in records], dtype=np.int64)
        sample_ids, samples = samples_from_marginals(ids, np.stack([_marginals(r, per_test) for _, r in records]),
                                                     c.sampler)
        if not sample_ids.size:
            return Stats(self.name)
        controls = sample_controls(n, c.seed, sample_ids, c.sampler)
        return Stats(self.name, CVStats.from_samples(sample_ids, samples, controls, control_mean(n)))

    def stats_from_samples(self, seeds: np.ndarray, ids: np.ndarray, marg: np.ndarray, n: int) -> Stats:
        """Statistics of point-ordered permutation marginals ``(P, n[, m])`` of permutations ``(seeds, ids)``."""
        c = self.settings.config
        total = Stats(self.name)
        for sd in np.unique(seeds):
            sel = seeds == sd
            sample_ids, samples = samples_from_marginals(ids[sel], marg[sel], c.sampler)
            if sample_ids.size:
                controls = sample_controls(n, int(sd), sample_ids, c.sampler)
                total = total + Stats(self.name, CVStats.from_samples(sample_ids, samples, controls, control_mean(n)))
        return total

    def values(self, stats: Stats, n: int, m: int | None = None) -> ValuesResult:
        return stats.inner.values() if stats.inner is not None else ValuesResult.empty(n, m)


class StratifiedEstimator(Estimator):
    """``stratified``: per-point stratified sampling by coalition size (:mod:`.stratified`).

    The first ``PILOT_PER_STRATUM`` cycles of a run follow a uniform plan; the rest follow the optimum
    (cost-weighted Neyman, pooled over points) allocation fitted to them. Both plans are recorded with the run,
    so a resumed run draws the same samples. With ``stratified_tail: zero`` sizes from the truncation point on
    (the median point where TMC's rule fires on a few pilot permutations) are never sampled and count 0;
    ``thin`` samples them at a fixed minimum rate only to measure that bias (reported, not added).
    """

    name = "stratified"
    family = "stratified"

    @property
    def unit(self) -> int:
        return 1

    def context(self, problem: RegressionProblem, v_full: float, stored: list | None = None,
                run: dict[str, Any] | None = None) -> Context:
        n = problem.n
        tail_from = run.get("tail_from") if run else None
        if run and run.get("plans"):
            plans = tuple((int(a), StrataPlan.from_description(d)) for a, d in run["plans"])
            return Context(v_full, plans, tail_from)
        if self._tail != "sample":
            tail_from = truncation_point(problem, self.settings, v_full)
        edges = geometric_edges(n, truncation=tail_from)
        pilot = uniform_plan(n, edges, per_cycle=1, tail_from=tail_from if self._tail == "zero" else None)
        return Context(v_full, ((0, pilot),), tail_from)

    @property
    def _tail(self) -> str:
        return self.settings.config.stratified_tail

    def pilot_size(self, ctx: Context) -> int:
        """Sample ids of the pilot (one uniform cycle per pilot round)."""
        return PILOT_PER_STRATUM * len(ctx.plans[0][1].cycle)

    def allocated(self, ctx: Context, pilot: Stats, problem: RegressionProblem) -> Context:
        """``ctx`` with the allocation fitted to the pilot statistics (plan from the end of the pilot on)."""
        plan = ctx.plans[0][1]
        cost = stratum_costs(problem, plan.edges)
        per_cycle = max(CYCLE, 2 * plan.strata)
        new = allocate(pilot.inner, cost, per_cycle=per_cycle, pooled=True, tail_from=ctx.tail_from, tail=self._tail)
        return Context(ctx.v_full, ((0, plan), (self.pilot_size(ctx), new)), ctx.tail_from)

    def run(self, problem: RegressionProblem, ids: list[int], ctx: Context) -> list:
        c = self.settings.config
        return [stratified_sample(problem, ctx.plan_of(k), c.seed, k, self.settings.utility,
                                  per_test_point=c.per_test_point) for k in ids]

    def half(self, sample_id: int, ctx: Context) -> int:
        """Whole plan cycles alternate between the halves, so each half samples every stratum alike."""
        start, plan = ctx.plans[0]
        for a, p in ctx.plans:
            if sample_id >= a:
                start, plan = a, p
        return ((sample_id - start) // len(plan.cycle)) % 2

    def stats(self, records: list[StratifiedSample], n: int, ctx: Context, per_test: bool = False) -> Stats:
        if not records:
            return Stats(self.name)
        marg = np.stack([r.marginals if per_test or r.marginals.ndim == 1 else r.marginals.mean(axis=1)
                         for r in records])
        sizes = np.stack([r.sizes for r in records])
        return Stats(self.name, StrataStats.from_records(ctx.plans[0][1].edges, sizes, marg),
                     {"tail_from": ctx.tail_from})

    def values(self, stats: Stats, n: int, m: int | None = None) -> ValuesResult:
        if stats.inner is None:
            return ValuesResult.empty(n, m)
        tail_from = stats.info.get("tail_from")  # thin: the tail is sampled only to measure what zero drops
        return stats.inner.values(tail_from=tail_from, tail="sample" if self._tail == "sample" else "zero")


class BanzhafEstimator(Estimator):
    """``msr_banzhaf``: MSR-Banzhaf values (:mod:`.banzhaf`), a different semivalue than Shapley."""

    name = "msr_banzhaf"
    family = "msr"

    @property
    def unit(self) -> int:
        return 1

    def run(self, problem: RegressionProblem, ids: list[int], ctx: Context) -> list:
        c = self.settings.config
        return [msr_sample(problem, c.seed, k, self.settings.utility, per_test_point=c.per_test_point) for k in ids]

    def stats(self, records: list[MSRSample], n: int, ctx: Context, per_test: bool = False) -> Stats:
        if not records:
            return Stats(self.name)
        util = np.stack([np.asarray(r.utility, dtype=np.float64) if per_test or np.ndim(r.utility) == 0
                         else np.mean(r.utility) for r in records])
        masks = np.stack([r.included(n) for r in records])
        return Stats(self.name, BanzhafStats.from_records(masks, util))

    def values(self, stats: Stats, n: int, m: int | None = None) -> ValuesResult:
        return stats.inner.values() if stats.inner is not None else ValuesResult.empty(n, m)


ESTIMATORS: dict[str, type[Estimator]] = {
    "tmc": Estimator, "cv": CVEstimator, "stratified": StratifiedEstimator, "msr_banzhaf": BanzhafEstimator,
}


def estimator_for(settings: ValuationSettings) -> Estimator:
    """The estimator ``shapley.estimator`` names, bound to ``settings``."""
    return ESTIMATORS[settings.config.estimator](settings)
