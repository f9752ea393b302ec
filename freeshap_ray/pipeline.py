"""The FreeShap job: data → model → kernel → Shapley values, each stage resumable from its outputs.

Input is validated (config, data, model, template, label words, existing outputs) before anything is
written, so bad input leaves no output directory behind. Every artifact is written atomically.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from .config import JobConfig, config_to_dict
from .data import Splits, load_splits
from .errors import OutputError
from .io import Layout, load_kernel, read_examples, write_examples, write_json_atomic, write_marginals, write_values
from .kernel import condition_number
from .models import load_classifier, resolve_model_path, select_params
from .utility import RegressionProblem

__all__ = ["prepare_kernel_stage", "run_kernel_stage", "run_shapley_stage", "run_job", "versions"]

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
        manifest = json.loads(layout.manifest.read_text())
    manifest.update(config=config_to_dict(cfg), versions=versions())
    manifest.setdefault("stages", {})[stage] = {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info}
    write_json_atomic(manifest, layout.manifest)


def _guard(paths: list[Path], overwrite: bool, what: str) -> None:
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        raise OutputError(f"output: {existing[0]} exists ({what}); pass --overwrite to replace it")


# --------------------------------------------------------------------------------------------------
# Kernel stage


class KernelStage:
    """Validated inputs of the kernel stage (nothing written yet)."""

    def __init__(self, cfg: JobConfig, splits: Splits, model_dir: Path):
        self.cfg, self.splits, self.model_dir = cfg, splits, model_dir
        self.layout = Layout.of(cfg.output)


def prepare_kernel_stage(cfg: JobConfig, *, overwrite: bool = False, train=None, test=None) -> KernelStage:
    """Load data, resolve the model and check template/label words; raise before writing anything."""
    layout = Layout.of(cfg.output)
    _guard([layout.kernel_manifest, layout.values], overwrite, "a finished kernel or values")
    splits = load_splits(cfg.data, train=train, test=test)
    model_dir = resolve_model_path(cfg.model.path, cache_dir=cfg.model.cache_dir, seed=cfg.model.seed)
    clf = load_classifier(model_dir, cfg.model)  # checks template, label words, parameter selection
    select_params(clf, cfg.model.params)
    del clf
    return KernelStage(cfg, splits, model_dir)


def run_kernel_stage(stage: KernelStage, *, progress: bool = True) -> dict[str, Any]:
    """Compute and write the kernel (Ray must be initialised). Returns the kernel manifest."""
    from .distributed.kernel_job import compute_kernel

    cfg, splits, layout = stage.cfg, stage.splits, stage.layout
    for sub in (layout.kernel_dir, layout.marginals_dir.parent, layout.values, layout.values_per_test):
        if sub.is_dir():
            shutil.rmtree(sub)
        elif sub.exists():
            sub.unlink()
    for split, ex in (("train", splits.train), ("test", splits.test)):
        write_examples(layout, split, ex.texts, ex.labels, ex.ids, splits.label_names)
    result = compute_kernel(
        list(splits.train.texts), list(splits.test.texts), stage.model_dir, cfg.model, cfg.kernel, layout,
        progress=progress,
    )
    info = dict(result.info)
    kernel = load_kernel(layout.root)
    k = kernel["train_train"] if cfg.kernel.kind == "first_logit" else kernel["train_train_full"][..., 0, 0]
    info["condition_number_first_logit"] = condition_number(k)
    _update_manifest(layout, cfg, "kernel", {**info, "data": stage.splits.source, "model_dir": str(stage.model_dir)})
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


def run_shapley_stage(cfg: JobConfig, *, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """TMC Shapley from the kernel under ``cfg.output``; writes marginals and ``values.parquet``."""
    from .distributed.shapley_job import run_tmc

    layout = Layout.of(cfg.output)
    _guard([layout.values], overwrite, "finished Shapley values")
    problem, train = load_problem(layout, cfg)
    if layout.marginals_dir.parent.exists():
        shutil.rmtree(layout.marginals_dir.parent)
    sc = cfg.shapley
    parts = iter(range(1 << 30))

    def sink(batch) -> None:
        records = [
            {
                "perm_id": pid,
                "seed": sc.seed,
                "order": r.permutation.tolist(),
                "marginals": (r.marginals if r.marginals.ndim == 1 else r.marginals.mean(axis=1))[r.permutation].tolist(),
                "truncated_at": int(r.truncated_at),
                "v_full": float(r.v_full),
            }
            for pid, r in batch
        ]
        write_marginals(layout, next(parts), records)

    run = run_tmc(
        problem, utility=sc.utility, n_permutations=sc.n_permutations, truncation_tol=sc.truncation_tol,
        truncation_patience=sc.truncation_patience, seed=sc.seed, per_test_point=sc.per_test_point,
        permutations_per_task=sc.permutations_per_task, num_cpus_per_task=sc.num_cpus_per_task,
        on_batch=sink, progress=progress,
    )
    info = {
        "utility": sc.utility,
        "n_permutations": sc.n_permutations,
        "v_full": run.v_full,
        "v_empty": run.v_empty,
        "mean_truncated_at": float(run.truncated_at.mean()),
        "seconds": run.seconds,
        "seconds_per_permutation": run.seconds / sc.n_permutations,
    }
    per_test = (run.per_test.values, run.per_test.stderr) if run.per_test is not None else None
    write_values(layout, train, run.values.values, run.values.stderr, run.values.counts, per_test=per_test, info=info)
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

