"""Removal curves re-evaluated by real fine-tuning, the fine-tunings spread over Ray tasks.

Each distinct kept subset is fine-tuned once (:func:`freeshap_ray.apps.finetune.finetune_many`); the subsets
are split over as many tasks as the cluster has room for at ``num_cpus`` each, and each task loads the model
once.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import ray

from ..apps.finetune import FINETUNE_CURVES, FinetuneSettings, Labelled, finetune_many
from ..config import ModelConfig

__all__ = ["finetune_curves"]

log = logging.getLogger(__name__)


def finetune_curves(model_dir: str | Path, model_cfg: ModelConfig, train: Labelled, test: Labelled,
                    scores: dict[str, np.ndarray], fractions: tuple[float, ...] | list[float],
                    settings: FinetuneSettings, num_cpus: float = 1.0) -> list[dict[str, Any]]:
    """``remove_high`` / ``remove_low`` curves of each method in ``scores`` re-evaluated by fine-tuning
    (Ray must be initialised).

    Returns:
        Rows of ``CURVES_SCHEMA`` with ``evaluator = "finetune"`` (``neg_ce`` is NaN).
    """
    n = len(train.texts)
    jobs: dict[tuple[int, ...], list[tuple[str, str, float]]] = {}
    for method, s in scores.items():
        desc = np.argsort(-np.asarray(s, dtype=np.float64), kind="stable")
        for f in fractions:
            k = int(round(f * n))
            for curve in FINETUNE_CURVES:
                kept = desc[k:] if curve == "remove_high" else desc[: n - k]
                jobs.setdefault(tuple(sorted(kept.tolist())), []).append((method, curve, float(f)))
    kept_sets = list(jobs)
    cpus = float(ray.available_resources().get("CPU", 0.0)) or float(ray.cluster_resources().get("CPU", 1.0))
    n_tasks = max(1, min(len(kept_sets), int(cpus // num_cpus) or 1))
    task = ray.remote(num_cpus=num_cpus)(finetune_many)
    test_ref = ray.put(Labelled(list(test.texts), np.asarray(test.labels)))
    labels = np.asarray(train.labels)
    groups = [kept_sets[i::n_tasks] for i in range(n_tasks)]
    log.info("clean: %d fine-tunings in %d Ray tasks", len(kept_sets), n_tasks)
    refs = []
    for group in groups:
        subsets = [Labelled([train.texts[i] for i in kept], labels[np.asarray(kept, dtype=np.int64)]) for kept in group]
        refs.append(task.remote(str(model_dir), model_cfg, subsets, test_ref, settings))
    rows = []
    for group, ref in zip(groups, refs):
        for kept, res in zip(group, ray.get(ref)):
            for method, curve, f in jobs[kept]:
                rows.append(dict(method=method, curve=curve, fraction=f, n_train=len(kept), accuracy=res["accuracy"],
                                 accuracy_std=0.0, neg_ce=float("nan"), evaluator="finetune"))
    return sorted(rows, key=lambda r: (r["method"], r["curve"], r["fraction"]))
