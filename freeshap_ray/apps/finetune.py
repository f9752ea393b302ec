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
Several subsets share one model load (:func:`finetune_many` restores the initial weights before each);
:mod:`freeshap_ray.distributed.finetune_job` spreads them over Ray tasks. Measured figures are in the README.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import CleanConfig, ModelConfig

__all__ = ["FINETUNE_CURVES", "FinetuneSettings", "Labelled", "finetune_accuracy", "finetune_many"]

log = logging.getLogger(__name__)

FINETUNE_CURVES = ("remove_high", "remove_low")


@dataclass(frozen=True)
class Labelled:
    """Texts with integer labels ``(n,)``."""

    texts: list[str]
    labels: np.ndarray


@dataclass(frozen=True)
class FinetuneSettings:
    """AdamW ``epochs`` × ``lr`` with batches of ``batch_size`` in a seeded order; ``threads``: torch intra-op
    threads (``None`` keeps torch's default; 1 is fastest for small models on busy machines)."""

    epochs: int = 3
    lr: float = 1e-4
    batch_size: int = 16
    seed: int = 0
    threads: int | None = 1

    @classmethod
    def of(cls, clean: CleanConfig) -> FinetuneSettings:
        """The ``clean.finetune_*`` settings (threads = the CPUs each fine-tuning task reserves)."""
        return cls(clean.finetune_epochs, clean.finetune_lr, clean.finetune_batch_size, clean.seed,
                   max(1, int(clean.finetune_num_cpus)))


def finetune_accuracy(model_dir: str | Path, model_cfg: ModelConfig, train: Labelled, test: Labelled,
                      settings: FinetuneSettings = FinetuneSettings()) -> dict[str, float]:
    """Fine-tune the prompt classifier on ``train`` and return its test (and train) accuracy.

    Returns:
        ``{"accuracy": test accuracy, "train_accuracy": accuracy on the training subset (nan if empty),
        "seconds": wall time, "steps": optimiser steps}``.
    """
    return finetune_many(model_dir, model_cfg, [train], test, settings)[0]


def finetune_many(model_dir: str | Path, model_cfg: ModelConfig, subsets: list[Labelled], test: Labelled,
                  settings: FinetuneSettings = FinetuneSettings()) -> list[dict[str, float]]:
    """:func:`finetune_accuracy` for several training subsets, loading the model once.

    The trainable parameters are restored to their initial values before each subset, so every
    result is that of an independent fine-tuning from the pretrained weights.
    """
    import torch

    from ..models import load_classifier, select_params

    if settings.threads:
        torch.set_num_threads(int(settings.threads))
    clf = load_classifier(model_dir, model_cfg)
    names = set(select_params(clf, model_cfg.params)) | {n for n, _ in clf.head.named_parameters(prefix="head")}
    params = {n: p for n, p in clf.named_parameters() if n in names}
    for n, p in clf.named_parameters():
        p.requires_grad_(n in names)
    initial = {n: p.detach().clone() for n, p in params.items()}
    clf.eval()  # no dropout: the kernel is the linearisation of this deterministic function
    epochs, lr, batch_size, seed = settings.epochs, settings.lr, settings.batch_size, settings.seed

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
    for sub in subsets:
        texts, labels = sub.texts, sub.labels
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
        results.append({"accuracy": acc(test.texts, np.asarray(test.labels)), "train_accuracy": acc(texts, np.asarray(labels)),
                        "seconds": time.perf_counter() - t0, "steps": steps})
    return results
