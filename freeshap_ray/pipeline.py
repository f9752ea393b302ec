"""The FreeShap job: data → model → kernel → Shapley values, each stage resumable from its outputs.

Input is validated (config, data, model, template, label words, existing outputs) before anything is
written, so bad input leaves no output directory behind. Every artifact is written atomically.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from .config import JobConfig, config_to_dict
from .data import Splits, load_splits
from .grads import param_sizes
from .errors import OutputError
from .io import (
    Layout,
    MarginalsStore,
    load_kernel,
    read_examples,
    remove_path,
    write_duplicates,
    write_examples,
    write_json_atomic,
    write_kernel_manifest,
    write_values,
)
from .io.remote import display
from .kernel import condition_number
from .models import load_classifier, resolve_model_path, select_params
from .utility import RegressionProblem

__all__ = ["prepare_kernel_stage", "run_kernel_stage", "prepare_shapley_stage", "run_shapley_stage", "run_job",
           "versions"]

log = logging.getLogger(__name__)


def versions() -> dict[str, str]:
    """Versions of Python and the packages a result depends on."""
    out = {"python": platform.python_version()}
    for pkg in ("freeshap_ray", "torch", "transformers", "ray", "numpy", "scipy", "pyarrow", "datasets"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _update_manifest(layout: Layout, cfg: JobConfig, stage: str, info: dict[str, Any]) -> None:
    manifest: dict[str, Any] = {}
    if layout.manifest.is_file():
        try:
            manifest = json.loads(layout.manifest.read_text())
        except (OSError, ValueError) as err:  # a summary of the stages: rebuilt rather than fatal
            log.warning("output: %s is unreadable (%s); writing a fresh run manifest", layout.manifest, err)
        if not isinstance(manifest, dict):
            manifest = {}
    manifest.update(config=config_to_dict(cfg), versions=versions())
    manifest.setdefault("stages", {})[stage] = {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info}
    write_json_atomic(manifest, layout.manifest)


def _check_output_dir(output: str) -> None:
    """``output`` must be a directory (or not exist yet) under a writable parent; checked before any work."""
    if "://" in output:
        return  # a filesystem URI: checked by its filesystem when written
    root = Path(output).expanduser()
    if root.exists() and not root.is_dir():
        raise OutputError(f"output: {str(root)!r} exists and is not a directory")
    parent = root
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"output: {str(parent)!r} (a parent of {str(root)!r}) is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"output: {str(parent)!r} is not writable")


def _guard(paths: list[Path], overwrite: bool, what: str) -> None:
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        raise OutputError(f"output: {display(existing[0])} exists ({what}); pass --overwrite to replace it")


# --------------------------------------------------------------------------------------------------
# Kernel stage


class KernelStage:
    """Validated inputs of the kernel stage (nothing written yet).

    Attributes:
        param_names, param_sizes: the selected parameters (model order) and their sizes.
        model_info: label-token ids and model kind, for the manifest.
        resume: finished tiles of an interrupted run with the same plan are kept.
        finished: a finished kernel of the same plan is already there and is reused as is.
    """

    def __init__(self, cfg: JobConfig, splits: Splits, model_dir: Path, param_names: list[str],
                 param_sizes: list[int], model_info: dict[str, Any], resume: bool, finished: bool = False):
        self.cfg, self.splits, self.model_dir = cfg, splits, model_dir
        self.param_names, self.param_sizes, self.model_info, self.resume = param_names, param_sizes, model_info, resume
        self.finished = finished
        self.layout = Layout.of(cfg.output)


def prepare_kernel_stage(cfg: JobConfig, *, overwrite: bool = False, train=None, test=None) -> KernelStage:
    """Load data, resolve the model and check template/label words; raise before writing anything.

    A finished kernel of the same plan under ``cfg.output`` is reused, an unfinished one is resumed
    (finished tiles are kept); one of a different plan is an error unless ``overwrite``.
    """
    from .distributed.kernel_job import check_resumable, plan_signature

    _check_output_dir(cfg.output)
    layout = Layout.of(cfg.output)
    _guard([layout.values], overwrite, "finished values")
    splits = load_splits(cfg.data, train=train, test=test)
    model_dir = resolve_model_path(cfg.model.path, cache_dir=cfg.model.cache_dir, seed=cfg.model.seed)
    clf = load_classifier(model_dir, cfg.model)  # checks template, label words, parameter selection
    names = select_params(clf, cfg.model.params)
    sizes = param_sizes(clf, names)
    info = {"model_kind": clf.kind, "label_token_ids": clf.label_token_ids}
    del clf
    signature = plan_signature(list(splits.train.texts), list(splits.test.texts), cfg.model, cfg.kernel)
    if layout.kernel_manifest.is_file() and not overwrite:
        try:
            old = json.loads(layout.kernel_manifest.read_text()).get("signature")
        except (OSError, ValueError, AttributeError) as err:
            raise OutputError(f"output: {layout.kernel_manifest} is unreadable ({err}); pass --overwrite to "
                              "recompute the kernel") from err
        if old != signature:
            raise OutputError(f"output: {layout.kernel_manifest} is a finished kernel of a different config/data; "
                              "pass --overwrite to replace it")
        return KernelStage(cfg, splits, model_dir, names, sizes, info, resume=True, finished=True)
    resume = check_resumable(layout, signature, overwrite)
    return KernelStage(cfg, splits, model_dir, names, sizes, info, resume)


def run_kernel_stage(stage: KernelStage, *, progress: bool = True, on_tile=None) -> dict[str, Any]:
    """Compute and write the kernel (Ray must be initialised). Returns the kernel manifest.

    Args:
        on_tile: optional hook ``(actors, n_written)`` after each tile (tests use it to inject faults).
    """
    from .distributed.kernel_job import compute_kernel

    cfg, splits, layout = stage.cfg, stage.splits, stage.layout
    if stage.finished:
        return {**json.loads(layout.kernel_manifest.read_text()), "reused": True}
    stale = [layout.kernel_manifest, layout.marginals_dir.parent, layout.values, layout.values_per_test,
             layout.duplicates]
    if not stage.resume:
        stale.append(layout.kernel_dir)
    for sub in stale:
        remove_path(sub)  # also under an output URI
    for split, ex in (("train", splits.train), ("test", splits.test)):
        write_examples(layout, split, ex.texts, ex.labels, ex.ids, splits.label_names)
    if splits.duplicates is not None:
        write_duplicates(layout, splits.duplicates, splits.label_names)
    result = compute_kernel(
        list(splits.train.texts), list(splits.test.texts), stage.model_dir, cfg.model, cfg.kernel, layout,
        param_names=stage.param_names, param_sizes=stage.param_sizes, resume=stage.resume,
        progress=progress, on_tile=on_tile,
    )
    info = {**result.info, **stage.model_info}
    kernel = load_kernel(layout.root)
    k = kernel["train_train"] if cfg.kernel.kind == "first_logit" else kernel["train_train_full"][..., 0, 0]
    info["condition_number_first_logit"] = condition_number(k)
    info["diag_mean"] = float(np.diagonal(k).mean())
    write_kernel_manifest(layout, info)
    data_info = {"data": splits.source, "model_dir": str(stage.model_dir)}
    if splits.duplicates is not None:
        data_info["duplicates"] = splits.duplicates.counts()
    _update_manifest(layout, cfg, "kernel", {**info, **data_info})
    return info


# --------------------------------------------------------------------------------------------------
# Shapley stage


def load_problem(layout: Layout, cfg: JobConfig) -> tuple[RegressionProblem, Any]:
    """Regression problem from a finished kernel stage; also returns the train examples table."""
    train = read_examples(layout, "train")
    test = read_examples(layout, "test")
    kernel = load_kernel(layout.root)
    if kernel["kind"] == "first_logit":
        k_tt, k_st = kernel["train_train"], kernel["test_train"]
    else:
        k_tt, k_st = kernel["train_train_full"], kernel["test_train_full"]
    problem = RegressionProblem.from_kernels(
        k_tt, k_st, train.column("label").to_numpy(), test.column("label").to_numpy(),
        n_classes=kernel["manifest"]["n_classes"], lam=cfg.shapley.lam, kernel_divisor=cfg.shapley.kernel_divisor,
    )
    return problem, train


def prepare_shapley_stage(cfg: JobConfig, *, overwrite: bool = False) -> tuple[RegressionProblem, Any]:
    """Check the output and load + validate the stored kernel and examples (no Ray, nothing written).

    Raises:
        OutputError: finished values without ``overwrite``, or a missing/unreadable kernel.
        KernelError: a kernel tile with nan/inf entries, a bad shape or an asymmetric diagonal block
            (the message names the tile file), or a kernel rejected by the regression problem.
    """
    _check_output_dir(cfg.output)
    layout = Layout.of(cfg.output)
    _guard([layout.values], overwrite, "finished Shapley values")
    return load_problem(layout, cfg)


def run_shapley_stage(cfg: JobConfig, *, overwrite: bool = False, progress: bool = True,
                      on_batch=None, inputs: tuple[RegressionProblem, Any] | None = None) -> dict[str, Any]:
    """Shapley values from the kernel under ``cfg.output``; streams marginals, writes ``values.parquet``.

    Every finished batch of permutations is written to ``OUT/shapley/marginals`` at once, so a killed
    run loses at most the batches in flight. With ``shapley.resume`` (default) a rerun reuses the
    stored permutations (checked against ``OUT/shapley/run.json``), runs only the missing ones up to
    ``shapley.n_permutations`` and recomputes the values from all of them; stored marginals made
    with different settings are an error unless ``overwrite`` (then they are discarded).

    Args:
        on_batch: optional hook called after each batch is written (tests use it to interrupt a run).
        inputs: what :func:`prepare_shapley_stage` returned (the CLI validates before Ray starts).
    """
    from .distributed.shapley_job import run_resumable
    from .valuation import StoppingRule

    layout = Layout.of(cfg.output)
    problem, train = inputs if inputs is not None else prepare_shapley_stage(cfg, overwrite=overwrite)
    sc = cfg.shapley
    stopping = StoppingRule(sc.convergence, tol=sc.convergence_tol, top_k=sc.convergence_top_k,
                            patience=sc.convergence_patience, min_samples=sc.min_permutations)
    store = MarginalsStore(layout.shapley_dir)
    run = run_resumable(
        problem, store, utility=sc.utility, sampler=sc.sampler, n_permutations=sc.n_permutations,
        truncation_tol=sc.truncation_tol, truncation_patience=sc.truncation_patience, seed=sc.seed,
        per_test_point=sc.per_test_point, permutations_per_task=sc.permutations_per_task,
        num_cpus_per_task=sc.num_cpus_per_task, max_seconds=sc.max_seconds, stopping=stopping,
        resume=sc.resume, discard_mismatched=overwrite, sign_splits=sc.sign_splits, progress=progress,
        on_batch=on_batch, resources_per_task=sc.resources_per_task, placement=sc.placement,
    )
    info = dict(run.info)
    per_test = (run.per_test.values, run.per_test.stderr) if run.per_test is not None else None
    write_values(layout, train, run.values.values, run.values.stderr, run.values.counts, per_test=per_test,
                 info=info, sign_agreement=run.sign.per_point)
    _update_manifest(layout, cfg, "shapley", info)
    return info


def run_job(cfg: JobConfig, *, overwrite: bool = False, progress: bool = True, train=None, test=None) -> dict[str, Any]:
    """Kernel then Shapley in one Ray runtime. Returns ``{"kernel": ..., "shapley": ...}`` stage info."""
    from .distributed import ray_runtime

    stage = prepare_kernel_stage(cfg, overwrite=overwrite, train=train, test=test)
    with ray_runtime(cfg.ray.address, num_cpus=cfg.ray.num_cpus, include_dashboard=cfg.ray.include_dashboard):
        kernel_info = run_kernel_stage(stage, progress=progress)
        shapley_info = run_shapley_stage(cfg, overwrite=True, progress=progress)
    return {"kernel": kernel_info, "shapley": shapley_info}


def summary(values_path: Path, k: int = 3) -> str:
    """A few lines naming the most helpful and most harmful training examples."""
    import pyarrow.parquet as pq

    t = pq.read_table(values_path).to_pandas().sort_values("value")
    lines = [f"{len(t)} training examples valued; mean value {t['value'].mean():+.4f}"]
    for title, rows in (("most harmful", t.head(k)), ("most helpful", t.tail(k)[::-1])):
        lines.append(f"{title}:")
        for _, r in rows.iterrows():
            text = r["text"] if len(r["text"]) <= 70 else r["text"][:67] + "..."
            lines.append(f"  {r['value']:+.4f} ± {r['stderr']:.4f}  [{r['label_name']}] {text}")
    return "\n".join(lines)

