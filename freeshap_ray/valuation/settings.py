"""How values are estimated: one frozen object, built once from the ``shapley`` config section, passed whole.

The config section (:class:`~freeshap_ray.config.ShapleyConfig`) is validated when it is built (from YAML,
``--set`` overrides, or the keywords of :func:`freeshap_ray.shapley`); nothing below re-checks it.
:class:`ValuationSettings` adds what a config cannot hold — the resolved utility, which the Python API
also accepts as a callable — and derives what the engine needs (effective truncation, samples per unit,
the stopping rule, the key that identifies a stream of stored marginals).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..config import ShapleyConfig
from ..utility.metrics import Utility, UtilitySpec, resolve_utility
from .convergence import StoppingRule
from .samplers import effective_tolerance, permutations_per_sample

__all__ = ["ValuationSettings"]


@dataclass(frozen=True)
class ValuationSettings:
    """Everything that decides how values are estimated (the game itself is the regression problem).

    Attributes:
        config: the validated ``shapley`` section: sampler, permutation and time budgets, truncation,
            stopping rule, seed, per-test-point values, resume, sign splits, task resources and placement.
        utility: the game's utility (``config.utility`` resolved, or the callable given to the API).
    """

    config: ShapleyConfig
    utility: Utility

    @classmethod
    def of(cls, config: ShapleyConfig | None = None, utility: UtilitySpec | None = None,
           **overrides: Any) -> ValuationSettings:
        """Settings of ``config`` (default: the default section) with ``overrides`` applied (and validated by
        the config); ``utility`` replaces ``config.utility`` (a name, a :class:`Utility` or a callable)."""
        cfg = config or ShapleyConfig()
        if overrides:
            cfg = dataclasses.replace(cfg, **overrides)
        return cls(cfg, resolve_utility(cfg.utility if utility is None else utility))

    @property
    def per_sample(self) -> int:
        """Permutations per independent sample: 2 for ``antithetic`` (a pair), else 1."""
        return permutations_per_sample(self.config.sampler)

    @property
    def truncation_tol(self) -> float:
        """The tolerance the sampler uses (0 for ``permutation``: never truncated)."""
        return effective_tolerance(self.config.sampler, self.config.truncation_tol)

    def stopping_rule(self) -> StoppingRule:
        """A fresh stopping rule (it keeps state between checks)."""
        c = self.config
        return StoppingRule(c.convergence, tol=c.convergence_tol, top_k=c.convergence_top_k,
                            patience=c.convergence_patience, min_samples=c.min_permutations)

    def run_key(self, problem_digest: str, n: int, m: int, lam: float) -> dict[str, Any]:
        """What a stream of marginals is marginals OF; a resumed run must match it exactly (seeds may differ)."""
        return {
            "problem": problem_digest,
            "n": n,
            "m": m,
            "lam": lam,
            "utility": self.utility.name,
            "sampler": self.config.sampler,
            "truncation_tol": self.truncation_tol,
            "truncation_patience": int(self.config.truncation_patience),
            "per_test_point": bool(self.config.per_test_point),
            # stratified and MSR samples are other records (tmc and cv share the permutations; the key is as it
            # was before estimators existed, so their stores resume)
            **({"estimator": self.config.estimator} if self.config.estimator in ("stratified", "msr_banzhaf")
               else {}),
            **({"stratified_tail": self.config.stratified_tail} if self.config.estimator == "stratified" else {}),
        }
