"""ReAGent (Zhao & Shan, 2024): recursive, model-agnostic token attribution for one target token.

Per target token y with context x (length T) and its replaceable (non-special) positions R (|R| = L):

- P probes, each with importance logits z over R, ``z ~ U[0, 1)``.
- One step of a probe: mask m ~ Bernoulli(r) over R; the masked tokens are replaced by the sampler;
  ``d = p(y | x) - p(y | x')``; ``z += logit((1 + d) / 2)`` where replaced and ``logit((1 - d) / 2)``
  where kept (= ``-logit((1 + d) / 2)``; the argument is clipped to [1e-7, 1 - 1e-7]). A step that
  replaces nothing has d = 0 and costs no forward pass.
- Stop rule after every step: keep the ``keep_top_n`` positions of highest importance (ties by
  position), replace the other positions of R with the sampler; the probe has converged when y is
  among the model's ``top_k`` next tokens for that input. At most ``max_steps`` steps.
- Importance of the target = mean over the converged probes of ``softmax(z)``. If no probe converged,
  the mean over all probes with ``converged = False`` (never NaN). Special positions score 0 and are
  never replaced; they are always kept in the stop rule.

Defined results where the reference misbehaves:
- ``L <= keep_top_n`` (short prompts), where the stop rule would keep everything and stop after one step
  with essentially random scores: the stop rule keeps ``L - 1`` positions (so it always removes the
  least important one) and a probe may stop only after each of its positions has been replaced at
  least once. ``L == 1``: that position gets importance 1 (converged, no forward pass). ``L == 0``:
  all scores 0, ``converged = False``.

Random stream. Probe q of target (prompt_id, position) draws from
``Generator(PCG64(SeedSequence([seed, prompt_id, position, q])))``: first z (L numbers), then for every
step 3·L uniforms (mask, replacement for the update, replacement for the stop check), whether or not
they are used. The stream therefore never depends on z, so K future steps can be drawn and their
update rows evaluated in one batch; applying the K updates in order and checking the stop rule after
each (the K stop rows are built from the K successive states) reproduces sequential execution exactly.
The result does not depend on ``speculative_steps``, ``batch_rows``, how targets are batched or how
they are spread over Ray actors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..config import ReagentConfig
from .lm import TargetLM
from .samplers import Sampler

__all__ = ["Target", "TargetResult", "ReagentEngine", "probe_rng", "logit_update", "STEP_DRAWS"]

STEP_DRAWS = 3  # uniforms per replaceable position and step: mask, update replacement, stop replacement
_EPS = 1e-7


def probe_rng(seed: int, prompt_id: int, position: int, probe: int) -> np.random.Generator:
    """The random stream of one probe (independent of execution order)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(prompt_id), int(position), int(probe)])))


def logit_update(d: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(K, L) additive update of z for drops ``d`` (K,) and replacement masks (K, L)."""
    a = np.clip((1.0 + np.asarray(d, dtype=np.float64)) / 2.0, _EPS, 1.0 - _EPS)
    up = np.log(a) - np.log1p(-a)
    return np.where(mask, up[:, None], -up[:, None])


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def top_mask(z: np.ndarray, n: int) -> np.ndarray:
    """Boolean mask of the ``n`` largest entries of each row of ``z`` (ties: lower position first)."""
    order = np.argsort(-z, axis=-1, kind="stable")[..., :n]
    keep = np.zeros(z.shape, dtype=bool)
    np.put_along_axis(keep, order, True, axis=-1)
    return keep


@dataclass
class Target:
    """One target token: ``context`` ids (the whole sequence before it) and the target id."""

    context: np.ndarray
    target_id: int
    prompt_id: int = 0
    position: int = -1  # index of the target in its sequence; defaults to len(context)
    p_orig: float | None = None

    def __post_init__(self) -> None:
        self.context = np.asarray(self.context, dtype=np.int64)
        if self.position < 0:
            self.position = len(self.context)


@dataclass
class TargetResult:
    prompt_id: int
    position: int
    target_id: int
    scores: np.ndarray  # (T,) importance per context position; 0 at special positions
    converged: bool
    probe_converged: np.ndarray  # (P,) bool
    steps: np.ndarray  # (P,) steps taken by each probe
    p_orig: float
    note: str = ""  # "", "short_context", "single_position", "no_replaceable"
    rows: int = 0  # forward rows spent on this target (speculative rows included)

    @property
    def probes_converged(self) -> int:
        return int(self.probe_converged.sum())


@dataclass
class _Probe:
    t: int  # target index
    q: int  # probe index
    rng: np.random.Generator
    z: np.ndarray
    steps: int = 0
    done: bool = False
    converged: bool = False
    replaced: np.ndarray | None = None  # short contexts: which positions were replaced at least once


@dataclass
class _Plan:
    probe: _Probe
    k: int
    u: np.ndarray  # (K, 3, L)
    masks: np.ndarray  # (K, L)
    rows: list = field(default_factory=list)  # (step, global row index) of update rows
    zs: np.ndarray | None = None
    stop_rows: list = field(default_factory=list)  # (step, global row index)
    allowed: np.ndarray | None = None


class ReagentEngine:
    """Runs ReAGent for many targets at once.

    Args:
        lm: batched target-probability evaluator (:class:`~.lm.TargetLM`).
        sampler: replacement sampler.
        cfg: hyper-parameters (:class:`~freeshap_ray.config.ReagentConfig`).
        special_ids: token ids never replaced (and never attributed).
    """

    def __init__(self, lm: TargetLM, sampler: Sampler, cfg: ReagentConfig, special_ids: set[int]) -> None:
        self.lm = lm
        self.sampler = sampler
        self.cfg = cfg
        self.special_ids = np.array(sorted(special_ids), dtype=np.int64)

    def replaceable(self, context: np.ndarray) -> np.ndarray:
        return np.flatnonzero(~np.isin(context, self.special_ids)).astype(np.int64)

    def _k(self, probe: _Probe, schedule: str) -> int:
        if schedule == "sequential":
            k = 1
        else:
            k = min(self.cfg.speculative_steps, max(1, math.ceil(self.cfg.speculative_growth * probe.steps)))
        return max(1, min(k, self.cfg.max_steps - probe.steps))

    # ------------------------------------------------------------------------------------------
    def run(self, targets: list[Target], *, schedule: str = "batched") -> list[TargetResult]:
        """Attribute every target. ``schedule="sequential"`` evaluates one probe step at a time with
        batch-1 forwards (same results; the reference for tests and benchmarks)."""
        if schedule not in ("batched", "sequential"):
            raise ValueError(f"schedule: must be 'batched' or 'sequential', got {schedule!r}")
        cfg = self.cfg
        missing = [i for i, t in enumerate(targets) if t.p_orig is None]
        if missing:
            p, _ = self.lm.target_stats([targets[i].context for i in missing], np.array([targets[i].target_id for i in missing]), "original")
            for i, pi in zip(missing, p):
                targets[i].p_orig = float(pi)
        pos = [self.replaceable(t.context) for t in targets]
        n_keep = [min(cfg.keep_top_n, len(r) - 1) for r in pos]
        short = [len(r) <= cfg.keep_top_n for r in pos]
        rows_used = [0] * len(targets)
        probes: list[_Probe] = []
        for ti, t in enumerate(targets):
            if len(pos[ti]) < 2:
                continue
            for q in range(cfg.num_probes):
                rng = probe_rng(cfg.seed, t.prompt_id, t.position, q)
                z = rng.random(len(pos[ti]))
                probes.append(_Probe(ti, q, rng, z, replaced=np.zeros(len(pos[ti]), dtype=bool) if short[ti] else None))

        if schedule == "sequential":
            for pr in probes:
                while not pr.done:
                    self._round([pr], targets, pos, n_keep, rows_used, schedule)
        else:
            active = probes
            while active:
                self._round(active, targets, pos, n_keep, rows_used, schedule)
                active = [p for p in active if not p.done]
        return self._collect(targets, pos, probes, rows_used)

    def _round(self, active: list[_Probe], targets, pos, n_keep, rows_used, schedule) -> None:
        cfg = self.cfg
        plans: list[_Plan] = []
        rows: list[np.ndarray] = []
        ys: list[int] = []
        for pr in active:
            k = self._k(pr, schedule)
            L = len(pos[pr.t])
            u = pr.rng.random((k, STEP_DRAWS, L))
            masks = u[:, 0] < cfg.replacing_ratio
            plan = _Plan(pr, k, u, masks)
            steps = np.flatnonzero(masks.any(axis=1))
            if steps.size:
                t = targets[pr.t]
                new = self.sampler.replace(t.context, pos[pr.t], masks[steps], u[steps, 1])
                for s, row in zip(steps, new):
                    plan.rows.append((int(s), len(rows)))
                    rows.append(row)
                    ys.append(t.target_id)
                rows_used[pr.t] += len(steps)
            plans.append(plan)
        p_new, _ = self.lm.target_stats(rows, np.array(ys, dtype=np.int64), "update")

        stop_rows: list[np.ndarray] = []
        stop_ys: list[int] = []
        for plan in plans:
            pr = plan.probe
            t = targets[pr.t]
            d = np.zeros(plan.k)
            for s, i in plan.rows:
                d[s] = t.p_orig - p_new[i]
            upd = logit_update(d, plan.masks)
            zs = np.empty((plan.k, len(pr.z)))
            z = pr.z
            for s in range(plan.k):
                z = z + upd[s]
                zs[s] = z
            plan.zs = zs
            if pr.replaced is not None:
                seen = np.logical_or.accumulate(plan.masks, axis=0) | pr.replaced
                plan.allowed = seen.all(axis=1)
            else:
                plan.allowed = np.ones(plan.k, dtype=bool)
            steps = np.flatnonzero(plan.allowed)
            if steps.size:
                replace = ~top_mask(zs[steps], n_keep[pr.t])
                new = self.sampler.replace(t.context, pos[pr.t], replace, plan.u[steps, 2])
                for s, row in zip(steps, new):
                    plan.stop_rows.append((int(s), len(stop_rows)))
                    stop_rows.append(row)
                    stop_ys.append(t.target_id)
                rows_used[pr.t] += len(steps)
        _, ranks = self.lm.target_stats(stop_rows, np.array(stop_ys, dtype=np.int64), "stop")

        for plan in plans:
            pr = plan.probe
            stop_at = None
            for s, i in plan.stop_rows:  # in step order
                if ranks[i] < cfg.top_k:
                    stop_at = s
                    break
            if stop_at is not None:
                pr.z = plan.zs[stop_at]
                pr.steps += stop_at + 1
                pr.done = pr.converged = True
            else:
                pr.z = plan.zs[-1]
                pr.steps += plan.k
                if pr.replaced is not None:
                    pr.replaced = pr.replaced | plan.masks.any(axis=0)
                if pr.steps >= cfg.max_steps:
                    pr.done = True

    def _collect(self, targets, pos, probes, rows_used) -> list[TargetResult]:
        P = self.cfg.num_probes
        by_target: dict[int, list[_Probe]] = {}
        for pr in probes:
            by_target.setdefault(pr.t, []).append(pr)
        out = []
        for ti, t in enumerate(targets):
            scores = np.zeros(len(t.context), dtype=np.float64)
            L = len(pos[ti])
            note = "short_context" if 2 <= L <= self.cfg.keep_top_n else ""
            if L == 0:
                res = TargetResult(t.prompt_id, t.position, t.target_id, scores, False, np.zeros(P, bool),
                                   np.zeros(P, np.int64), float(t.p_orig), "no_replaceable", 0)
            elif L == 1:
                scores[pos[ti]] = 1.0
                res = TargetResult(t.prompt_id, t.position, t.target_id, scores, True, np.ones(P, bool),
                                   np.zeros(P, np.int64), float(t.p_orig), "single_position", 0)
            else:
                prs = sorted(by_target[ti], key=lambda p: p.q)
                conv = np.array([p.converged for p in prs])
                s = softmax(np.stack([p.z for p in prs]))
                scores[pos[ti]] = s[conv].mean(axis=0) if conv.any() else s.mean(axis=0)
                res = TargetResult(t.prompt_id, t.position, t.target_id, scores, bool(conv.any()), conv,
                                   np.array([p.steps for p in prs], dtype=np.int64), float(t.p_orig), note, rows_used[ti])
            out.append(res)
        return out
