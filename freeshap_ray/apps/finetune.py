"""Optional re-evaluation of removal curves with REAL fine-tuning (small models only).

The kernel surrogate is the linearisation of the prompt classifier around its pretrained weights;
this module checks a curve against the real thing: for a kept subset, the classifier (the run's
model, template and label words) is fine-tuned from its initial weights on exactly that subset —
the label-word head plus the parameters selected by ``model.params``, cross-entropy, AdamW, fixed
epochs, seeded batch order, no dropout (eval mode, as the kernel was taken) — and its test accuracy
is measured. An empty subset means no training (the zero-shot accuracy of the label-word head).

Cost: one fine-tuning per distinct kept subset — ``epochs × |subset|`` forward+backward passes
each, plus one test pass. With the default fractions (0, 0.1, …, 0.4), the ``remove_high`` and
``remove_low`` curves of FreeShap and one random order need 17 fine-tunings (fraction 0 is shared).
The subsets are spread over as many Ray tasks as the cluster has room for (``num_cpus`` each); each
task loads the model once and restores the initial weights before every subset. Measured figures
are in the README.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ModelConfig

__all__ = ["FINETUNE_CURVES", "finetune_accuracy", "finetune_curves", "finetune_many"]

log = logging.getLogger(__name__)

FINETUNE_CURVES = ("remove_high", "remove_low")


def finetune_accuracy(
    model_dir: str | Path,
    model_cfg: ModelConfig,
    train_texts: list[str],
    train_labels: np.ndarray,
    test_texts: list[str],
    test_labels: np.ndarray,
    *,
    epochs: int = 3,
    lr: float = 1e-4,
    batch_size: int = 16,
    seed: int = 0,
    threads: int | None = 1,
) -> dict[str, float]:
    """Fine-tune the prompt classifier on ``train_texts`` and return its test (and train) accuracy.

    Returns:
        ``{"accuracy": test accuracy, "train_accuracy": accuracy on the training subset (nan if empty),
        "seconds": wall time, "steps": optimiser steps}``.
    """
    return finetune_many(model_dir, model_cfg, [(list(train_texts), np.asarray(train_labels))], test_texts, test_labels,
                         epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, threads=threads)[0]


def finetune_many(
    model_dir: str | Path,
    model_cfg: ModelConfig,
    subsets: list[tuple[list[str], np.ndarray]],
    test_texts: list[str],
    test_labels: np.ndarray,
    *,
    epochs: int = 3,
    lr: float = 1e-4,
    batch_size: int = 16,
    seed: int = 0,
    threads: int | None = 1,
) -> list[dict[str, float]]:
    """:func:`finetune_accuracy` for several training subsets, loading the model once.

    The trainable parameters are restored to their initial values before each subset, so every
    result is that of an independent fine-tuning from the pretrained weights. ``threads``: torch
    intra-op threads (``None`` keeps torch's default; 1 is fastest for small models on busy machines).
    """
    import torch

    from ..models import load_classifier, select_params

    if threads:
        torch.set_num_threads(int(threads))
    clf = load_classifier(model_dir, model_cfg)
    names = set(select_params(clf, model_cfg.params)) | {n for n, _ in clf.head.named_parameters(prefix="head")}
    params = {n: p for n, p in clf.named_parameters() if n in names}
    for n, p in clf.named_parameters():
        p.requires_grad_(n in names)
    initial = {n: p.detach().clone() for n, p in params.items()}
    clf.eval()  # no dropout: the kernel is the linearisation of this deterministic function
    test_labels = np.asarray(test_labels)

    def acc(texts, labels) -> float:
        if not len(texts):
            return float("nan")
        hits = 0
        with torch.no_grad():
            for start in range(0, len(texts), 64):
                b = clf.encode(texts[start:start + 64])
                pred = clf(b.input_ids, b.attention_mask, b.read_pos).argmax(dim=1).numpy()
                hits += int((pred == np.asarray(labels[start:start + 64])).sum())
        return hits / len(texts)

    results = []
    for texts, labels in subsets:
        t0 = time.perf_counter()
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(initial[n])
        torch.manual_seed(seed)
        y = torch.tensor(np.asarray(labels, dtype=np.int64))
        steps = 0
        if len(texts):
            opt = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=0.0)
            rng = np.random.default_rng([int(seed), 0xF7])
            for _ in range(epochs):
                order = rng.permutation(len(texts))
                for start in range(0, len(order), batch_size):
                    idx = order[start:start + batch_size]
                    b = clf.encode([texts[i] for i in idx])
                    logits = clf(b.input_ids, b.attention_mask, b.read_pos)
                    loss = torch.nn.functional.cross_entropy(logits, y[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    steps += 1
        results.append({"accuracy": acc(test_texts, test_labels), "train_accuracy": acc(texts, np.asarray(labels)),
                        "seconds": time.perf_counter() - t0, "steps": steps})
    return results


def finetune_curves(
    model_dir: str | Path,
    model_cfg: ModelConfig,
    train_texts: list[str],
    train_labels: np.ndarray,
    test_texts: list[str],
    test_labels: np.ndarray,
    scores: dict[str, np.ndarray],
    fractions: tuple[float, ...] | list[float],
    *,
    epochs: int = 3,
    lr: float = 1e-4,
    batch_size: int = 16,
    seed: int = 0,
    num_cpus: float = 1.0,
) -> list[dict[str, Any]]:
    """``remove_high`` / ``remove_low`` curves of each method in ``scores`` re-evaluated by fine-tuning.

    Each distinct kept subset is fine-tuned once; the subsets are spread over as many Ray tasks as the
    cluster has room for at ``num_cpus`` each (each task loads the model once). Ray must be initialised.

    Returns:
        Rows of ``CURVES_SCHEMA`` with ``evaluator = "finetune"`` (``neg_ce`` is NaN).
    """
    import ray

    n = len(train_texts)
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
    test_texts_ref, test_labels_ref = ray.put(list(test_texts)), ray.put(np.asarray(test_labels))
    labels = np.asarray(train_labels)
    groups = [kept_sets[i::n_tasks] for i in range(n_tasks)]
    log.info("clean: %d fine-tunings in %d Ray tasks", len(kept_sets), n_tasks)
    refs = []
    for group in groups:
        subsets = [([train_texts[i] for i in kept], labels[np.asarray(kept, dtype=np.int64)]) for kept in group]
        refs.append(task.remote(str(model_dir), model_cfg, subsets, test_texts_ref, test_labels_ref, epochs=epochs,
                                lr=lr, batch_size=batch_size, seed=seed, threads=max(1, int(num_cpus))))
    rows = []
    for group, ref in zip(groups, refs):
        for kept, res in zip(group, ray.get(ref)):
            for method, curve, f in jobs[kept]:
                rows.append(dict(method=method, curve=curve, fraction=f, n_train=len(kept), accuracy=res["accuracy"],
                                 accuracy_std=0.0, neg_ce=float("nan"), evaluator="finetune"))
    return sorted(rows, key=lambda r: (r["method"], r["curve"], r["fraction"]))

