"""Solver choice: the kernel (dual, ``n×n``) or the feature-space (primal, ``D×D``) incremental regression.

Cost of one permutation walked to a prefix of ``k`` points, in float64 flops, with ``K = k·g`` kernel
rows, ``M = m·g`` test rows, ``q`` rows per block (``r``, the few target columns, is dropped):

* dual (:class:`IncrementalRegressor`): adding row ``s`` is a triangular solve against the ``s×s``
  factor (``s²``) and the test update ``A X`` (``2Ms``): ``K³/3 + M·K²``.
* primal (:class:`PrimalRegressor`): per row the Householder row update of ``R`` (``2D²``), ``Qᵀ``
  applied to ``[Z w]`` (``4DM``), the ``Q₂₂`` corner (``4qD``) and its RQ (``4q²/3``):
  ``K·(2D² + 4DM + 4qD + 4q²/3)``. Its blocked Householder kernels reach 30–60 % of the GEMM rate
  against the dual's 35–50 % (one thread, ``benchmarks/bench_primal.py``), hence :data:`PRIMAL_SLOWDOWN`.

Memory: dual ``2·(n·g)²`` (kernel and factor) plus ``n·g·M``; primal ``D² + D·M`` (plus the features).
"""

from __future__ import annotations

from typing import Literal, Union

from .features import FeatureProblem
from .incremental import IncrementalRegressor
from .primal import PrimalRegressor
from .problem import RegressionProblem

__all__ = ["Problem", "Solver", "make_regressor", "choose_solver", "solver_costs", "PRIMAL_SLOWDOWN"]

Problem = Union[RegressionProblem, FeatureProblem]
Solver = Literal["dual", "primal"]

#: Primal flops cost this many dual flops (Householder panels vs. triangular solves/GEMM, one thread).
PRIMAL_SLOWDOWN = 1.5


def make_regressor(problem: Problem) -> IncrementalRegressor | PrimalRegressor:
    """The exact incremental regressor of ``problem``: primal for features, dual for kernels."""
    if isinstance(problem, FeatureProblem):
        return PrimalRegressor(problem)
    if isinstance(problem, RegressionProblem):
        return IncrementalRegressor(problem)
    raise TypeError(f"problem: expected a RegressionProblem or FeatureProblem, got {type(problem).__name__}")


def solver_costs(n: int, m: int, D: int, g: int = 1, expected_prefix_len: int | None = None, *,
                 block_size: int = 64) -> dict[str, dict[str, float]]:
    """``{"dual"|"primal": {"flops": ..., "time": ..., "bytes": ...}}`` for one permutation.

    ``time`` is in dual-flop units (primal flops times :data:`PRIMAL_SLOWDOWN`); ``bytes`` is the
    solver's float64 working memory.
    """
    for name, v in (("n", n), ("m", m), ("g", g), ("block_size", block_size)):
        if int(v) != v or v < 1:
            raise ValueError(f"{name}: must be an integer >= 1, got {v!r}")
    if int(D) != D or D < 0:
        raise ValueError(f"D: must be an integer >= 0, got {D!r}")
    k = n if expected_prefix_len is None else min(int(expected_prefix_len), n)
    if k < 0:
        raise ValueError(f"expected_prefix_len: must be >= 0, got {expected_prefix_len!r}")
    K, M, N, q = float(k * g), float(m * g), float(n * g), float(block_size * g)
    dual = K**3 / 3 + M * K**2
    primal = K * (2 * D**2 + 4 * D * M + 4 * q * D + 4 * q**2 / 3)
    return {
        "dual": {"flops": dual, "time": dual, "bytes": 8 * (2 * N**2 + N * M)},
        "primal": {"flops": primal, "time": PRIMAL_SLOWDOWN * primal, "bytes": 8 * (float(D) ** 2 + D * M)},
    }


def choose_solver(n: int, m: int, D: int, g: int = 1, expected_prefix_len: int | None = None, *,
                  block_size: int = 64, memory_bytes: float | None = None) -> Solver:
    """``shapley.solver: auto``: the cheaper solver per permutation (``"dual"`` when ``D == 0``).

    Args:
        n, m: training and test points.
        D: feature dimension (``projection_dim``); 0 means no features (dual only).
        g: rows per point (1 first_logit, ``C`` full).
        expected_prefix_len: points a permutation adds before truncation (default ``n``).
        block_size: points per incremental block.
        memory_bytes: if given, a solver whose working memory exceeds it is not chosen (the smaller
            one is, when neither fits).
    """
    costs = solver_costs(n, m, D, g, expected_prefix_len, block_size=block_size)
    if D == 0:
        return "dual"
    if memory_bytes is not None:
        fits = [s for s in ("dual", "primal") if costs[s]["bytes"] <= memory_bytes]
        if len(fits) == 1:
            return fits[0]  # type: ignore[return-value]
        if not fits:
            return min(("dual", "primal"), key=lambda s: costs[s]["bytes"])  # type: ignore[return-value]
    return "primal" if costs["primal"]["time"] < costs["dual"]["time"] else "dual"
