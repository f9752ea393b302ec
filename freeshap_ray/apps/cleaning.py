"""``freeshap-ray clean``: wrong-label suspects, removal/selection curves, baselines, noise evaluation.

Given a finished run directory (train/test examples, kernel, ``values.parquet``):

1. **Suspects** (``OUT/suspects.parquet``): training points ranked from most to least suspicious
   (ascending FreeShap value, or its per-class z-score with ``clean.per_class_normalise``), with the
   kernel surrogate's leave-one-out prediction of each point (the fit on all OTHER points, exact via
   the inverse identity; see :mod:`freeshap_ray.apps.kernel_baselines`). The full-data fit nearly
   interpolates its training labels (ridge 1e-6), so its own prediction of a training point would
   almost always repeat the given label; the LOO prediction is what the rest of the data says.
2. **Baselines** (``OUT/clean/scores.parquet``): ``random``, exact ``loo``, ``influence``, ``tracin``,
   ``loo_margin`` scores on the same points, higher = more helpful like the values.
3. **Curves** (``OUT/clean/curves.parquet``): test accuracy of the surrogate refitted after removing
   the highest / lowest scored points, and keeping the top-scored ones, for FreeShap and every
   baseline; random removal (mean of ``clean.random_repeats`` orders) is the reference line.
4. **Conflicting duplicates** (``data.dedupe``): groups of training texts equal under the dedupe key
   but labelled differently (and test texts whose training twin has another label), read from
   ``OUT/duplicates.parquet``, are listed in the summary (``conflicting_duplicates``).
5. **Noise evaluation** (``clean.noise_fraction > 0``, ``OUT/clean/noise/``): a seeded fraction of the
   training labels is flipped, FreeShap values (the engine, on the SAME kernel: the kernel does not
   depend on labels) and the baselines are recomputed on the noisy labels, and each method's
   detection curve, AUC and recall at ``clean.inspect_fraction`` are written.

Everything is computed before anything is written; every file is written atomically and
``OUT/clean/summary.json`` last. With ``clean.use_kernel: false`` nothing but the value vector is
held in memory: the ranking streams the examples from Parquet (no predictions, baselines or curves).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from ..config import JobConfig, config_to_dict
from ..pipeline import ProblemSource
from ..errors import ConfigError, OutputError
from ..data.dedupe import conflict_groups
from ..io import Layout, RunManifest, read_duplicates, write_json_atomic
from ..io.apps_store import SUSPECTS_SCHEMA, write_curves, write_detection, write_scores
from ..io.atomic import atomic_path
from ..utility import RegressionProblem
from .kernel_baselines import SurrogateMethods, baseline_scores, fit_surrogate
from .curves import detection_curve, normalise_per_class, random_curves, rank_order, removal_curves

__all__ = ["inject_noise", "prepare_clean", "run_clean", "write_suspects"]

log = logging.getLogger(__name__)

#: Rows of the suspects table assembled at once when streaming.
SUSPECT_CHUNK_ROWS = 65536


def inject_noise(labels: np.ndarray, fraction: float, seed: int, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Flip ``round(fraction·n)`` labels (chosen without replacement) to a uniformly drawn OTHER class.

    Returns:
        ``(noisy_labels, flipped)``: int64 labels and the bool mask of flipped points.
    """
    y = np.asarray(labels, dtype=np.int64)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction: must be in [0, 1), got {fraction}")
    if n_classes < 2:
        raise ValueError(f"n_classes: must be >= 2, got {n_classes}")
    rng = np.random.default_rng([int(seed), 0xF11B])
    k = int(round(fraction * y.size))
    idx = rng.choice(y.size, size=k, replace=False)
    noisy = y.copy()
    noisy[idx] = (y[idx] + rng.integers(1, n_classes, size=k)) % n_classes
    flipped = np.zeros(y.size, dtype=bool)
    flipped[idx] = True
    return noisy, flipped


# --------------------------------------------------------------------------------------------------
# Streaming suspects writer


def write_suspects(
    path: str | Path,
    examples_path: str | Path,
    order: np.ndarray,
    columns: dict[str, np.ndarray | None],
    label_names: tuple[str, ...] | list[str],
    *,
    chunk_rows: int = SUSPECT_CHUNK_ROWS,
) -> Path:
    """Write a ``SUSPECTS_SCHEMA`` table in rank order, streaming ``id``/``text`` from ``examples_path``.

    Only ``chunk_rows`` rows of text are in memory at a time (``pyarrow.dataset`` takes the rows of one
    rank chunk); the per-point vectors in ``columns`` (indexed by training index) are the only
    whole-dataset arrays.

    Args:
        path: output file (written atomically).
        examples_path: a Parquet file with ``index``, ``id``, ``text`` whose row ``i`` has ``index == i``.
        order: ``(n,)`` training indices, most suspicious first.
        columns: per-point arrays ``label``, ``value``, ``stderr``, ``score`` (required) and
            ``predicted_label``, ``loo_margin``, ``flipped``, ``original_label`` (None or missing: null).
    """
    order = np.asarray(order, dtype=np.int64)
    n = order.size
    dataset = pads.dataset(str(examples_path), format="parquet")
    if dataset.count_rows() != n:
        raise OutputError(f"{examples_path}: {dataset.count_rows()} rows, but {n} points are ranked")
    for key in ("label", "value", "stderr", "score"):
        if columns.get(key) is None:
            raise ValueError(f"columns: {key!r} is required")
    names = list(label_names)
    with atomic_path(path) as tmp:
        with pq.ParquetWriter(tmp, SUSPECTS_SCHEMA, compression="zstd") as writer:
            for start in range(0, n, chunk_rows):
                idx = order[start:start + chunk_rows]
                rows = dataset.take(pa.array(idx), columns=["index", "id", "text"])
                got = rows.column("index").to_numpy()
                if not np.array_equal(got, idx):
                    bad = int(np.argmax(got != idx))
                    raise OutputError(f"{examples_path}: row {int(idx[bad])} holds index {int(got[bad])}; the "
                                      f"examples table must be in index order (row i has index i)")
                writer.write_table(_suspect_chunk(start, idx, rows, columns, names))
    return Path(path)


def _suspect_chunk(start: int, idx: np.ndarray, rows: pa.Table, columns: dict[str, Any], names: list[str]) -> pa.Table:
    def take(key, typ):
        arr = columns.get(key)
        return pa.nulls(idx.size, typ) if arr is None else pa.array(np.asarray(arr)[idx], typ)

    label = np.asarray(columns["label"], dtype=np.int64)[idx]
    pred = columns.get("predicted_label")
    pred_names = (pa.nulls(idx.size, pa.string()) if pred is None
                  else pa.array([names[int(c)] for c in np.asarray(pred)[idx]], pa.string()))
    return pa.table(
        {
            "rank": np.arange(start, start + idx.size, dtype=np.int64),
            "index": idx,
            "id": rows.column("id"),
            "text": rows.column("text"),
            "label": label,
            "label_name": pa.array([names[int(c)] for c in label], pa.string()),
            "value": take("value", pa.float64()),
            "stderr": take("stderr", pa.float64()),
            "score": take("score", pa.float64()),
            "predicted_label": take("predicted_label", pa.int64()),
            "predicted_label_name": pred_names,
            "loo_margin": take("loo_margin", pa.float64()),
            "flipped": take("flipped", pa.bool_()),
            "original_label": take("original_label", pa.int64()),
        },
        schema=SUSPECTS_SCHEMA,
    )


# --------------------------------------------------------------------------------------------------
# The clean job


class CleanInputs:
    """Validated inputs of ``clean`` (nothing written yet)."""

    def __init__(self, cfg: JobConfig, values: np.ndarray, stderr: np.ndarray, labels: np.ndarray,
                 source: ProblemSource | None, y_test: np.ndarray | None, shapley_info: dict[str, Any],
                 conflicts: list[dict[str, Any]] | None = None):
        self.cfg, self.values, self.stderr, self.labels = cfg, values, stderr, labels
        self.source, self.y_test, self.shapley_info = source, y_test, shapley_info
        self.conflicts = conflicts  # conflicting duplicate groups; None: the run did not deduplicate
        self.layout = Layout.of(cfg.output)

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(self.cfg.data.label_names)

    @property
    def n(self) -> int:
        return int(self.values.size)

    def problem(self, labels: np.ndarray):
        """The job's regression problem with these training labels (the kernel, or the features, and the solver
        do not depend on labels): dual, or primal in feature space (nothing n×n)."""
        return self.source.problem(labels, self.y_test)


def _read_vectors(path: Path, columns: list[str]) -> pa.Table:
    """Only the named (numeric) columns of a Parquet file; a clear error naming the file otherwise."""
    if not path.is_file():
        raise OutputError(f"{path}: missing; run `freeshap-ray run CONFIG` (or `shapley`) first")
    try:
        schema = pq.read_schema(path)
    except Exception as err:  # noqa: BLE001 - any unreadable file is reported the same way
        raise OutputError(f"{path}: not a readable Parquet file ({err})") from err
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise OutputError(f"{path}: missing columns {missing}")
    return pq.read_table(path, columns=columns)


def _check_against_manifest(cfg: JobConfig, layout: Layout) -> dict[str, Any]:
    """The Shapley stage info; ConfigError if the regression settings differ from those of the values."""
    if not layout.manifest.is_file():
        return {}
    manifest = RunManifest.read(layout.manifest)
    used = manifest.config.get("shapley", {})
    for key in ("lam", "kernel_divisor", "utility"):
        if key in used and used[key] != getattr(cfg.shapley, key):
            raise ConfigError(f"shapley.{key}: {getattr(cfg.shapley, key)!r} differs from the {used[key]!r} the values in "
                              f"{layout.values} were computed with; use the run's config")
    entry = manifest.stages.get("shapley")
    return entry.to_dict() if entry is not None else {}


def prepare_clean(cfg: JobConfig, *, overwrite: bool = False) -> CleanInputs:
    """Check config, outputs and inputs of ``clean``; raise before anything is written."""
    cc = cfg.clean
    layout = Layout.of(cfg.output)
    if not layout.root.is_dir():
        raise OutputError(f"output: {layout.root} does not exist; run `freeshap-ray run CONFIG` first")
    existing = [p for p in layout.outputs() if p.exists()]
    if existing and not overwrite:
        raise OutputError(f"output: {existing[0]} exists (cleaning results); pass --overwrite to replace it")
    if not cc.use_kernel:
        if cc.noise_fraction > 0:
            raise ConfigError("clean.noise_fraction: the noise evaluation recomputes values from the kernel; "
                              "it needs clean.use_kernel: true")
        if cc.rank_by not in ("auto", "freeshap"):
            raise ConfigError(f"clean.rank_by: {cc.rank_by!r} needs the kernel; with clean.use_kernel: false only "
                              "'auto' or 'freeshap' is available")
        bad = [b for b in cc.baselines if b != "random"]
        if bad:
            raise ConfigError(f"clean.baselines: {bad} need the kernel; with clean.use_kernel: false only 'random' is available")
    if cc.finetune and not (cc.use_kernel and cc.curves):
        raise ConfigError("clean.finetune: re-evaluates the removal curves; needs clean.curves and clean.use_kernel true")
    shapley_info = _check_against_manifest(cfg, layout)
    vt = _read_vectors(layout.values, ["index", "label", "value", "stderr"])
    n = vt.num_rows
    if n == 0:
        raise OutputError(f"{layout.values}: no rows")
    if not np.array_equal(vt.column("index").to_numpy(), np.arange(n)):
        raise OutputError(f"{layout.values}: rows are not in training-index order 0..{n - 1}")
    values = vt.column("value").to_numpy().astype(np.float64)
    if not np.all(np.isfinite(values)):
        raise OutputError(f"{layout.values}: column value has {int((~np.isfinite(values)).sum())} non-finite entries")
    stderr = vt.column("stderr").to_numpy().astype(np.float64)
    labels = vt.column("label").to_numpy().astype(np.int64)
    names = tuple(cfg.data.label_names)
    if labels.min() < 0 or labels.max() >= len(names):
        raise OutputError(f"{layout.values}: labels outside [0, {len(names) - 1}] (data.label_names has {len(names)} classes)")
    tr = _read_vectors(layout.examples("train"), ["index"])
    if tr.num_rows != n:
        raise OutputError(f"{layout.examples('train')}: {tr.num_rows} rows but {layout.values} has {n}")
    if cc.noise_fraction > 0 and int(round(cc.noise_fraction * n)) < 1:
        raise ConfigError(f"clean.noise_fraction: {cc.noise_fraction} of {n} training points flips none; use a larger fraction")
    kernel = y_test = None
    if cc.use_kernel:
        kernel = ProblemSource(layout, cfg)
        if kernel.n_train != n:
            raise OutputError(f"{layout.kernel_manifest}: kernel has {kernel.n_train} training rows, "
                              f"{layout.values} has {n}")
        if kernel.n_classes != len(names):
            raise ConfigError(f"data.label_names: {len(names)} classes, the kernel in {layout.kernel_dir} has "
                              f"{kernel.n_classes}")
        y_test = _read_vectors(layout.examples("test"), ["label"]).column("label").to_numpy().astype(np.int64)
    dups = read_duplicates(layout, conflicts_only=True)
    conflicts = None if dups is None else conflict_groups(dups.to_pylist())
    return CleanInputs(cfg, values, stderr, labels, kernel, y_test, shapley_info, conflicts)


def _noisy_values(inp: CleanInputs, noisy: np.ndarray, progress: bool) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """FreeShap values on noisy labels with exactly the job's valuation settings (sampler, truncation, budgets,
    stopping rule, seed, resources, placement; ``clean.noise_permutations`` replaces the permutation budget when
    set), on the same kernel (the valuation engine on Ray, marginals kept in memory)."""
    from ..distributed.shapley_job import run_valuation
    from ..valuation.settings import ValuationSettings
    from ..valuation.sinks import MemorySink

    sc = inp.cfg.shapley
    settings = ValuationSettings.of(sc, n_permutations=inp.cfg.clean.noise_permutations or sc.n_permutations)
    run = run_valuation(inp.problem(noisy), settings, MemorySink(), progress=progress)
    info = {k: v for k, v in run.info.items() if isinstance(v, (int, float, str, bool)) or v is None}
    return run.values.values, run.values.stderr, info


def _all_scores(inp: CleanInputs, problem: RegressionProblem, values: np.ndarray, surrogate: SurrogateMethods,
                seed_offset: int) -> dict[str, np.ndarray]:
    cc = inp.cfg.clean
    out = {"freeshap": values}
    out.update(baseline_scores(problem, cc.baselines, utility=inp.cfg.shapley.utility, seed=cc.seed + seed_offset,
                               surrogate=surrogate))
    return out


def run_clean(cfg: JobConfig, *, overwrite: bool = False, progress: bool = True,
              inputs: CleanInputs | None = None) -> dict[str, Any]:
    """Run ``clean`` on the finished run under ``cfg.output`` (Ray must be initialised for the noise evaluation).

    Returns:
        The summary (also written to ``OUT/clean/summary.json``).
    """
    inp = inputs or prepare_clean(cfg, overwrite=overwrite)
    cc, layout = cfg.clean, inp.layout
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    summary: dict[str, Any] = {
        "schema_version": 1,
        "config": config_to_dict(cc),
        "n_train": inp.n,
        "label_names": list(inp.label_names),
        "ranking": "per-class z-score of the value" if cc.per_class_normalise else "value",
        "predicted_label": "leave-one-out kernel-surrogate prediction" if cc.use_kernel else None,
    }
    if inp.conflicts is not None:
        summary["conflicting_duplicates"] = inp.conflicts
    writes: list[tuple[str, Any]] = []  # (kind, args) performed after everything is computed

    cols: dict[str, Any] = {"label": inp.labels, "value": inp.values, "stderr": inp.stderr}
    scores: dict[str, np.ndarray] = {"freeshap": inp.values}

    if cc.use_kernel:
        t = time.perf_counter()
        problem = inp.problem(inp.labels)
        surrogate = fit_surrogate(problem)
        loo_pred = surrogate.loo_train_predictions()
        cols["predicted_label"] = np.argmax(loo_pred, axis=1)
        cols["loo_margin"] = surrogate.loo_margin()
        scores = _all_scores(inp, problem, inp.values, surrogate, 0)
        timings["surrogate_and_baselines"] = time.perf_counter() - t
        test_pred = surrogate.test_predictions()
        from ..utility.metrics import accuracy

        summary["given"] = {
            "surrogate_test_accuracy": accuracy(test_pred, problem.y_test),
            "loo_train_accuracy": float(np.mean(cols["predicted_label"] == inp.labels)),
            "n_loo_disagree": int(np.sum(cols["predicted_label"] != inp.labels)),
            "n_negative_value": int(np.sum(inp.values < 0)),
            "methods": list(scores),
        }
        writes.append(("scores", (layout.scores, scores, {"freeshap": inp.stderr})))
        if cc.curves:
            t = time.perf_counter()
            rows = []
            for method, s in scores.items():
                if method != "random":
                    rows += removal_curves(problem, s, cc.curve_steps, method)
            rows += random_curves(problem, cc.curve_steps, cc.random_repeats, cc.seed)
            timings["curves"] = time.perf_counter() - t
            summary["curves"] = _curve_summary(rows)
            if cc.finetune:
                t = time.perf_counter()
                ft = _finetune_rows(inp, scores["freeshap"])
                rows += ft
                timings["finetune"] = time.perf_counter() - t
                summary["finetune"] = [{k2: r[k2] for k2 in ("method", "curve", "fraction", "n_train", "accuracy")}
                                       for r in ft]
            writes.append(("curves", (layout.curves, rows)))
        del surrogate

    methods: dict[str, dict[str, float]] = {}
    if cc.noise_fraction > 0:
        t = time.perf_counter()
        noisy, flipped = inject_noise(inp.labels, cc.noise_fraction, cc.noise_seed, len(inp.label_names))
        log.info("clean: %d of %d labels flipped; recomputing values on the noisy labels", int(flipped.sum()), inp.n)
        nv, nse, ninfo = _noisy_values(inp, noisy, progress)
        timings["noisy_shapley"] = time.perf_counter() - t
        t = time.perf_counter()
        nproblem = inp.problem(noisy)
        nsur = fit_surrogate(nproblem)
        nscores = _all_scores(inp, nproblem, nv, nsur, 1)
        curves = {}
        for method, s in nscores.items():
            curve = detection_curve(rank_order(s, noisy, per_class_normalise=cc.per_class_normalise), flipped)
            curves[method] = curve.downsample()
            methods[method] = {"auc": curve.auc, f"recall_at_{cc.inspect_fraction:g}": curve.recall_at(cc.inspect_fraction)}
        nz = normalise_per_class(nv, noisy) if cc.per_class_normalise else nv
        ncols = {"label": noisy, "value": nv, "stderr": nse, "score": nz,
                 "predicted_label": np.argmax(nsur.loo_train_predictions(), axis=1), "loo_margin": nsur.loo_margin(),
                 "flipped": flipped, "original_label": inp.labels}
        norder = rank_order(nv, noisy, per_class_normalise=cc.per_class_normalise)
        writes += [("suspects", (layout.noise_suspects, norder, ncols)),
                   ("scores", (layout.noise_scores, nscores, {"freeshap": nse})),
                   ("detection", (layout.detection, curves))]
        timings["noise_baselines"] = time.perf_counter() - t
        summary["noise"] = {
            "fraction": cc.noise_fraction, "seed": cc.noise_seed, "n_flipped": int(flipped.sum()),
            "inspect_fraction": cc.inspect_fraction, "methods": methods, "shapley": ninfo,
            "loo_prediction_recovers_original": float(np.mean(ncols["predicted_label"][flipped] == inp.labels[flipped])),
        }

    # ---- the ranking of the given labels: by the method clean.rank_by names, or the one that found the injected
    # flips best on this very dataset (auto) ----
    chosen, why = _rank_method(cc, scores, methods)
    summary["rank_by"] = {"method": chosen, "why": why, "auc": methods.get(chosen, {}).get("auc")}
    summary["ranking"] = (f"{'per-class z-score of the ' if cc.per_class_normalise else ''}"
                          f"{'value' if chosen == 'freeshap' else chosen + ' score'} ({why})")
    order_given = rank_order(scores[chosen], inp.labels, per_class_normalise=cc.per_class_normalise)
    cols["score"] = normalise_per_class(scores[chosen], inp.labels) if cc.per_class_normalise else scores[chosen]
    writes.insert(0, ("suspects", (layout.suspects, order_given, cols)))

    # ---- write (everything is computed); the summary goes last, outputs of an earlier clean are replaced ----
    t = time.perf_counter()
    if layout.summary.exists():
        layout.summary.unlink()
    written = {args[0] for _, args in writes}
    for stale in layout.outputs():
        if stale not in written and stale.exists():
            stale.unlink()
    for kind, args in writes:
        if kind == "suspects":
            path, order, c = args
            write_suspects(path, layout.examples("train"), order, c, inp.label_names)
        elif kind == "scores":
            write_scores(*args)
        elif kind == "curves":
            write_curves(*args)
        elif kind == "detection":
            write_detection(*args)
    timings["write"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    summary["seconds"] = timings
    summary["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_json_atomic(summary, layout.summary)
    return summary


def _rank_method(cc, scores: dict[str, np.ndarray], methods: dict[str, dict[str, float]]) -> tuple[str, str]:
    """The method suspects are ranked by, and why: ``clean.rank_by`` as given, or for ``auto`` the method with the
    best detection AUC in the noise evaluation (FreeShap first among equals; FreeShap without an evaluation)."""
    if cc.rank_by != "auto":
        return cc.rank_by, "clean.rank_by"
    if not methods:
        return "freeshap", "auto: no noise evaluation (clean.noise_fraction 0), so the values"
    order = ["freeshap"] + [m for m in methods if m != "freeshap"]
    best = max((m for m in order if m in scores and m != "random"), key=lambda m: methods[m]["auc"])
    return best, f"auto: best detection AUC {methods[best]['auc']:.3f} on {cc.noise_fraction:g} injected noise"


def _finetune_rows(inp: CleanInputs, values: np.ndarray) -> list[dict[str, Any]]:
    """FreeShap and random removal curves re-evaluated by real fine-tuning (Ray tasks)."""
    from ..distributed.finetune_job import finetune_curves
    from ..models import resolve_model_path
    from .finetune import FinetuneSettings, Labelled
    from .kernel_baselines import random_scores

    cfg, cc = inp.cfg, inp.cfg.clean
    train, test = (pq.read_table(inp.layout.examples(s), columns=["text", "label"]) for s in ("train", "test"))
    model_dir = resolve_model_path(cfg.model.path, cache_dir=cfg.model.cache_dir, seed=cfg.model.seed)
    return finetune_curves(
        model_dir, cfg.model, Labelled(train.column("text").to_pylist(), train.column("label").to_numpy()),
        Labelled(test.column("text").to_pylist(), test.column("label").to_numpy()),
        {"freeshap": values, "random": random_scores(inp.n, cc.seed)}, cc.finetune_fractions,
        FinetuneSettings.of(cc), num_cpus=cc.finetune_num_cpus)


def _curve_summary(rows: list[dict]) -> dict[str, Any]:
    """Accuracy at 0 %, 10 %, 20 %, 30 % removal per method and curve (for the summary and the README)."""
    out: dict[str, Any] = {}
    for r in rows:
        if r["curve"] in ("remove_high", "remove_low") and any(abs(r["fraction"] - f) < 1e-9 for f in (0.0, 0.1, 0.2, 0.3)):
            out.setdefault(r["method"], {}).setdefault(r["curve"], {})[f"{r['fraction']:.1f}"] = r["accuracy"]
    return out


def summary_lines(summary: dict[str, Any], out_dir: str | Path) -> list[str]:
    """Human-readable lines about a finished ``clean`` (the CLI prints them)."""
    layout = Layout.of(out_dir)
    lines = [f"clean: {summary['n_train']} training points ranked ({summary['ranking']}) -> {layout.suspects}"]
    given = summary.get("given")
    if given:
        lines.append(f"  surrogate test accuracy {given['surrogate_test_accuracy']:.4f}; {given['n_loo_disagree']} points' "
                     f"leave-one-out prediction disagrees with their label; {given['n_negative_value']} negative values")
    conflicts = summary.get("conflicting_duplicates")
    if conflicts:
        lines.append(f"  {len(conflicts)} conflicting duplicate groups (same text under data.dedupe, different labels; "
                     f"the first was kept) -> {layout.duplicates}")
        for g in conflicts[:5]:
            text = g["text"] if len(g["text"]) <= 60 else g["text"][:57] + "..."
            pairs = ", ".join(f"{sp}:{i} {lab}" for sp, i, lab in zip(g["splits"], g["ids"], g["labels"]))
            lines.append(f"    {text!r}: {pairs}")
        if len(conflicts) > 5:
            lines.append(f"    ... {len(conflicts) - 5} more in {layout.summary}")
    if "curves" in summary:
        lines.append(f"  removal/selection curves -> {layout.curves}")
    noise = summary.get("noise")
    if noise:
        f = noise["inspect_fraction"]
        lines.append(f"  noise evaluation: {noise['n_flipped']} labels flipped ({noise['fraction']:g}, seed {noise['seed']}) "
                     f"-> {layout.detection}")
        lines.append(f"    {'method':12s} {'AUC':>7s} {'recall@' + format(f, '.0%'):>12s}")
        for m, d in noise["methods"].items():
            lines.append(f"    {m:12s} {d['auc']:7.3f} {d[f'recall_at_{f:g}']:12.3f}")
    lines.append(f"  summary -> {layout.summary}; `freeshap-ray report {out_dir}` writes the HTML report")
    return lines
