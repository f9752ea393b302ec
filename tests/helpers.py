"""Test helpers: small datasets and explicit-Jacobian reference kernels."""

from __future__ import annotations

import numpy as np
import torch
from torch.func import functional_call, jacrev

from freeshap_ray.models import PromptClassifier

TEXTS = [
    "the movie was great",
    "bad acting and a boring plot",
    "i loved it",
    "the worst film ever made , awful",
    "a wonderful story with great music",
    "dull",
    "brilliant cast",
    "i hated the ending and the script was a mess",
    "fun and funny",
]

LABELS = ["positive", "negative", "positive", "negative", "positive", "negative", "positive", "negative", "positive"]

TEMPLATES = {"llama": "{text} sentiment :", "bert": "{text} it was {mask} .", "bert-mlm": "{text} it was {mask} ."}


def reference_jacobians(clf: PromptClassifier, texts: list[str], names: list[str]) -> torch.Tensor:
    """(B, C, P) float64 Jacobians, one UNPADDED example at a time through the batched forward (jacrev)."""
    params = {n: p.detach() for n, p in clf.named_parameters() if n in set(names)}
    rows = []
    for t in texts:
        b = clf.encode([t])
        jac = jacrev(lambda p: functional_call(clf, p, (b.input_ids, b.attention_mask, b.read_pos))[0])(params)
        rows.append(torch.cat([jac[n].reshape(clf.n_classes, -1) for n in names], dim=1).double())
    return torch.stack(rows)


def reference_kernel(ja: torch.Tensor, jb: torch.Tensor, kind: str) -> np.ndarray:
    """Explicit kernel from reference Jacobians: (Ba, Bb) first-logit or (Ba, Bb, C, C) full."""
    if kind == "first_logit":
        return (ja[:, 0] @ jb[:, 0].T).numpy()
    return torch.einsum("icp,jdp->ijcd", ja, jb).numpy()


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def write_csv(path, texts=TEXTS, labels=LABELS) -> str:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(zip(texts, labels))
    return str(path)


# `--set` overrides of a tiny end-to-end job (tiny random Llama, 9 texts); tests add data.train/output.
# TMC with a fixed permutation count (no early stop) so counts and resumes are exact; defaults get their own test.
TINY_JOB = (
    "model.path=tiny:llama",
    "model.template={text} sentiment :",
    "model.label_words=[bad, good]",
    "model.params=all",
    "data.min_confidence=null",
    "data.max_examples=null",
    "data.max_test_examples=null",
    "data.test_fraction=0.3",
    "kernel.block_size=3",
    "kernel.num_actors=1",
    "kernel.num_cpus_per_actor=0.5",
    "shapley.estimator=tmc",
    "shapley.utility=accuracy",
    "shapley.convergence=none",
    "shapley.n_permutations=12",
    "shapley.permutations_per_task=4",
    "shapley.num_cpus_per_task=0.5",
)


def job_args(csv, out, *extra: str, base: tuple[str, ...] | list[str] = TINY_JOB) -> list[str]:
    """CLI arguments of a tiny job (``base`` overrides) on ``csv`` writing to ``out`` (``extra`` win)."""
    sets = [f"data.train={csv}", f"output={out}", *base, *extra]
    return [x for s in sets for x in ("--set", s)] + ["--no-progress"]


class Interrupt(Exception):
    """Raised by :func:`interrupt_after` to stop a kernel job from its ``on_tile`` hook."""


def interrupt_after(n_tiles: int):
    """An ``on_tile`` hook that kills the job's actors and raises :class:`Interrupt` once ``n_tiles``
    tiles are written (as a killed driver would leave the output)."""

    def hook(actors, written):
        if written == n_tiles:
            import ray

            for a in actors:
                ray.kill(a, no_restart=True)
            raise Interrupt

    return hook


# ---- tolerances derived from error bounds (never from magnitudes observed on one machine) ----------------

EPS = float(np.finfo(np.float64).eps)


def solve_tol(problem, safety: float = 10.0) -> float:
    """Relative tolerance (to the predictions' magnitude) between two backward-stable float64 evaluations of
    any training subset's kernel-regression predictions on ``problem``: ``safety · rows · cond₂(K + λI) · eps``.

    That is the normwise forward-error bound of a backward-stable solve (Cholesky, triangular solves, in any
    blocking or summation order, any BLAS kernel or thread count); by Cauchy interlacing no principal
    submatrix ``K[S, S] + λI`` is worse conditioned than the whole, so one bound covers every subset.
    """
    eig = np.linalg.eigvalsh(problem.K)
    cond = (max(float(eig[-1]), 0.0) + problem.lam) / (max(float(eig[0]), 0.0) + problem.lam)
    return safety * problem.K.shape[0] * cond * EPS


def primal_tol(fp, safety: float = 10.0) -> float:
    """The same for the feature-space (primal) regression of a ``FeatureProblem``: ``safety · (N + D) · cond · eps``
    with the every-prefix bound ``cond = (λ_max(Φ̃ᵀΦ̃) + λ) / λ`` (orthogonal QR updates / Cholesky of the D×D
    normal matrix, backward stable)."""
    top = max(float(np.linalg.eigvalsh(fp.gram())[-1]), 0.0)
    return safety * (fp.phi_train.shape[0] + fp.dim) * (top + fp.lam) / fp.lam * EPS


def utility_tol(problem, pred_scale: float, safety: float = 10.0) -> float:
    """Absolute tolerance for utilities (and their differences, the marginals) computed from predictions of
    magnitude ``pred_scale`` that agree to :func:`solve_tol`: negative cross-entropy is 2-Lipschitz in the
    logits (max norm) and a marginal is a difference of two utilities, so 4·max|ΔF|. Accuracy is exact
    unless a prediction lies within that distance of a tie."""
    return 4.0 * solve_tol(problem, safety) * max(1.0, pred_scale)


def run_kernel_job(job, layout, **kw) -> dict:
    """A kernel job (``KernelInputs``) into ``layout``, finished as the kernel stage finishes it (manifest last);
    returns the job's statistics."""
    from freeshap_ray.distributed.kernel_job import compute_kernel
    from freeshap_ray.io import KernelStore

    store = KernelStore(layout)
    info = compute_kernel(job, store, **kw)
    store.finish(info)
    return info


def run_resumable(problem, store, *, utility="accuracy", progress=False, on_batch=None, discard_mismatched=False,
                  **shapley_keys):
    """The valuation engine on ``problem`` streaming to ``store``, with ``shapley.*`` keys as keywords (TMC with
    no early stop unless given: the tests count samples exactly)."""
    shapley_keys = {"estimator": "tmc", "convergence": "none", "max_seconds": None, **shapley_keys}
    from freeshap_ray.distributed.shapley_job import run_valuation
    from freeshap_ray.valuation.settings import ValuationSettings

    store.discard_mismatched = discard_mismatched
    settings = ValuationSettings.of(None, utility, **shapley_keys)
    return run_valuation(problem, settings, store, progress=progress, on_batch=on_batch)


def session_members(sid: int) -> list[int]:
    """Pids of the processes in session ``sid`` (a job started with ``start_new_session=True`` and everything it
    spawned: its embedded Ray's GCS, raylet, workers and agents)."""
    import os

    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    out.append(int(entry))
            except OSError:
                pass
    return out
