"""The one-point game of an explanation: one new text x is the whole test set.

The utility of a training subset S is read from the kernel regression's prediction F_S(x) (C,) for the
explained class y:

* ``prob``: softmax(F_S(x))[y]; empty set 1/C (F = 0);
* ``margin``: F_S(x)[y] - max_{c != y} F_S(x)[c]; empty set 0.

Both are per-test utilities (:class:`~freeshap_ray.utility.metrics.BuiltinUtility`), so the engine's pieces
apply unchanged to a :class:`~freeshap_ray.utility.RegressionProblem` with m = 1: ``run_permutation``,
:func:`~freeshap_ray.valuation.exact.exact_shapley`, the sinks and :func:`~freeshap_ray.valuation.aggregate.aggregate`.

Efficiency: along an untruncated permutation the marginals telescope to U(N) - U(∅) exactly, so every
sample, and therefore the estimate, sums to it (up to float rounding). A permutation truncated at
position t sums to U(prefix_t) - U(∅) with |U(prefix_t) - U(N)| < tol·|U(N)|, so with truncation the sum
is within tol·|U(N)| of U(N) - U(∅).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ..utility.metrics import BuiltinUtility, _check, _logsumexp_last
from ..utility.features import FeatureProblem
from ..utility.solver import Problem
from .estimators import Context, Estimator
from .aggregate import Estimate, aggregate
from .samplers import sampler_permutation
from .settings import ValuationSettings
from .sinks import MemorySink
from .tmc import full_utility, run_permutation

__all__ = [
    "EXPLAIN_UTILITIES",
    "label_margin_per_test",
    "label_probability_per_test",
    "one_point_values",
    "softmax",
    "target_labels",
    "one_point_problem",
]


def softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``scores (..., C)`` (max-shifted)."""
    s = np.asarray(scores, dtype=np.float64)
    return np.exp(s - _logsumexp_last(s)[..., None])


def label_probability_per_test(pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``softmax(pred)[y]`` per test point: ``pred (..., m, C)``, ``y (m,)`` → ``(..., m)``."""
    p, lab = _check(pred, y)
    picked = np.take_along_axis(p, np.broadcast_to(lab[:, None], p.shape[:-1] + (1,)), axis=-1)[..., 0]
    return np.exp(picked - _logsumexp_last(p))


def label_margin_per_test(pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``pred[y] - max_{c != y} pred[c]`` per test point: ``(..., m, C)``, ``(m,)`` → ``(..., m)``."""
    p, lab = _check(pred, y)
    idx = np.broadcast_to(lab[:, None], p.shape[:-1] + (1,))
    own = np.take_along_axis(p, idx, axis=-1)[..., 0]
    other = p.copy()
    np.put_along_axis(other, idx, -np.inf, axis=-1)
    return own - other.max(axis=-1)


#: The utilities of the one-point game, by the names ``explain.utility`` accepts.
EXPLAIN_UTILITIES: dict[str, BuiltinUtility] = {
    "prob": BuiltinUtility("prob", label_probability_per_test, lambda c: 1.0 / c),
    "margin": BuiltinUtility("margin", label_margin_per_test, lambda c: 0.0),
}


def target_labels(scores: np.ndarray, label: int | None) -> np.ndarray:
    """The class each text's game is about: ``label`` for every text, or (``None``) the predicted class.

    Args:
        scores: ``(m, C)`` surrogate predictions F_N(x) on the whole training set.
        label: a class index, or ``None`` for ``argmax`` (ties go to the lowest class, as ``accuracy``).

    Returns:
        ``(m,)`` int64.
    """
    s = np.asarray(scores, dtype=np.float64)
    if label is None:
        return np.argmax(s, axis=-1).astype(np.int64)
    if not 0 <= int(label) < s.shape[-1]:
        raise ValueError(f"label: must be a class index in [0, {s.shape[-1] - 1}], got {label}")
    return np.full(s.shape[0], int(label), dtype=np.int64)


def one_point_problem(problem: Problem, i: int) -> Problem:
    """The same regression with test point ``i`` alone as its test set (m = 1; no copy of the kernels or of the
    training features)."""
    if not 0 <= i < problem.m:
        raise ValueError(f"i: must be a test index in [0, {problem.m - 1}], got {i}")
    rows = slice(i * problem.group, (i + 1) * problem.group)
    if isinstance(problem, FeatureProblem):
        return dataclasses.replace(problem, phi_test=problem.phi_test[rows], y_test=problem.y_test[i:i + 1])
    return dataclasses.replace(problem, KT=problem.KT[rows], y_test=problem.y_test[i:i + 1])


def one_point_values(problem: Problem, settings: ValuationSettings) -> Estimate:
    """Values of the game of ``problem`` (m = 1) from ``settings.config.n_permutations`` permutations, in this
    process: the same permutations, truncation rule and aggregation as the Ray engine
    (:func:`freeshap_ray.distributed.shapley_job.run_valuation` with a :class:`MemorySink`), so the same
    seed gives the same values. BLAS runs on one thread, as in the engine's tasks: the updates are small, and
    on a busy machine OpenBLAS's waiting threads made a loop over the permutations ~5x slower.

    Returns:
        An :class:`Estimate` whose ``values`` are ``(n,)`` (``info``: ``v_full``, ``v_empty``, counts).
    """
    from threadpoolctl import threadpool_limits

    c = settings.config
    if problem.m != 1:
        raise ValueError(f"problem: expected one test point, got m = {problem.m}")
    n_ids = math.ceil(c.n_permutations / settings.per_sample) * settings.per_sample
    with threadpool_limits(limits=1):
        v_full = float(np.mean(full_utility(problem, settings.utility)))
        batch = [(pid, run_permutation(
            problem, sampler_permutation(problem.n, c.seed, pid, c.sampler), settings.utility,
            truncation_tol=settings.truncation_tol, truncation_patience=c.truncation_patience, v_full=v_full))
            for pid in range(n_ids)]
    sink = MemorySink()
    sink.write(batch, c.seed, c.sampler, False)
    one = dataclasses.replace(settings, config=dataclasses.replace(c, per_test_point=False, estimator="tmc"))
    est = aggregate(sink, problem.n, 1, Estimator(one), Context(v_full), sign_splits=c.sign_splits)
    est.info.update(v_full=v_full, v_empty=float(settings.utility.empty_value(problem.y_test, problem.n_classes)))
    return est
