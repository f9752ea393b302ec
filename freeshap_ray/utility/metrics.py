"""Utilities of kernel-regression predictions: accuracy, negative cross-entropy and the true-class margin.

Per-test functions accept predictions with leading batch axes: ``pred (..., m, C)`` and labels
``y (m,)`` give ``(..., m)``. The empty training set has a fixed value: accuracy ``1/C`` (a random
guess), negative cross-entropy ``-log C`` (softmax of all-zero logits) and margin 0 (all-zero logits).
"""

from __future__ import annotations

import math
from typing import Callable, Union

import numpy as np

__all__ = [
    "accuracy",
    "accuracy_per_test",
    "neg_cross_entropy",
    "neg_cross_entropy_per_test",
    "margin",
    "margin_per_test",
    "Utility",
    "BuiltinUtility",
    "CallableUtility",
    "UTILITIES",
    "UtilitySpec",
    "resolve_utility",
]


def _check(pred: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pred, dtype=np.float64)
    lab = np.asarray(y, dtype=np.int64)
    if p.ndim < 2 or lab.ndim != 1 or p.shape[-2] != lab.shape[0]:
        raise ValueError(f"pred/y: expected pred (..., m, C) and y (m,), got {p.shape} and {lab.shape}")
    if lab.size and (lab.min() < 0 or lab.max() >= p.shape[-1]):
        raise ValueError(f"y: labels must be in [0, {p.shape[-1] - 1}]")
    return p, lab


def _logsumexp_last(p: np.ndarray) -> np.ndarray:
    """Stable ``log(sum(exp(p), axis=-1))`` (max-shifted; same result as ``scipy.special.logsumexp``,
    without its per-call overhead, which dominates on the small arrays of a TMC step)."""
    top = p.max(axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    return np.log(np.exp(p - top).sum(axis=-1)) + top[..., 0]


def accuracy_per_test(pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    """1.0 where ``argmax(pred) == y`` (ties go to the lowest class), else 0.0.

    Args:
        pred: ``(..., m, C)`` predictions.
        y: ``(m,)`` labels.

    Returns:
        ``(..., m)`` float64.
    """
    p, lab = _check(pred, y)
    return (np.argmax(p, axis=-1) == lab).astype(np.float64)


def neg_cross_entropy_per_test(pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``log softmax(pred)[y]`` per test point (the negative cross-entropy).

    Args:
        pred: ``(..., m, C)`` logits.
        y: ``(m,)`` labels.

    Returns:
        ``(..., m)`` float64, each ``<= 0``.
    """
    p, lab = _check(pred, y)
    picked = np.take_along_axis(p, np.broadcast_to(lab[:, None], p.shape[:-1] + (1,)), axis=-1)[..., 0]
    return picked - _logsumexp_last(p)


def margin_per_test(pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Margin of the true class ``pred[y] - max_{c != y} pred[c]`` per test point (continuous; > 0 iff correct,
    up to ties).

    Args:
        pred: ``(..., m, C)`` predictions, ``C >= 2``.
        y: ``(m,)`` labels.

    Returns:
        ``(..., m)`` float64.
    """
    p, lab = _check(pred, y)
    if p.shape[-1] < 2:
        raise ValueError(f"pred: margin needs C >= 2 classes, got {p.shape[-1]}")
    idx = np.broadcast_to(lab[:, None], p.shape[:-1] + (1,))
    picked = np.take_along_axis(p, idx, axis=-1)[..., 0]
    others = p.copy()
    np.put_along_axis(others, idx, -np.inf, axis=-1)
    return picked - others.max(axis=-1)


def accuracy(pred: np.ndarray, y: np.ndarray) -> float:
    """Mean accuracy of ``pred (m, C)`` against ``y (m,)``."""
    return float(np.mean(accuracy_per_test(pred, y)))


def neg_cross_entropy(pred: np.ndarray, y: np.ndarray) -> float:
    """Mean negative cross-entropy of ``softmax(pred (m, C))`` against ``y (m,)``."""
    return float(np.mean(neg_cross_entropy_per_test(pred, y)))


def margin(pred: np.ndarray, y: np.ndarray) -> float:
    """Mean true-class margin of ``pred (m, C)`` against ``y (m,)``."""
    return float(np.mean(margin_per_test(pred, y)))


class Utility:
    """A subset utility computed from predictions ``(m, C)`` and test labels ``(m,)``."""

    name: str = "utility"

    def per_test(self, pred: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Per-test utilities ``(m,)``; ValueError when the utility is scalar-only."""
        raise NotImplementedError

    def __call__(self, pred: np.ndarray, y: np.ndarray) -> float:
        """Mean utility of ``pred (m, C)``."""
        return float(np.mean(self.per_test(pred, y)))

    def batch(self, preds: np.ndarray, y: np.ndarray, per_test: bool = False) -> np.ndarray:
        """Utilities of a stack of predictions.

        Args:
            preds: ``(b, m, C)`` predictions.
            y: ``(m,)`` labels.
            per_test: return per-test utilities.

        Returns:
            ``(b,)`` mean utilities, or ``(b, m)`` if ``per_test``.
        """
        if per_test:
            return np.stack([self.per_test(p, y) for p in preds]).reshape(len(preds), len(y))
        return np.array([self(p, y) for p in preds], dtype=np.float64)

    def empty_per_test(self, y: np.ndarray, n_classes: int) -> np.ndarray:
        """Per-test utility ``(m,)`` of the empty training set (all-zero predictions)."""
        return self.per_test(np.zeros((len(y), n_classes)), y)

    def empty_value(self, y: np.ndarray, n_classes: int) -> float:
        """Mean utility of the empty training set."""
        return self(np.zeros((len(y), n_classes)), y)


class BuiltinUtility(Utility):
    """A vectorised per-test metric with a closed-form empty-set value."""

    def __init__(self, name: str, per_test_fn: Callable[[np.ndarray, np.ndarray], np.ndarray],
                 empty_fn: Callable[[int], float]) -> None:
        self.name = name
        self._fn = per_test_fn
        self._empty = empty_fn

    def __repr__(self) -> str:
        return f"BuiltinUtility({self.name!r})"

    def per_test(self, pred: np.ndarray, y: np.ndarray) -> np.ndarray:
        return self._fn(pred, y)

    def batch(self, preds: np.ndarray, y: np.ndarray, per_test: bool = False) -> np.ndarray:
        vals = self._fn(preds, y)
        return vals if per_test else vals.mean(axis=-1)

    def empty_per_test(self, y: np.ndarray, n_classes: int) -> np.ndarray:
        return np.full(len(y), self._empty(n_classes), dtype=np.float64)

    def empty_value(self, y: np.ndarray, n_classes: int) -> float:
        return float(self._empty(n_classes))


class CallableUtility(Utility):
    """Wraps a user callable ``(pred (m, C), y (m,)) -> float`` or ``-> (m,)`` array.

    A callable returning an ``(m,)`` array is per-test capable and its mean is the utility; one
    returning a scalar supports only the mean mode. The empty-set value is ``fn(zeros, y)``.
    """

    def __init__(self, fn: Callable[[np.ndarray, np.ndarray], object]) -> None:
        self._fn = fn
        self.name = getattr(fn, "__name__", "custom")

    def __repr__(self) -> str:
        return f"CallableUtility({self.name!r})"

    def _eval(self, pred: np.ndarray, y: np.ndarray) -> np.ndarray:
        out = np.asarray(self._fn(pred, y), dtype=np.float64)
        if out.ndim not in (0, 1) or (out.ndim == 1 and out.shape != (len(y),)):
            raise ValueError(f"utility {self.name!r}: must return a float or an array of shape "
                             f"({len(y)},), got shape {out.shape}")
        return out

    def per_test(self, pred: np.ndarray, y: np.ndarray) -> np.ndarray:
        out = self._eval(pred, y)
        if out.ndim == 0:
            raise ValueError(f"utility {self.name!r}: per-test-point mode needs a callable returning an "
                             f"array of shape ({len(y)},), but it returned a scalar")
        return out

    def __call__(self, pred: np.ndarray, y: np.ndarray) -> float:
        return float(np.mean(self._eval(pred, y)))


UTILITIES: dict[str, Utility] = {
    "accuracy": BuiltinUtility("accuracy", accuracy_per_test, lambda c: 1.0 / c),
    "neg_ce": BuiltinUtility("neg_ce", neg_cross_entropy_per_test, lambda c: -math.log(c)),
    "margin": BuiltinUtility("margin", margin_per_test, lambda c: 0.0),
}

UtilitySpec = Union[str, Utility, Callable[[np.ndarray, np.ndarray], object]]


def resolve_utility(spec: UtilitySpec) -> Utility:
    """Turn a name in :data:`UTILITIES`, a :class:`Utility` or a callable into a :class:`Utility`."""
    if isinstance(spec, Utility):
        return spec
    if isinstance(spec, str):
        if spec not in UTILITIES:
            raise ValueError(f"utility: unknown name {spec!r} (known: {', '.join(sorted(UTILITIES))})")
        return UTILITIES[spec]
    if callable(spec):
        return CallableUtility(spec)
    raise ValueError(f"utility: expected a name ({', '.join(sorted(UTILITIES))}) or a callable, got {spec!r}")
