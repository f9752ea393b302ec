"""Ranking, wrong-label detection curves and data removal / selection curves.

* Ranking: ascending score (lowest value = most suspicious), ties broken by index; optionally the
  scores are first z-normalised within each (given) class, so that a class whose values are
  shifted as a whole does not fill the top of the list.
* Detection curve: after inspecting the ``k`` most suspicious points, the fraction of the flipped
  points found; ``k/n`` runs over 0..1. AUC is the trapezoid area under it (random ranking ≈ 0.5,
  perfect ``1 - f/2`` for a flipped fraction ``f``). Needs only the score vector and the flip mask.
* Removal / selection curves: the surrogate is refitted on the remaining points and evaluated on the
  test set. Every kept set is a prefix of a fixed order (``remove_high``: the kept points are the
  lowest-scored ones, a prefix of the ascending order; ``remove_low`` and ``keep_top``: prefixes of
  the descending order), so one exact incremental pass per order (the Shapley engine's
  :func:`~freeshap_ray.utility.make_regressor`: kernel Cholesky, or the feature-space QR for a
  :class:`~freeshap_ray.utility.FeatureProblem`, which never forms ``n×n``) gives the whole curve.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..utility import Problem, make_regressor
from ..utility.metrics import accuracy_per_test, neg_cross_entropy_per_test

__all__ = [
    "CURVES",
    "DetectionCurve",
    "curve_sizes",
    "detection_curve",
    "normalise_per_class",
    "prefix_utilities",
    "random_curves",
    "rank_order",
    "removal_curves",
]

CURVES = ("remove_high", "remove_low", "keep_top")

#: Points per incremental update along a curve's order (bounds the (b, m, C) prefix predictions).
_PREFIX_BLOCK = 256


def normalise_per_class(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Scores z-normalised within each label class (a class with zero spread is only centred)."""
    s = np.asarray(scores, dtype=np.float64)
    lab = np.asarray(labels)
    if s.shape != lab.shape or s.ndim != 1:
        raise ValueError(f"scores/labels: expected equal 1-D shapes, got {s.shape} and {lab.shape}")
    out = np.empty_like(s)
    for c in np.unique(lab):
        sel = lab == c
        v = s[sel]
        sd = v.std()
        out[sel] = (v - v.mean()) / (sd if sd > 0 else 1.0)
    return out


def rank_order(scores: np.ndarray, labels: np.ndarray | None = None, *, per_class_normalise: bool = False) -> np.ndarray:
    """Indices from most to least suspicious: ascending (normalised) score, ties by index.

    Returns:
        ``(n,)`` int64; ``order[0]`` is the most suspicious point.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"scores: expected a 1-D array, got shape {s.shape}")
    if per_class_normalise:
        if labels is None:
            raise ValueError("labels: required with per_class_normalise")
        s = normalise_per_class(s, labels)
    if np.isnan(s).any():
        raise ValueError(f"scores: {int(np.isnan(s).sum())} NaN entries (first at index {int(np.flatnonzero(np.isnan(s))[0])})")
    return np.argsort(s, kind="stable").astype(np.int64)


@dataclass
class DetectionCurve:
    """Fraction of flipped points found vs fraction inspected.

    Attributes:
        fraction_inspected: ``(n+1,)`` ``k/n`` for ``k = 0..n``.
        fraction_found: ``(n+1,)`` flipped among the first ``k`` / all flipped.
        auc: trapezoid area under the curve.
    """

    fraction_inspected: np.ndarray
    fraction_found: np.ndarray
    auc: float

    def recall_at(self, fraction: float) -> float:
        """Fraction of the flipped points among the first ``ceil(fraction·n)`` inspected."""
        n = self.fraction_inspected.size - 1
        k = min(n, int(np.ceil(fraction * n - 1e-9)))
        return float(self.fraction_found[k])

    def downsample(self, points: int = 1001) -> tuple[np.ndarray, np.ndarray]:
        """The curve at (at most) ``points`` evenly spaced inspection counts, exact values there."""
        n = self.fraction_inspected.size - 1
        if n + 1 <= points:
            return self.fraction_inspected, self.fraction_found
        k = np.unique(np.round(np.linspace(0, n, points)).astype(np.int64))
        return self.fraction_inspected[k], self.fraction_found[k]


def detection_curve(order: np.ndarray, flipped: np.ndarray) -> DetectionCurve:
    """Detection curve of inspecting points in ``order`` when ``flipped`` (bool, (n,)) marks the noise."""
    o = np.asarray(order, dtype=np.int64)
    f = np.asarray(flipped, dtype=bool)
    if o.shape != f.shape or o.ndim != 1:
        raise ValueError(f"order/flipped: expected equal 1-D shapes, got {o.shape} and {f.shape}")
    n, total = f.size, int(f.sum())
    if total == 0:
        raise ValueError("flipped: no flipped points; a detection curve needs at least one")
    x = np.arange(n + 1) / n
    y = np.concatenate([[0.0], np.cumsum(f[o]) / total])
    auc = float(np.sum((y[1:] + y[:-1]) * 0.5) / n)
    return DetectionCurve(x, y, auc)


def curve_sizes(n: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Fractions ``j/steps`` (j = 0..steps) and the matching point counts ``round(f·n)``."""
    fractions = np.linspace(0.0, 1.0, steps + 1)
    return fractions, np.round(fractions * n).astype(np.int64)


def prefix_utilities(problem: Problem, order: np.ndarray, sizes: np.ndarray) -> dict[int, tuple[float, float]]:
    """Test accuracy and negative cross-entropy of the surrogate fitted on ``order[:k]`` for each ``k`` in ``sizes``.

    One exact incremental pass over ``order[:max(sizes)]``; ``k = 0`` is the empty set
    (accuracy ``1/C``, neg. cross-entropy ``-log C``).

    Returns:
        ``{k: (accuracy, neg_ce)}``.
    """
    order = np.asarray(order, dtype=np.int64)
    wanted = sorted({int(k) for k in sizes})
    if wanted and (wanted[0] < 0 or wanted[-1] > order.size):
        raise ValueError(f"sizes: must be in [0, {order.size}]")
    out: dict[int, tuple[float, float]] = {}
    c = problem.n_classes
    reg = make_regressor(problem)
    done = 0
    for k in wanted:
        if k == 0:
            out[0] = (1.0 / c, -float(np.log(c)))
            continue
        while done < k:  # in blocks: extend returns every prefix's (m, C) predictions
            stop = min(k, done + _PREFIX_BLOCK)
            reg.extend(order[done:stop])
            done = stop
        pred = reg.predictions
        out[k] = (float(accuracy_per_test(pred, problem.y_test).mean()),
                  float(neg_cross_entropy_per_test(pred, problem.y_test).mean()))
    return out


def removal_curves(problem: Problem, scores: np.ndarray, steps: int, method: str) -> list[dict]:
    """Rows (``CURVES_SCHEMA``) of the ``remove_high``, ``remove_low`` and ``keep_top`` curves of ``scores``."""
    n = problem.n
    fractions, counts = curve_sizes(n, steps)
    asc = rank_order(scores)
    desc = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable").astype(np.int64)
    u_asc = prefix_utilities(problem, asc, n - counts)
    u_desc = prefix_utilities(problem, desc, np.concatenate([counts, n - counts]))
    rows = []
    for f, k in zip(fractions, counts):
        for curve, (size, table) in (("remove_high", (n - k, u_asc)), ("remove_low", (n - k, u_desc)),
                                     ("keep_top", (k, u_desc))):
            acc, nce = table[int(size)]
            rows.append(dict(method=method, curve=curve, fraction=float(f), n_train=int(size), accuracy=acc,
                             accuracy_std=0.0, neg_ce=nce))
    return rows


def random_curves(problem: Problem, steps: int, repeats: int, seed: int) -> list[dict]:
    """Random removal / selection (the reference line): mean and std over ``repeats`` random orders.

    A random order has no "high" or "low" end, so all three curves are the same kept-set sizes.
    """
    n = problem.n
    fractions, counts = curve_sizes(n, steps)
    sizes = sorted(set(counts.tolist()) | set((n - counts).tolist()))
    runs = []
    for r in range(repeats):
        order = np.random.default_rng([int(seed), 0xC0FE, r]).permutation(n).astype(np.int64)
        runs.append(prefix_utilities(problem, order, sizes))
    rows = []
    for f, k in zip(fractions, counts):
        for curve, size in (("remove_high", n - k), ("remove_low", n - k), ("keep_top", k)):
            acc = np.array([u[int(size)][0] for u in runs])
            nce = np.array([u[int(size)][1] for u in runs])
            rows.append(dict(method="random", curve=curve, fraction=float(f), n_train=int(size),
                             accuracy=float(acc.mean()), accuracy_std=float(acc.std()), neg_ce=float(nce.mean())))
    return rows
