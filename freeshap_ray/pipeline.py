"""The FreeShap job: data → model → kernel → Shapley values, each stage resumable from its outputs.

Input is validated (config, data, model, template, label words, existing outputs) before anything is
written, so bad input leaves no output directory behind. Every artifact is written atomically.
"""

from __future__ import annotations

import logging
import time
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from .config import JobConfig, config_to_dict
from .data import Splits, load_splits
from .errors import ConfigError, OutputError
from .grads import param_sizes
from .io import (
    FeaturePlan,
    FeatureStore,
    KernelStore,
    Layout,
    MarginalsStore,
    RunManifest,
    read_examples,
    read_kernel,
    remove_path,
    write_duplicates,
    write_examples,
    write_values,
)
from .io.remote import display
from .kernel import spectrum_summary
from .models import load_classifier, resolve_model_path, select_params
from .utility import FeatureProblem, RegressionProblem

if TYPE_CHECKING:
    from .distributed.kernel_job import KernelInputs

__all__ = ["prepare_kernel_stage", "run_kernel_stage", "prepare_shapley_stage", "run_shapley_stage", "run_job"]

log = logging.getLogger(__name__)


def _record(layout: Layout, cfg: JobConfig, stage: str, stats: dict[str, Any]) -> None:
    RunManifest.read(layout.manifest).record(stage, config_to_dict(cfg), stats)


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
        job: texts, model and selected parameters of the kernel job.
        model_info: label-token ids and model kind, for the manifest.
        resume: finished tiles of an interrupted run with the same plan are kept.
        finished: a finished kernel of the same plan is already there and is reused as is.
    """

    def __init__(self, cfg: JobConfig, splits: Splits, job: KernelInputs, model_info: dict[str, Any], resume: bool,
                 finished: bool = False, overwrite: bool = False):
        self.cfg, self.splits, self.job, self.model_info = cfg, splits, job, model_info
        self.resume, self.finished, self.overwrite = resume, finished, overwrite
        self.layout = Layout.of(cfg.output)


def prepare_kernel_stage(cfg: JobConfig, *, overwrite: bool = False, train=None, test=None) -> KernelStage:
    """Load data, resolve the model and check template/label words; raise before writing anything.

    A finished kernel of the same plan under ``cfg.output`` is reused, an unfinished one is resumed
    (finished tiles are kept); one of a different plan is an error unless ``overwrite``.
    """
    from .distributed.kernel_job import KernelInputs

    _check_output_dir(cfg.output)
    layout = Layout.of(cfg.output)
    _guard([layout.values], overwrite, "finished values")
    splits = load_splits(cfg.data, train=train, test=test)
    model_dir = resolve_model_path(cfg.model.path, cache_dir=cfg.model.cache_dir, seed=cfg.model.seed)
    clf = load_classifier(model_dir, cfg.model)  # checks template, label words, parameter selection
    names = select_params(clf, cfg.model.params)
    job = KernelInputs(list(splits.train.texts), list(splits.test.texts), model_dir, cfg.model, cfg.kernel, names,
                       param_sizes(clf, names))
    info = {"model_kind": clf.kind, "label_token_ids": clf.label_token_ids}
    del clf
    if cfg.kernel.projection_dim > 0:  # features of another plan are refused now, before Ray starts
        labels = {"train": splits.train.labels, "test": splits.test.labels}
        FeatureStore.of(cfg.output).check(FeaturePlan.build({"train": job.train_texts, "test": job.test_texts}, labels,
                                                            cfg.model, cfg.kernel), overwrite=overwrite)
    store = KernelStore(layout)
    if not overwrite and (old := store.finished_signature()) is not None:
        if old != job.signature:
            raise OutputError(f"output: {layout.kernel_manifest} is a finished kernel of a different config/data; "
                              "pass --overwrite to replace it")
        return KernelStage(cfg, splits, job, info, resume=True, finished=True)
    return KernelStage(cfg, splits, job, info, store.resumable(job.signature, overwrite), overwrite=overwrite)


def run_kernel_stage(stage: KernelStage, *, progress: bool = True, on_tile=None) -> dict[str, Any]:
    """Compute and write the kernel (Ray must be initialised). Returns the kernel manifest.

    Args:
        on_tile: optional hook ``(actors, n_written)`` after each tile (tests use it to inject faults).
    """
    from .distributed.kernel_job import compute_kernel

    cfg, splits, layout = stage.cfg, stage.splits, stage.layout
    if stage.finished:
        return {**KernelStore(layout).manifest(), "reused": True}
    stale = [layout.kernel_manifest, layout.marginals_dir.parent, layout.values, layout.values_per_test,
             layout.duplicates, layout.explanations, layout.explain_dir]  # explanations are of the old kernel
    if not stage.resume:
        stale.append(layout.kernel_dir)
    for sub in stale:
        remove_path(sub)  # also under an output URI
    for split, ex in (("train", splits.train), ("test", splits.test)):
        write_examples(layout, split, ex.texts, ex.labels, ex.ids, splits.label_names)
    if splits.duplicates is not None:
        write_duplicates(layout, splits.duplicates, splits.label_names)
    store = KernelStore(layout)
    if cfg.kernel.projection_dim > 0:  # features instead of tiles: nothing n×n is formed
        info = {**_features(stage, progress), **stage.model_info}
    else:
        info = {**compute_kernel(stage.job, store, resume=stage.resume, progress=progress, on_tile=on_tile),
                **stage.model_info}
        k = store.assemble(info).first_logit_train
        spec = spectrum_summary(k, cfg.shapley.lam, cfg.shapley.kernel_divisor)
        info["condition_number_first_logit"] = spec["condition_number"]  # None: singular (see numerical rank)
        info["numerical_rank_first_logit"] = spec["numerical_rank"]
        info["condition_number_regularized_first_logit"] = spec["condition_number_regularized"]
        info["diag_mean"] = float(np.diagonal(k).mean())
    store.finish(info)
    data_info = {"data": splits.source, "model_dir": str(stage.job.model_dir), "data_summary": splits.summary()}
    if splits.duplicates is not None:
        data_info["duplicates"] = splits.duplicates.counts()
    _record(layout, cfg, "kernel", {**info, **data_info})
    info["data_summary"] = data_info["data_summary"]
    return info


def _features(stage: KernelStage, progress: bool) -> dict[str, Any]:
    """The projected-features form of the kernel stage: ``OUT/features/`` (shards written by the workers); returns
    the kernel manifest's statistics (no tiles: the kernel is ⟨φ(x), φ(x')⟩ of the stored features)."""
    from .distributed.features_job import compute_features

    t0 = time.perf_counter()
    cfg, splits, job = stage.cfg, stage.splits, stage.job
    stats = compute_features(job, FeatureStore.of(cfg.output), overwrite=stage.overwrite, progress=progress,
                             labels={"train": splits.train.labels, "test": splits.test.labels})
    k = cfg.kernel
    return {
        "kind": k.kind, "representation": "features", "n_train": len(splits.train), "n_test": len(splits.test),
        "n_classes": len(cfg.model.label_words), "n_params": int(sum(job.param_sizes)),
        "projection": {"dim": int(stats.get("dim") or k.projection_dim), "requested_dim": k.projection_dim,
                       "seed": k.projection_seed, "block": k.projection_block},
        "block_size": k.block_size, "num_actors": k.num_actors, "backend": k.backend, "signature": job.signature,
        "tiles": {"train_train": [], "test_train": []}, "features": stats,
        "seconds": {"features": stats.get("seconds", {}).get("features", 0.0), "total": time.perf_counter() - t0},
        "condition_number_first_logit": None,
    }


# --------------------------------------------------------------------------------------------------
# Shapley stage


class ProblemSource:
    """A finished kernel stage, ready to give the regression problem for any training labels.

    Exact kernels give a dual :class:`RegressionProblem` (n×n); projected features (``kernel.projection_dim > 0``)
    give a :class:`FeatureProblem` solved in feature space (``shapley.solver: primal``; nothing n×n), or turned
    into the dual one when ``shapley.solver`` is ``dual`` or ``auto`` finds it cheaper.
    """

    def __init__(self, layout: Layout, cfg: JobConfig) -> None:
        self.cfg = cfg
        self.info = KernelStore(layout).manifest()
        self.features = self.info.get("representation") == "features"
        self.auto_info: dict[str, Any] | None = None  # what shapley.solver: auto chose on features, and why
        if cfg.shapley.solver == "primal" and not self.features:
            raise ConfigError("shapley.solver: 'primal' works on projected features; set kernel.projection_dim > 0 "
                              "(or use solver: dual / auto)")
        if self.features:
            fs = FeatureStore.of(cfg.output)
            self._phi = (fs.read_matrix("train")[0], fs.read_matrix("test")[0])
        else:
            self._kernel = read_kernel(layout.root)

    @property
    def n_train(self) -> int:
        return int(self.info["n_train"])

    @property
    def n_classes(self) -> int:
        return int(self.info["n_classes"])

    def problem(self, y_train: np.ndarray, y_test: np.ndarray) -> RegressionProblem | FeatureProblem:
        sc = self.cfg.shapley
        if not self.features:
            return self._kernel.problem(y_train, y_test, lam=sc.lam, kernel_divisor=sc.kernel_divisor)
        prob = FeatureProblem.from_features(*self._phi, y_train, y_test, n_classes=self.n_classes, lam=sc.lam,
                                            kernel_divisor=sc.kernel_divisor, kind=self.info["kind"])
        solver = sc.solver
        if solver == "auto":  # decided once per source: later problems (e.g. clean's noisy labels) reuse it
            if self.auto_info is None:
                from .valuation.pilot import auto_solver
                from .valuation.settings import ValuationSettings

                self.auto_info = auto_solver(prob, ValuationSettings.of(sc))[1]
            solver = self.auto_info["solver"]
        return prob.to_dual() if solver == "dual" else prob


class ShapleyInputs(NamedTuple):
    """What the Shapley stage reads: the regression problem, the train examples table and, under
    ``shapley.solver: auto`` on features, what was chosen and why (:func:`~freeshap_ray.valuation.pilot.auto_solver`)."""

    problem: RegressionProblem | FeatureProblem
    train: Any
    solver_auto: dict[str, Any] | None = None


def load_problem(layout: Layout, cfg: JobConfig) -> ShapleyInputs:
    """Regression problem from a finished kernel stage, with the train examples table."""
    train = read_examples(layout, "train")
    test = read_examples(layout, "test")
    source = ProblemSource(layout, cfg)
    problem = source.problem(train.column("label").to_numpy(), test.column("label").to_numpy())
    return ShapleyInputs(problem, train, source.auto_info)


def prepare_shapley_stage(cfg: JobConfig, *, overwrite: bool = False) -> ShapleyInputs:
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
                      on_batch=None, inputs: ShapleyInputs | None = None) -> dict[str, Any]:
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
    from .distributed.shapley_job import run_valuation
    from .valuation.settings import ValuationSettings

    layout = Layout.of(cfg.output)
    problem, train, auto = inputs if inputs is not None else prepare_shapley_stage(cfg, overwrite=overwrite)
    store = MarginalsStore(layout.shapley_dir, discard_mismatched=overwrite)
    run = run_valuation(problem, ValuationSettings.of(cfg.shapley), store, progress=progress, on_batch=on_batch)
    info = {**run.info, "solver": "primal" if isinstance(problem, FeatureProblem) else "dual"}
    if auto is not None:
        info["solver_auto"] = auto
    per_test = (run.per_test.values, run.per_test.stderr) if run.per_test is not None else None
    write_values(layout, train, run.values.values, run.values.stderr, run.values.counts, per_test=per_test,
                 info=info, sign_agreement=run.sign.per_point)
    _record(layout, cfg, "shapley", info)
    return info


def run_job(cfg: JobConfig, *, overwrite: bool = False, progress: bool = True, train=None, test=None,
            address: str | None = None, on_stage: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Kernel then Shapley in one Ray runtime (``address`` overrides ``ray.address``).

    Returns ``{"kernel": ..., "shapley": ...}`` stage info; ``on_stage(name, info)`` is called as each stage ends.
    """
    from .distributed import ray_runtime

    stage = prepare_kernel_stage(cfg, overwrite=overwrite, train=train, test=test)
    out = {}
    with ray_runtime(cfg.ray, address):
        for name, run in (("kernel", lambda: run_kernel_stage(stage, progress=progress)),
                          ("shapley", lambda: run_shapley_stage(cfg, overwrite=True, progress=progress))):
            out[name] = run()
            if on_stage is not None:
                on_stage(name, out[name])
    return out


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

