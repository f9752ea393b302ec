"""Prompt preparation (chat template, given or greedy targets) and the per-process attribution runner
shared by :func:`freeshap_ray.reagent_attribute` and the Ray actors of the ``reagent`` job."""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import ReagentConfig, ReagentEvalConfig
from ..errors import ConfigError
from .algorithm import ReagentEngine, Target, TargetResult
from .gradient_baselines import baseline_scores
from .lm import TargetLM, special_token_ids
from .metrics import soft_faithfulness
from .samplers import Sampler, build_sampler

__all__ = ["PreparedPrompt", "prepare_prompt", "greedy_generate", "ReagentRunner"]


@dataclass
class PreparedPrompt:
    """A tokenised prompt with its target tokens appended: targets are ``ids[n_prompt:]``."""

    prompt_id: int
    text: str
    ids: np.ndarray
    n_prompt: int
    generated: bool

    @property
    def target_positions(self) -> np.ndarray:
        return np.arange(self.n_prompt, len(self.ids), dtype=np.int64)


def _encode_prompt(tokenizer, text: str, chat_template: bool) -> list[int]:
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("prompts.chat_template: the tokenizer has no chat template")
        out = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
        if hasattr(out, "keys") and "input_ids" in out:
            out = out["input_ids"]
        return [int(i) for i in out]
    return [int(i) for i in tokenizer(text)["input_ids"]]


@torch.inference_mode()
def greedy_generate(model, ids: np.ndarray, n: int, eos_ids: set[int]) -> np.ndarray:
    """Greedy continuation of ``ids`` by up to ``n`` tokens (stops after an end-of-sequence token)."""
    dev = next(iter(model.parameters())).device
    seq = torch.from_numpy(np.asarray(ids, dtype=np.int64))[None].to(dev)
    use_cache = hasattr(model, "generate")  # Hugging Face models: incremental decoding with a KV cache
    # transformers ≥ 5.2x names the argument and output `cache` (`past_key_values` is deprecated there).
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    past = None
    out: list[int] = []
    for _ in range(n):
        if use_cache:
            res = model(input_ids=seq if past is None else seq[:, -1:], **{kw: past}, use_cache=True)
            past = getattr(res, kw)
        else:
            res = model(input_ids=seq)
        nxt = int(res.logits[0, -1].argmax())
        out.append(nxt)
        seq = torch.cat([seq, torch.tensor([[nxt]], device=dev)], dim=1)
        if nxt in eos_ids:
            break
    return np.asarray(out, dtype=np.int64)


def prepare_prompt(model, tokenizer, text: str, *, prompt_id: int = 0, target: str | None = None,
                   max_new_tokens: int = 3, chat_template: bool = False) -> PreparedPrompt:
    """Tokenise ``text`` (optionally through the chat template) and append the target tokens: the
    tokens of ``target`` (no special tokens added) or ``max_new_tokens`` greedily generated ones."""
    if not isinstance(text, str) or not text:
        raise ConfigError(f"prompts: prompt {prompt_id} is empty or not text")
    ids = _encode_prompt(tokenizer, text, chat_template)
    if not ids:
        raise ConfigError(f"prompts: prompt {prompt_id} tokenises to nothing")
    if target is not None:
        tgt = [int(i) for i in tokenizer(target, add_special_tokens=False)["input_ids"]]
        if not tgt:
            raise ConfigError(f"prompts: target text of prompt {prompt_id} tokenises to nothing")
        generated = False
    else:
        eos = getattr(tokenizer, "eos_token_id", None)
        eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        tgt = greedy_generate(model, np.asarray(ids), max_new_tokens, eos_ids).tolist()
        generated = True
    return PreparedPrompt(prompt_id, text, np.asarray(ids + tgt, dtype=np.int64), len(ids), generated)


@dataclass
class RunOutput:
    attributions: list[dict] = field(default_factory=list)
    metrics: list[dict] = field(default_factory=list)
    results: list[TargetResult] = field(default_factory=list)
    stats: dict = field(default_factory=dict)


class ReagentRunner:
    """Holds a model, its sampler and engine; attributes prepared prompts (all targets batched).
    ``replacer``: a ready :class:`~.samplers.Sampler` used instead of building the one ``cfg.sampler``
    names. ``packed``: see :class:`~.lm.TargetLM` (``False`` forces plain padded forwards)."""

    def __init__(self, model, tokenizer, cfg: ReagentConfig | None = None, *, evaluation: ReagentEvalConfig | None = None,
                 replacer: Sampler | None = None, cache_dir: str | None = None, trust_remote_code: bool = False,
                 packed: bool | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = cfg or ReagentConfig()
        self.evaluation = evaluation or ReagentEvalConfig()
        if hasattr(model, "eval"):
            model.eval()
        self.special = special_token_ids(tokenizer)
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None) or 0
        self.lm = TargetLM(model, batch_rows=self.cfg.batch_rows, pad_id=int(pad), packed=packed)
        if replacer is not None and not isinstance(replacer, Sampler):
            raise ConfigError(f"replacer: expected a freeshap_ray.reagent.Sampler, got {type(replacer).__name__}")
        self.sampler = replacer or build_sampler(self.cfg.sampler, model, tokenizer, mlm_path=self.cfg.mlm_path,
                                                cache_dir=cache_dir, trust_remote_code=trust_remote_code,
                                                batch_rows=self.cfg.batch_rows)
        self.engine = ReagentEngine(self.lm, self.sampler, self.cfg, self.special)
        self._tok_cache: dict[int, str] = {}

    def tok(self, i: int) -> str:
        s = self._tok_cache.get(i)
        if s is None:
            s = self.tokenizer.decode([int(i)], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            self._tok_cache[i] = s
        return s

    def targets(self, prompts: list[PreparedPrompt], positions: list[np.ndarray] | None = None) -> list[Target]:
        """Targets of the prompts (all target positions, or the given subset per prompt); the original
        target probabilities come from one forward per prompt."""
        out = []
        for k, pp in enumerate(prompts):
            pos = pp.target_positions if positions is None else np.asarray(positions[k], dtype=np.int64)
            if pos.size == 0:
                continue
            p0 = self.lm.sequence_probs(pp.ids, pos)
            for t, p in zip(pos, p0):
                out.append(Target(pp.ids[:t], int(pp.ids[t]), pp.prompt_id, int(t), float(p)))
        return out

    def _records(self, method: str, target: Target, scores: np.ndarray, converged: bool, n_conv: int, note: str) -> list[dict]:
        tt = self.tok(target.target_id)
        special = np.isin(target.context, np.array(sorted(self.special), dtype=np.int64))
        return [
            dict(method=method, prompt_id=target.prompt_id, target_pos=target.position, target_id=target.target_id,
                 target_token=tt, source_pos=j, source_id=int(sid), source_token=self.tok(int(sid)),
                 is_special=bool(special[j]), score=float(scores[j]), converged=converged,
                 probes_converged=n_conv, note=note)
            for j, sid in enumerate(target.context)
        ]

    def run(self, prompts: list[PreparedPrompt], positions: list[np.ndarray] | None = None, *,
            schedule: str = "batched") -> RunOutput:
        ev = self.evaluation
        out = RunOutput()
        t0 = time.perf_counter()
        st = self.lm.stats
        calls0, rows0, computed0, memo0 = st.calls, st.rows, st.computed, st.memo_hits
        targets = self.targets(prompts, positions)
        results = self.engine.run(targets, schedule=schedule)
        t_reagent = time.perf_counter() - t0
        out.results = results
        methods: dict[str, list[np.ndarray]] = {"reagent": [r.scores for r in results]}
        for t, r in zip(targets, results):
            out.attributions += self._records("reagent", t, r.scores, r.converged, r.probes_converged, r.note)
        t1 = time.perf_counter()
        for m in ev.baselines:
            methods[m] = []
            for t in targets:
                s = baseline_scores(m, self.model, t, self.engine.replaceable(t.context), ig_steps=ev.ig_steps,
                                    seed=ev.seed)
                methods[m].append(s)
                out.attributions += self._records(m, t, s, True, 0, "")
        if ev.metrics:
            for m, all_scores in methods.items():
                for t, s in zip(targets, all_scores):
                    met = soft_faithfulness(self.model, t, s, self.engine.replaceable(t.context),
                                            n_samples=ev.metric_samples, seed=ev.seed)
                    out.metrics.append(dict(method=m, prompt_id=t.prompt_id, target_pos=t.position, **met))
        out.stats = dict(
            targets=len(targets), reagent_seconds=t_reagent, evaluation_seconds=time.perf_counter() - t1,
            forward_calls=st.calls - calls0, forward_rows=st.rows - rows0, forward_tokens=st.computed - computed0,
            memo_hits=st.memo_hits - memo0, packed_forward=self.lm.packed is not None,
            converged=sum(r.converged for r in results),
            mean_probe_steps=float(np.mean([r.steps.mean() for r in results])) if results else 0.0,
        )
        return out
