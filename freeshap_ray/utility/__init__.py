"""Kernel-regression utility: the problems (kernels or features), metrics, and exact incremental prediction."""

from __future__ import annotations

from .features import FeatureProblem
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
from .primal import PrimalRegressor
from .problem import RegressionProblem
from .solver import Problem, choose_solver, make_regressor, solver_costs

__all__ = [
    "RegressionProblem",
    "FeatureProblem",
    "Problem",
    "IncrementalRegressor",
    "PrimalRegressor",
    "make_regressor",
    "choose_solver",
    "solver_costs",
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
