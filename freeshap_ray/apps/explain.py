"""Explain a prediction: which training examples of a finished run drove the surrogate's output for a new text.

For each new text x the kernel row k(x, ·) against the training set is computed with the run's model,
parameter selection, projection and kernel scaling (tile by tile, as the kernel job would for x appended to
the test set); the kernel regression trained on every example gives the prediction F_N(x) (C,). The text is
then a one-point test set: the Shapley value of training example i is its average marginal contribution to
U(S) = softmax(F_S(x))[y] (``prob``) or F_S(x)[y] - max_{c != y} F_S(x)[c] (``margin``), y the predicted
class or the class the user names (:mod:`freeshap_ray.valuation.one_point`), estimated by (truncated)
Monte-Carlo permutations with the engine's pieces.

Where it runs: with Ray initialised (or kernel actors given) the rows are computed by KernelWorker actors and
the permutations by Ray tasks (:func:`~freeshap_ray.distributed.shapley_job.run_valuation`); otherwise both
in this process. Both give the same rows and, for the same seed, the same values.

Speed: a kernel row needs the training examples' gradient features. They are computed once and cached under
``OUT/explain/train_features/`` (:class:`~freeshap_ray.io.feature_cache.FeatureCache`, keyed by the kernel
plan's signature); afterwards a text costs one forward+backward pass, its tiles against the cached blocks
and its permutations. A projected run (``kernel.projection_dim > 0``) needs no cache and nothing n×n: the
training features are the run's features dataset, a text's row is ``φ(x)·Φᵀ`` of its projected features
``φ(x)``, the surrogate is :class:`~freeshap_ray.apps.FeatureSurrogate` and the permutations run on the
feature-space (primal) regression.

Stored explanations (``explanations.parquet``, :func:`run_explain_stage`, ``freeshap-ray explain``): an
explanation is identified by (text, utility, requested label); one stored with the same estimation settings
(permutations, seed, truncation, sampler) for the same run is reused, others are added, and one stored with
other settings is refused unless ``overwrite`` (then it is replaced).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..config import ExplainConfig, ShapleyConfig, build_section
from ..errors import ConfigError, DataError, OutputError
from ..io import Layout
from ..io.explanations import explanations_table, read_explanations, write_explanations
from ..io.feature_cache import FeatureCache
from ..io.run import FinishedRun, read_finished_run
from ..kernel.ntk import feature_kernel
from ..kernel.plan import blocks, plan_signature
from ..kernel.rows import Block, TrainFeatures, kernel_rows
from ..utility import FeatureProblem, RegressionProblem
from ..valuation.aggregate import Estimate
from ..valuation.one_point import EXPLAIN_UTILITIES, one_point_values, softmax, target_labels, one_point_problem
from ..valuation.settings import ValuationSettings
from ..valuation.sinks import MemorySink
from .feature_surrogate import FeatureSurrogate
from .kernel_baselines import KernelSurrogate

__all__ = ["Explainer", "Explanation", "explain", "run_explain_stage", "summary_lines"]

log = logging.getLogger(__name__)


def _ray_up() -> bool:
    """Ray is initialised in this process (never imports Ray when nothing has)."""
    if "ray" not in sys.modules:
        return False
    from ..distributed.explain_job import ray_is_up

    return ray_is_up()


# --------------------------------------------------------------------------------------------------
# Where kernel rows are computed


class RowEngine(Protocol):
    """Computes gradient blocks and kernel rows (in this process, or on Ray actors)."""

    def gradient_blocks(self, texts: list[list[str]]) -> Any:
        """Iterator of ``(i, block)``: the gradient block of ``texts[i]``, in any order."""

    def use_train(self, train: TrainFeatures) -> None:
        """The training blocks later rows are computed against."""

    def rows(self, texts: list[str]) -> np.ndarray:
        """``(m, n)`` or ``(m, n, C, C)`` float64 kernel rows."""

    def features(self, texts: list[str]) -> np.ndarray:
        """``(m·C', D)`` float32 projected features of ``texts`` (a projected run's; rows example-major)."""

    def close(self) -> None:
        """Release what the engine started."""


@dataclass
class _MemoryFeatures:
    """Training blocks held in memory (a :class:`TrainFeatures`)."""

    bounds: list[tuple[int, int]]
    blocks: list[Block]

    def block(self, b: int) -> Block:
        return self.blocks[b]


class _LocalRows:
    """Rows in this process, from one :class:`~freeshap_ray.kernel.worker.KernelWorker`."""

    def __init__(self, model_dir: Path, run: FinishedRun):
        from ..kernel.worker import KernelWorker

        self.worker = KernelWorker(model_dir, run.config.model, run.config.kernel)
        self.kernel_cfg = run.config.kernel
        self.train: TrainFeatures | None = None

    def gradient_blocks(self, texts: list[list[str]]):
        for i, t in enumerate(texts):
            yield i, self.worker.jacobian(list(t))

    def use_train(self, train: TrainFeatures) -> None:
        self.train = train

    def rows(self, texts: list[str]) -> np.ndarray:
        return kernel_rows(self.worker, texts, self.train, block_size=self.kernel_cfg.block_size,
                           chunk=self.kernel_cfg.chunk_params)

    def features(self, texts: list[str]) -> np.ndarray:
        return np.concatenate([self.worker.features(list(texts[a:b]))
                               for a, b in blocks(len(texts), self.kernel_cfg.block_size)])

    def close(self) -> None:
        self.train = None


# --------------------------------------------------------------------------------------------------
# The result


@dataclass
class Explanation:
    """Shapley values of the training examples for the surrogate's prediction on each of m new texts.

    Attributes:
        texts: the m texts.
        label_names: the C class names.
        scores: ``(m, C)`` the kernel regression's prediction F_N(x) trained on every example.
        prediction: ``(m, C)`` its class probabilities, softmax(scores).
        label: ``(m,)`` the class each game is about (predicted, or the one asked for).
        utility: ``prob`` or ``margin``.
        values, stderr: ``(m, n)`` Shapley value of each training example per text, and its standard error.
        counts: ``(m, n)`` sampled marginals behind each value.
        k_test_train: ``(m, n)`` kernel rows (``(m, n, C, C)`` for the full kernel), unscaled.
        u_full, u_empty: ``(m,)`` U(N) and U(∅) of each game (the values sum to their difference; see
            :mod:`freeshap_ray.valuation.one_point` for what holds under truncation).
        train: the training examples (``index``, ``id``, ``text``, ``label``, ``label_name``).
        train_loo_label: ``(n,)`` what the surrogate fitted on all OTHER examples predicts for each one; a
            training label that differs is a suspect label.
        settings: how the values were estimated.
        info: timings (``seconds``), permutations, mean truncation point per text, reused texts.
    """

    texts: list[str]
    label_names: list[str]
    scores: np.ndarray
    prediction: np.ndarray
    label: np.ndarray
    utility: str
    values: np.ndarray
    stderr: np.ndarray
    counts: np.ndarray
    k_test_train: np.ndarray
    u_full: np.ndarray
    u_empty: np.ndarray
    train: pa.Table
    train_loo_label: np.ndarray
    settings: ExplainConfig
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def predicted_label(self) -> np.ndarray:
        """``(m,)`` argmax of the surrogate's prediction."""
        return np.argmax(self.scores, axis=1)

    def table(self, top: int | None = None):
        """The most helpful and most harmful training examples of each text, as a pandas DataFrame.

        Args:
            top: examples per side (default ``settings.top``); helpful ones have value > 0, harmful < 0.

        Returns:
            Columns ``text_id``, ``effect`` (``helpful``/``harmful``), ``rank`` (1 = strongest), ``train_index``,
            ``train_id``, ``train_text``, ``train_label``, ``train_loo_label`` (names), ``suspect_label``
            (the two differ), ``value``, ``stderr``; helpful rows first, by decreasing |value|.
        """
        import pandas as pd

        k = self.settings.top if top is None else int(top)
        if k < 1:
            raise ValueError(f"top: must be >= 1, got {k}")
        names = self.label_names
        texts = self.train.column("text").to_pylist()
        ids = self.train.column("id").to_numpy()
        labels = self.train.column("label").to_numpy()
        rows = []
        for t in range(len(self.texts)):
            v = self.values[t]
            order = np.argsort(-v, kind="stable")
            worst = order[::-1]
            for effect, picks in (("helpful", order[v[order] > 0][:k]), ("harmful", worst[v[worst] < 0][:k])):
                for r, i in enumerate(picks, 1):
                    rows.append({"text_id": t, "effect": effect, "rank": r, "train_index": int(i),
                                 "train_id": int(ids[i]),
                                 "train_text": texts[i], "train_label": names[labels[i]],
                                 "train_loo_label": names[self.train_loo_label[i]],
                                 "suspect_label": bool(labels[i] != self.train_loo_label[i]),
                                 "value": float(v[i]), "stderr": float(self.stderr[t, i])})
        cols = ["text_id", "effect", "rank", "train_index", "train_id", "train_text", "train_label", "train_loo_label",
                "suspect_label", "value", "stderr"]
        return pd.DataFrame(rows, columns=cols)


# --------------------------------------------------------------------------------------------------
# The explainer: a finished run, loaded once


def _resolve_label(label: int | str | None, names: list[str]) -> int | None:
    """``explain.label`` as a class index (a name in ``data.label_names`` or an index)."""
    if label is None:
        return None
    if isinstance(label, str):
        if label in names:
            return names.index(label)
        if label.strip().lstrip("-").isdigit():
            label = int(label.strip())
        else:
            raise ConfigError(f"explain.label: {label!r} is not a class of this run ({names})")
    if not 0 <= label < len(names):
        raise ConfigError(f"explain.label: class index {label} outside [0, {len(names) - 1}] ({names})")
    return int(label)


def _check_texts(texts: str | list[str], where: str = "texts") -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise DataError(f"{where}: give at least one text")
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise DataError(f"{where}[{i}]: empty or not a text ({t!r})")
    return texts


class Explainer:
    """A finished run loaded once for explaining new texts: kernel surrogate, training set, model, cached
    training gradients. Construction reads and checks the run (kernel, examples, config) and factorises the
    surrogate; :meth:`prepare` (called by the first kernel row) loads the model and the training gradients
    (building their cache on a run's first use); :meth:`explain` then costs one forward+backward pass per text,
    its tiles and its permutations.

    Args:
        out_dir: the run's output directory.
        actors: KernelWorker Ray actors over the whole parameter selection to compute rows with (reused, not
            killed); None: ``num_actors`` are started when Ray is used.
        num_actors: actors started when Ray is used and none are given.
        use_ray: compute rows on kernel actors and permutations as Ray tasks (Ray is started if needed);
            False: everything in this process; None: Ray when actors are given or Ray is initialised.
        overwrite: recompute cached training-gradient blocks that fail validation (else an error names the file).
        progress: progress bars.

    Raises:
        OutputError: the run is missing, unfinished or inconsistent (the message names the file).
    """

    def __init__(self, out_dir: str | Path, *, actors: list | None = None, num_actors: int = 1,
                 use_ray: bool | None = None, overwrite: bool = False, progress: bool = False):
        t0 = time.perf_counter()
        self.run = run = read_finished_run(out_dir)
        cfg = run.config
        self.layout: Layout = run.layout
        self.label_names = list(cfg.data.label_names)
        self.train_texts = run.train.column("text").to_pylist()
        self.y_train = run.train.column("label").to_numpy().astype(np.int64)
        signature = plan_signature(self.train_texts, run.test.column("text").to_pylist(), cfg.model, cfg.kernel)
        if signature != run.kernel_info.get("signature"):
            raise OutputError(f"{self.layout.manifest}: its model/kernel config or the examples do not match the "
                              f"kernel in {self.layout.kernel_dir} (another config's kernel?); recompute the kernel")
        y_test = run.test.column("label").to_numpy()
        if run.projected:  # features dataset: D×D factorisations only
            self.problem = FeatureProblem.from_features(*run.features, self.y_train, y_test,
                                                        n_classes=len(self.label_names), lam=cfg.shapley.lam,
                                                        kernel_divisor=cfg.shapley.kernel_divisor,
                                                        kind=run.kernel_info["kind"])
            self.surrogate = FeatureSurrogate.fit(self.problem)
        else:
            self.problem = run.kernel.problem(self.y_train, y_test, lam=cfg.shapley.lam,
                                              kernel_divisor=cfg.shapley.kernel_divisor)
            self.surrogate = KernelSurrogate.fit(self.problem)
        self.train_loo_label = np.argmax(self.surrogate.loo_train_predictions(), axis=1)
        self.identity = {"kernel": signature, "lam": cfg.shapley.lam, "kernel_divisor": cfg.shapley.kernel_divisor,
                         "labels": hashlib.sha256(self.y_train.tobytes()).hexdigest()[:16]}
        if use_ray is False and actors is not None:
            raise ConfigError("use_ray: False, but Ray actors were given")
        self.use_ray = (actors is not None or _ray_up()) if use_ray is None else bool(use_ray)
        self.seconds = {"read_run": time.perf_counter() - t0}
        self._engine_args = (actors, num_actors, overwrite, progress)
        self._engine: RowEngine | None = None

    def prepare(self) -> None:
        """Load the model (in this process or on kernel actors) and the training gradients (computed and cached
        under ``OUT/explain/train_features`` when missing); idempotent."""
        if self._engine is not None:
            return
        actors, num_actors, overwrite, progress = self._engine_args
        t0 = time.perf_counter()
        engine = self._make_engine(actors, num_actors)
        self.seconds["load_model"] = time.perf_counter() - t0
        try:  # a projected run's training features are its features dataset, read with the run
            self.seconds["train_features"] = (0.0 if self.run.projected else
                                              self._load_train_features(engine, overwrite, progress))
        except BaseException:
            engine.close()
            raise
        self._engine = engine

    @property
    def engine(self) -> RowEngine:
        """Where kernel rows are computed (prepared on first use)."""
        self.prepare()
        return self._engine

    def _make_engine(self, actors, num_actors: int) -> RowEngine:
        from ..models import resolve_model_path

        cfg = self.run.config
        model_dir = resolve_model_path(cfg.model.path, cache_dir=cfg.model.cache_dir, seed=cfg.model.seed)
        if not self.use_ray:
            return _LocalRows(model_dir, self.run)
        from ..distributed import ensure_ray
        from ..distributed.explain_job import RayKernelRows

        ensure_ray()
        return RayKernelRows(model_dir, cfg.model, cfg.kernel, actors=actors, num_actors=num_actors)

    def _load_train_features(self, engine: RowEngine, overwrite: bool, progress: bool) -> float:
        """Compute and cache the missing training blocks, then hold every block in memory; returns the seconds
        spent computing blocks (0 when the cache was complete). A cached block that fails validation is an
        error naming its file, or with ``overwrite`` is recomputed."""
        from tqdm.auto import tqdm

        cfg = self.run.config
        bounds = blocks(len(self.train_texts), cfg.kernel.block_size)
        cache = FeatureCache(self.layout, bounds)
        cache.open({"signature": self.identity["kernel"], "method": cfg.kernel.method,
                    "projection": [cfg.kernel.projection_dim, cfg.kernel.projection_seed, cfg.kernel.projection_block]})
        seconds = 0.0

        def compute(which: list[int]) -> None:
            nonlocal seconds
            t0 = time.perf_counter()
            todo = [self.train_texts[bounds[b][0]:bounds[b][1]] for b in which]
            bar = tqdm(total=len(todo), desc="training gradients (cached once)", unit="block", disable=not progress)
            for i, block in engine.gradient_blocks(todo):
                cache.write(which[i], block)
                bar.update(1)
            bar.close()
            seconds += time.perf_counter() - t0

        if missing := cache.missing():
            compute(missing)
        held = []
        for b in range(len(bounds)):
            try:
                held.append(cache.block(b))
            except OutputError:
                if not overwrite:
                    raise
                compute([b])
                held.append(cache.block(b))
        engine.use_train(_MemoryFeatures(bounds, held))
        return seconds

    def close(self) -> None:
        """Release the kernel actors this explainer started."""
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    def __enter__(self) -> Explainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----------------------------------------------------------------------------------------------

    @property
    def n(self) -> int:
        return int(self.y_train.size)

    def kernel_rows(self, texts: str | list[str]) -> np.ndarray:
        """``(m, n)`` (or ``(m, n, C, C)``) unscaled kernel rows of new texts against the training set."""
        return self._test_side(_check_texts(texts))[0]

    def _test_side(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
        """(kernel rows, the texts' projected features ``(m·C', D)`` or None for an exact run)."""
        if not self.run.projected:
            return self.engine.rows(texts), None
        phi = self.engine.features(texts)
        g = self.problem.group
        return feature_kernel(phi, self.run.features[0], g), phi

    def _problem(self, rows: np.ndarray, label: int | None,
                 phi: np.ndarray | None = None) -> tuple[RegressionProblem | FeatureProblem, np.ndarray]:
        """The regression with the new texts as test set (kernel ``rows``, or their features ``phi`` on a projected
        run), each test label the class its game is about, and the surrogate's scores ``(m, C)`` for the texts
        (from the factorisation made once)."""
        cfg = self.run.config
        m = rows.shape[0]
        if self.run.projected:
            if phi is None:
                raise ValueError("phi: a projected run's regression needs the texts' features")
            problem = FeatureProblem.from_features(self.run.features[0], phi, self.y_train, np.zeros(m, np.int64),
                                                   n_classes=len(self.label_names), lam=cfg.shapley.lam,
                                                   kernel_divisor=cfg.shapley.kernel_divisor,
                                                   kind=self.run.kernel_info["kind"])
            scores = problem.reshape_predictions(problem.test_features() @ self.surrogate.theta)
        else:
            problem = RegressionProblem.from_kernels(self.run.kernel.train_train, rows, self.y_train,
                                                     np.zeros(m, np.int64), n_classes=len(self.label_names),
                                                     lam=cfg.shapley.lam, kernel_divisor=cfg.shapley.kernel_divisor)
            scores = problem.reshape_predictions(problem.KT @ self.surrogate.alpha)
        targets = target_labels(scores, label)
        targets.setflags(write=False)
        return dataclasses.replace(problem, y_test=targets), scores

    def _settings(self, config: ExplainConfig) -> ValuationSettings:
        shapley = ShapleyConfig(n_permutations=config.n_permutations, truncation_tol=config.truncation_tol,
                                truncation_patience=config.truncation_patience, seed=config.seed,
                                sampler=config.sampler, permutations_per_task=config.permutations_per_task,
                                resume=False, estimator="tmc", convergence="none", max_seconds=None)
        return ValuationSettings.of(shapley, EXPLAIN_UTILITIES[config.utility])

    def _values(self, problem: RegressionProblem | FeatureProblem, settings: ValuationSettings) -> Estimate:
        if self.use_ray:
            from ..distributed.shapley_job import run_valuation

            return run_valuation(problem, settings, MemorySink(), progress=False)
        return one_point_values(problem, settings)

    def explain(self, texts: str | list[str], config: ExplainConfig | None = None, *,
                reuse: dict[int, dict[str, np.ndarray]] | None = None, on_text=None,
                progress: bool = False) -> Explanation:
        """Explain the surrogate's prediction on each text.

        Args:
            texts: one text or a list.
            config: the ``explain.*`` settings (default :class:`ExplainConfig`).
            reuse: text position → stored ``values``/``stderr``/``counts`` (n,) to use instead of estimating.
            on_text: called as ``on_text(i, explanation_so_far)`` after text i's values are known.
            progress: a progress bar over the texts.

        Returns:
            :class:`Explanation`.
        """
        from tqdm.auto import tqdm

        config = config or ExplainConfig()
        texts = _check_texts(texts)
        label = _resolve_label(config.label, self.label_names)
        self.prepare()
        t0 = time.perf_counter()
        rows, phi = self._test_side(texts)
        t1 = time.perf_counter()
        problem, scores = self._problem(rows, label, phi)
        settings = self._settings(config)
        m, n = len(texts), self.n
        util = EXPLAIN_UTILITIES[config.utility]
        expl = Explanation(
            texts=texts, label_names=self.label_names, scores=scores, prediction=softmax(scores),
            label=np.asarray(problem.y_test), utility=config.utility, values=np.zeros((m, n)),
            stderr=np.full((m, n), np.inf), counts=np.zeros((m, n), dtype=np.int64), k_test_train=rows,
            u_full=np.zeros(m), u_empty=np.full(m, util.empty_value(np.zeros(1, np.int64), len(self.label_names))),
            train=self.run.train, train_loo_label=self.train_loo_label, settings=config)
        per_text, truncated, first = [], [], {}
        for i in tqdm(range(m), desc="explaining", unit="text", disable=not progress):
            s = time.perf_counter()
            single = one_point_problem(problem, i)
            if reuse and i in reuse:
                got = reuse[i]
            elif texts[i] in first:  # the same text twice: one game
                got = first[texts[i]]
            else:
                est = self._values(single, settings)
                got = {"values": est.values.values, "stderr": est.values.stderr, "counts": est.values.counts,
                       "u_full": est.info["v_full"]}
                truncated.append(est.info.get("mean_truncated_at", float("nan")))
            first.setdefault(texts[i], got)
            expl.u_full[i] = got["u_full"] if "u_full" in got else float(
                np.mean(util.per_test(single.predict(None), single.y_test)))
            expl.values[i], expl.stderr[i], expl.counts[i] = got["values"], got["stderr"], got["counts"]
            per_text.append(time.perf_counter() - s)
            if on_text is not None:
                on_text(i, expl)
        expl.info = {"seconds": {"rows": t1 - t0, "values": float(sum(per_text)), "per_text_values": per_text},
                     "n_permutations": config.n_permutations, "mean_truncated_at": truncated,
                     "ray": self.use_ray, "reused": sorted(reuse or ())}
        return expl


# --------------------------------------------------------------------------------------------------
# The public function and the stage (explanations.parquet)


def explain(out_dir: str | Path, texts: str | list[str], *, utility: str = "prob", label: int | str | None = None,
            n_permutations: int = 200, truncation_tol: float = 0.05, truncation_patience: int = 2,
            sampler: str = "tmc", seed: int = 0, top: int = 10, permutations_per_task: int = 25,
            num_actors: int = 1, actors: list | None = None, use_ray: bool | None = None,
            explainer: Explainer | None = None, save: bool = False, overwrite: bool = False,
            progress: bool = False) -> Explanation:
    """Which training examples of the finished run in ``out_dir`` drove its surrogate's output for ``texts``.

    Keywords named like ``explain.*`` keys take that key's values (:class:`~freeshap_ray.config.ExplainConfig`):
    ``utility`` (``prob`` | ``margin``), ``label`` (class name or index to explain, "why not X?"; None: the
    predicted class), ``n_permutations``, ``truncation_tol``, ``truncation_patience``, ``sampler``, ``seed``,
    ``top``, ``permutations_per_task``, ``num_actors``. A bad value is a ConfigError naming the key.

    Args:
        out_dir: a run's output directory (kernel stage finished).
        texts: one text or a list of texts.
        actors, use_ray: kernel actors to reuse, and whether to use Ray (see :class:`Explainer`).
        explainer: an :class:`Explainer` of ``out_dir`` already loaded (its model is reused; not closed here).
        save: also store the explanations in ``OUT/explanations.parquet`` (texts already stored with the
            same settings are reused, see :func:`run_explain_stage`); ``overwrite`` replaces stored
            explanations of these texts made with other settings.

    Returns:
        :class:`Explanation`: ``.prediction`` (m, C), ``.values`` / ``.stderr`` (m, n), ``.k_test_train``,
        ``.table(top)``.

    Runs in this process without Ray; when Ray is initialised (or ``use_ray``) the rows are computed by kernel
    actors and the permutations by Ray tasks.
    """
    keys = {k: v for k, v in locals().items() if k in _CONFIG_KEYS}
    config = build_section(ExplainConfig, keys, "explain.")
    texts = _check_texts(texts)
    own = explainer is None
    ex = explainer or Explainer(out_dir, actors=actors, num_actors=config.num_actors, use_ray=use_ray,
                                overwrite=overwrite, progress=progress)
    try:
        if save:
            return run_explain_stage(ex, texts, config, overwrite=overwrite, progress=progress)
        return ex.explain(texts, config, progress=progress)
    finally:
        if own:
            ex.close()


_CONFIG_KEYS = frozenset(f.name for f in dataclasses.fields(ExplainConfig))


def _settings_key(explainer: Explainer, config: ExplainConfig) -> dict[str, Any]:
    """What decides an explanation's values: the estimation settings (label as a class index) and the run."""
    key = config.estimation_key()
    key["label"] = _resolve_label(config.label, explainer.label_names)
    return {**key, "run": explainer.identity}


def _question(text: str, settings: dict[str, Any]) -> str:
    """What identifies a stored explanation: the text, the utility and the requested class."""
    return json.dumps([text, settings["utility"], settings["label"]])


def _long_table(expl: Explanation, i: int, text_id: int, settings: str) -> pa.Table:
    """One text's rows of ``explanations.parquet``."""
    n = expl.values.shape[1]
    names = expl.label_names
    v = expl.values[i]
    rank = np.empty(n, dtype=np.int64)
    rank[np.argsort(-v, kind="stable")] = np.arange(1, n + 1)
    k = expl.k_test_train[i] if expl.k_test_train.ndim == 2 else expl.k_test_train[i, :, 0, 0]
    labels = expl.train.column("label").to_numpy()
    label, predicted = int(expl.label[i]), int(expl.predicted_label[i])
    cols = {
        "text_id": np.full(n, text_id, dtype=np.int64), "text": [expl.texts[i]] * n, "settings": [settings] * n,
        "utility": [expl.utility] * n, "label": np.full(n, label, dtype=np.int64), "label_name": [names[label]] * n,
        "predicted_label": np.full(n, predicted, dtype=np.int64), "predicted_label_name": [names[predicted]] * n,
        "prediction": np.repeat(expl.prediction[i][None], n, axis=0),
        "u_full": np.full(n, expl.u_full[i]), "u_empty": np.full(n, expl.u_empty[i]),
        "index": expl.train.column("index").to_numpy(), "id": expl.train.column("id").to_numpy(),
        "train_label": labels, "train_label_name": [names[c] for c in labels],
        "train_loo_label": expl.train_loo_label.astype(np.int64), "kernel": np.asarray(k, dtype=np.float64),
        "value": v, "stderr": expl.stderr[i], "count": expl.counts[i].astype(np.int64), "rank": rank,
    }
    return explanations_table(cols)


def _stored_by_question(stored: pa.Table | None) -> dict[str, pa.Table]:
    """Stored explanations by question, in the order they were first stored."""
    if stored is None or not stored.num_rows:
        return {}
    ids = stored.column("text_id").to_numpy()
    out = {}
    for tid in dict.fromkeys(ids.tolist()):
        part = stored.filter(pc.equal(stored.column("text_id"), tid))
        try:
            settings = json.loads(part.column("settings")[0].as_py())
            out[_question(part.column("text")[0].as_py(), settings)] = part
        except (ValueError, KeyError, TypeError):
            out[f"unreadable:{tid}"] = part  # kept as is, never matched
    return out


def run_explain_stage(explainer: Explainer, texts: list[str], config: ExplainConfig, *, overwrite: bool = False,
                      progress: bool = False) -> Explanation:
    """Explain ``texts`` and store them in ``OUT/explanations.parquet``, resumably.

    An explanation is identified by (text, utility, requested class). One stored with the same estimation
    settings for the same run is reused (its values are not re-estimated; its kernel row and prediction are
    recomputed, which is cheap); new ones are added; one stored with other settings (permutations, seed,
    truncation, sampler, or a recomputed run) is an error unless ``overwrite`` (then it is replaced, keeping its
    ``text_id``). The file is rewritten atomically after every text, so a killed run keeps the texts it finished.

    Raises:
        OutputError: a stored explanation of one of these texts made with other settings (without ``overwrite``).
    """
    layout = explainer.layout
    key = _settings_key(explainer, config)
    settings = json.dumps(key, sort_keys=True)
    kept = _stored_by_question(read_explanations(layout))
    next_id = max((int(t.column("text_id")[0].as_py()) for t in kept.values()), default=-1) + 1
    questions = [_question(t, key) for t in texts]
    reuse: dict[int, dict[str, np.ndarray]] = {}
    text_ids: dict[str, int] = {}
    for i, q in enumerate(questions):
        old = kept.get(q)
        if old is None:
            text_ids.setdefault(q, next_id)
            next_id = max(next_id, text_ids[q] + 1)
            continue
        text_ids[q] = int(old.column("text_id")[0].as_py())
        if old.column("settings")[0].as_py() == settings and old.num_rows == explainer.n:
            t = old.sort_by("index")
            reuse[i] = {"values": t.column("value").to_numpy(), "stderr": t.column("stderr").to_numpy(),
                        "counts": t.column("count").to_numpy()}
        elif not overwrite:
            theirs = json.loads(old.column("settings")[0].as_py())
            diff = [k for k in key if theirs.get(k) != json.loads(settings)[k]]
            raise OutputError(f"{layout.explanations}: {texts[i][:60]!r} is stored with other settings "
                              f"({', '.join(diff) or 'rows'} differ); pass --overwrite (overwrite=True) to replace it")

    def store(i: int, expl: Explanation) -> None:
        if i in reuse:
            return
        kept[questions[i]] = _long_table(expl, i, text_ids[questions[i]], settings)
        ordered = sorted(kept.values(), key=lambda t: t.column("text_id")[0].as_py())
        write_explanations(layout, pa.concat_tables(ordered))

    expl = explainer.explain(texts, config, reuse=reuse, on_text=store, progress=progress)
    expl.info["text_ids"] = [text_ids[q] for q in questions]
    expl.info["stored"] = str(layout.explanations)
    return expl


def summary_lines(expl: Explanation, top: int | None = None, width: int = 80) -> list[str]:
    """The prediction and the most helpful / harmful training examples of each text, with ± stderr."""
    k = expl.settings.top if top is None else top
    table = expl.table(k)
    out = []
    for t, text in enumerate(expl.texts):
        shown = text if len(text) <= width else text[: width - 3] + "..."
        probs = ", ".join(f"{n} {p:.3f}" for n, p in zip(expl.label_names, expl.prediction[t]))
        out.append(f"[{t}] {shown}")
        out.append(f"  prediction: {probs} -> {expl.label_names[expl.predicted_label[t]]}; explaining "
                   f"{expl.utility}({expl.label_names[expl.label[t]]}): U(N) = {expl.u_full[t]:.4f}, "
                   f"U(empty) = {expl.u_empty[t]:.4f}")
        for effect in ("helpful", "harmful"):
            rows = table[(table.text_id == t) & (table.effect == effect)]
            out.append(f"  most {effect}:" + ("" if len(rows) else " none"))
            for _, r in rows.iterrows():
                tr = r.train_text if len(r.train_text) <= width - 30 else r.train_text[: width - 33] + "..."
                flag = f"  (suspect label: the other examples say {r.train_loo_label})" if r.suspect_label else ""
                out.append(f"    {r.value:+.4f} ± {r.stderr:.4f}  #{r.train_index} [{r.train_label}] {tr}{flag}")
    return out
