"""What users run FreeShap for: dataset cleaning (wrong-label suspects, removal / selection curves,
baselines under one interface) and the HTML report.

* :func:`run_clean` / ``freeshap-ray clean CONFIG``: suspects, curves, baselines, noise evaluation.
* :func:`write_report` / ``freeshap-ray report OUT_DIR``: self-contained ``report.html``.
* :class:`KernelSurrogate`: exact leave-one-out predictions and values, influence, from one factorisation;
  :class:`FeatureSurrogate` the same from features (``D×D``, nothing ``n×n``); :func:`fit_surrogate` picks.
"""

from __future__ import annotations

from .kernel_baselines import BASELINES, KernelSurrogate, baseline_scores, fit_surrogate, random_scores, tracin_values
from .cleaning import inject_noise, prepare_clean, run_clean, summary_lines, write_suspects
from .feature_surrogate import FeatureSurrogate
from .curves import (
    CURVES,
    DetectionCurve,
    detection_curve,
    normalise_per_class,
    prefix_utilities,
    random_curves,
    rank_order,
    removal_curves,
)
from .report import FIGURE_IDS, build_report, write_report

__all__ = [
    "BASELINES",
    "CURVES",
    "DetectionCurve",
    "FIGURE_IDS",
    "FeatureSurrogate",
    "KernelSurrogate",
    "baseline_scores",
    "build_report",
    "detection_curve",
    "fit_surrogate",
    "inject_noise",
    "normalise_per_class",
    "prefix_utilities",
    "random_curves",
    "random_scores",
    "rank_order",
    "removal_curves",
    "run_clean",
    "prepare_clean",
    "summary_lines",
    "tracin_values",
    "write_report",
    "write_suspects",
]
