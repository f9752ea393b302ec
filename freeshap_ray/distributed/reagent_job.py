"""The ``reagent`` job on Ray: actors load the model once; prompts, then chunks of target tokens, fan out.

Phase 1 tokenises the prompts and generates greedy targets (prompts spread over the actors). Phase 2
splits every prompt's target tokens into chunks of at most ``fanout.targets_per_task`` (small prompts
are packed together) and hands the chunks to whichever actor is free; inside a chunk all targets and
probes are evaluated in shared batches. Results do not depend on the number of actors or the chunking
(each probe's random stream is keyed by seed, prompt id, target position and probe). Outputs are
written atomically once everything is done; the manifest last.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import ray
from ray.util import ActorPool
from tqdm.auto import tqdm

from ..config import ReagentJobConfig, config_to_dict
from ..errors import ModelError, OutputError

__all__ = ["ReagentWorker", "run_reagent_job", "plan_chunks"]

log = logging.getLogger(__name__)


class ReagentWorker:
    """Holds the model, tokenizer, sampler and engine of one process."""

    def __init__(self, model_dir: str, cfg: ReagentJobConfig, threads: int = 1, device: str = "cpu") -> None:
        import torch

        from ..models import load_lm
        from ..reagent.runner import ReagentRunner

        torch.set_num_threads(max(1, threads))
        lm = load_lm(model_dir, trust_remote_code=cfg.model.trust_remote_code)
        if lm.kind != "causal":
            raise ModelError(f"model.path: {cfg.model.path!r} is a {lm.kind} model; ReAGent needs a causal LM")
        lm.model.to(device)
        self.cfg = cfg
        self.runner = ReagentRunner(lm.model, lm.tokenizer, cfg.reagent, evaluation=cfg.evaluation,
                                    cache_dir=cfg.model.cache_dir, trust_remote_code=cfg.model.trust_remote_code)

    def prepare(self, specs: list) -> list:
        from ..reagent.runner import prepare_prompt

        p = self.cfg.prompts
        return [prepare_prompt(self.runner.model, self.runner.tokenizer, s.text, prompt_id=s.prompt_id, target=s.target,
                               max_new_tokens=p.max_new_tokens, chat_template=p.chat_template) for s in specs]

    def attribute(self, prompts: list, positions: list[np.ndarray]) -> dict:
        out = self.runner.run(prompts, positions)
        return {"attributions": out.attributions, "metrics": out.metrics, "stats": out.stats}


def plan_chunks(prompts: list, per_task: int) -> list[tuple[list, list[np.ndarray]]]:
    """Chunks of at most ``per_task`` targets: large prompts are split, small ones packed together."""
    chunks: list[tuple[list, list[np.ndarray]]] = []
    cur_p: list = []
    cur_pos: list[np.ndarray] = []
    size = 0
    for pp in prompts:
        pos = pp.target_positions
        for s in range(0, len(pos), per_task):
            part = pos[s : s + per_task]
            if size + len(part) > per_task and cur_p:
                chunks.append((cur_p, cur_pos))
                cur_p, cur_pos, size = [], [], 0
            cur_p.append(pp)
            cur_pos.append(part)
            size += len(part)
    if cur_p:
        chunks.append((cur_p, cur_pos))
    return chunks


def run_reagent_job(cfg: ReagentJobConfig, *, overwrite: bool = False, progress: bool = True) -> dict:
    """Run a ReAGent job on the current Ray runtime and write its outputs under ``cfg.output``."""
    from ..io.reagent_store import (
        ReagentLayout,
        attributions_table,
        metrics_table,
        prompts_table,
        write_reagent_outputs,
    )
    from ..models import resolve_model_path
    from ..io import versions
    from ..reagent.html import heatmap_html
    from ..reagent.prompts import read_prompts
    from ..reagent.results import assemble_results

    layout = ReagentLayout(cfg.output)
    existing = [p for p in layout.all() if p.exists()]
    if existing and not overwrite:
        raise OutputError(f"output: {existing[0]} exists (ReAGent results); pass --overwrite to replace it")
    specs = read_prompts(cfg.prompts)
    model_dir = resolve_model_path(cfg.model.path, cache_dir=cfg.model.cache_dir, seed=cfg.model.seed)

    t0 = time.perf_counter()
    f = cfg.fanout
    threads = cfg.model.threads or max(1, int(round(f.num_cpus_per_actor)))
    device = "cuda" if f.num_gpus_per_actor > 0 else "cpu"
    actor_cls = ray.remote(num_cpus=f.num_cpus_per_actor, num_gpus=f.num_gpus_per_actor)(ReagentWorker)
    n_actors = min(f.num_actors, len(specs) * 64)
    actors = [actor_cls.remote(str(model_dir), cfg, threads, device) for _ in range(n_actors)]
    try:
        groups = [specs[i :: n_actors] for i in range(n_actors)]
        prepared = [pp for batch in ray.get([a.prepare.remote(g) for a, g in zip(actors, groups) if g]) for pp in batch]
        order = {s.prompt_id: k for k, s in enumerate(specs)}
        prepared.sort(key=lambda pp: order[pp.prompt_id])  # input order
        t_prep = time.perf_counter() - t0

        chunks = plan_chunks(prepared, f.targets_per_task)
        n_targets = sum(len(pp.target_positions) for pp in prepared)
        results = []
        bar = tqdm(total=n_targets, desc="reagent targets", unit="token", disable=not progress)
        t1 = time.perf_counter()
        for res in ActorPool(actors).map_unordered(lambda a, c: a.attribute.remote(c[0], c[1]), chunks):
            results.append(res)
            bar.update(res["stats"]["targets"])
        bar.close()
        t_attr = time.perf_counter() - t1
    finally:
        for a in actors:
            ray.kill(a)

    out = assemble_results(prepared, results, cfg.evaluation.baselines)
    summary = {**out.summary, "seconds": {"prepare": t_prep, "attribute": t_attr, "total": time.perf_counter() - t0},
               "num_actors": n_actors}
    if "metrics_mean" in summary:  # keep the manifest's key order: counters, seconds, actors, metric means
        summary["metrics_mean"] = summary.pop("metrics_mean")
    manifest = {"config": config_to_dict(cfg), "versions": versions(), "model_dir": str(model_dir), "summary": summary,
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    table = attributions_table(out.attributions)
    write_reagent_outputs(
        Path(cfg.output), table, prompts_table(out.prompts),
        metrics=metrics_table(out.metrics) if cfg.evaluation.metrics else None,
        html=heatmap_html(table, title="ReAGent token attributions"), manifest=manifest,
    )
    return summary
