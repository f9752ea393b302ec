"""Kernel-regression utility: the problem, metrics, and exact incremental prediction."""

from __future__ import annotations

from .incremental import IncrementalRegressor
from .metrics import (
    UTILITIES,
    BuiltinUtility,
    CallableUtility,
    Utility,
    UtilitySpec,
    accuracy,
    accuracy_per_test,
    margin,
    margin_per_test,
    neg_cross_entropy,
    neg_cross_entropy_per_test,
    resolve_utility,
)
from .problem import RegressionProblem

__all__ = [
    "RegressionProblem",
    "IncrementalRegressor",
    "Utility",
    "BuiltinUtility",
    "CallableUtility",
    "UtilitySpec",
    "UTILITIES",
    "resolve_utility",
    "accuracy",
    "accuracy_per_test",
    "neg_cross_entropy",
    "neg_cross_entropy_per_test",
    "margin",
    "margin_per_test",
]
