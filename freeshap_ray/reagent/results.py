"""Assemble a ReAGent job's results from the chunks its workers returned (pure; no Ray, no I/O).

Rows are ordered by method (ReAGent first), then prompt (input order), target position and source position;
each prompt's target text is the decoded target tokens in order; the summary adds up the workers' counters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["JobResults", "assemble_results"]


@dataclass
class JobResults:
    """What a ReAGent job writes: attribution and metric rows, one row per prompt, and the summary."""

    attributions: list[dict[str, Any]]
    metrics: list[dict[str, Any]]
    prompts: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)


def assemble_results(prepared: list, chunks: list[dict[str, Any]], baselines: tuple[str, ...] | list[str]) -> JobResults:
    """Merge the workers' ``{"attributions", "metrics", "stats"}`` chunks of the prompts ``prepared`` (input order)."""
    order = {pp.prompt_id: k for k, pp in enumerate(prepared)}
    attributions = [r for c in chunks for r in c["attributions"]]
    metrics = [r for c in chunks for r in c["metrics"]]
    stats = [c["stats"] for c in chunks]
    attributions.sort(key=lambda r: (r["method"] != "reagent", r["method"], order[r["prompt_id"]], r["target_pos"],
                                     r["source_pos"]))
    metrics.sort(key=lambda r: (r["method"] != "reagent", r["method"], order[r["prompt_id"]], r["target_pos"]))
    pieces: dict[int, dict[int, str]] = {}
    for r in attributions:  # target text = the decoded target tokens, in order
        if r["method"] == "reagent" and r["source_pos"] == 0:
            pieces.setdefault(r["prompt_id"], {})[r["target_pos"]] = r["target_token"]
    prompts = []
    for pp in prepared:
        got = pieces.get(pp.prompt_id, {})
        prompts.append(dict(prompt_id=pp.prompt_id, prompt=pp.text, target_text="".join(got[k] for k in sorted(got)),
                            n_prompt_tokens=pp.n_prompt, n_targets=len(pp.target_positions), generated=pp.generated))
    summary: dict[str, Any] = {
        "prompts": len(prepared),
        "targets": sum(len(pp.target_positions) for pp in prepared),
        "converged_targets": int(sum(s["converged"] for s in stats)),
        "forward_rows": int(sum(s["forward_rows"] for s in stats)),
        "forward_calls": int(sum(s["forward_calls"] for s in stats)),
        "forward_tokens": int(sum(s.get("forward_tokens", 0) for s in stats)),
        "packed_forward": bool(stats) and all(s.get("packed_forward", False) for s in stats),
    }
    if metrics:
        means: dict[str, dict[str, list[float]]] = {}
        for r in metrics:
            m = means.setdefault(r["method"], {"log_soft_ns": [], "log_soft_nc": []})
            m["log_soft_ns"].append(r["log_soft_ns"])
            m["log_soft_nc"].append(r["log_soft_nc"])
        summary["metrics_mean"] = {
            name: {k: float(sum(v) / len(v)) for k, v in means[name].items()}
            for name in ["reagent", *baselines] if name in means}
    return JobResults(attributions, metrics, prompts, summary)
