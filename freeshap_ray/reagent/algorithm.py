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
For the same reason the update rows of a probe's next block can be evaluated in the same forward call as
the stop rows of its current block (done when the next block has at least two steps, i.e. the probe is
already being run speculatively; the rows are discarded if the current block stops it): one forward per
block instead of two once a probe runs long.
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
    pending: _Plan | None = None  # block whose updates are applied and whose stop rows await evaluation


@dataclass
class _Plan:
    """A block of ``k`` consecutive steps of one probe, starting after ``start`` steps."""

    probe: _Probe
    start: int
    k: int
    u: np.ndarray  # (K, 3, L)
    masks: np.ndarray  # (K, L)
    rows: list = field(default_factory=list)  # (step, row index in its forward call) of update rows
    zs: np.ndarray | None = None  # (K, L) importance logits after each step
    stop_new: list = field(default_factory=list)  # (step, row) stop rows built from zs, not yet evaluated
    stop_rows: list = field(default_factory=list)  # (step, row index in its forward call)


@dataclass
class _Call:
    """Rows of one forward call (update and stop rows of many probes together)."""

    rows: list = field(default_factory=list)
    ys: list = field(default_factory=list)

    def add(self, row: np.ndarray, y: int) -> int:
        self.rows.append(row)
        self.ys.append(y)
        return len(self.rows) - 1


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

    def _k(self, steps: int, schedule: str) -> int:
        """Size of the block that starts after ``steps`` steps."""
        if schedule == "sequential":
            k = 1
        else:
            k = min(self.cfg.speculative_steps, max(1, math.ceil(self.cfg.speculative_growth * steps)))
        return max(1, min(k, self.cfg.max_steps - steps))

    @staticmethod
    def _bases(targets: list[Target]) -> list[np.ndarray]:
        """Fewest sequences of which every target context is a prefix (the targets of one prompt share
        one: the longest context); the LM stores their keys/values for prefix reuse."""
        bases: list[np.ndarray] = []
        for t in sorted(targets, key=lambda t: -len(t.context)):
            if not any(np.array_equal(seq[: len(t.context)], t.context) for seq in bases):
                bases.append(t.context)
        return bases

    # ------------------------------------------------------------------------------------------
    def run(self, targets: list[Target], *, schedule: str = "batched") -> list[TargetResult]:
        """Attribute every target. ``schedule="sequential"`` evaluates one probe step at a time with
        batch-1 forwards (same results; the reference for tests and benchmarks)."""
        if schedule not in ("batched", "sequential"):
            raise ValueError(f"schedule: must be 'batched' or 'sequential', got {schedule!r}")
        cfg = self.cfg
        self.lm.set_bases(self._bases(targets))  # new memo; prompt prefixes stored for reuse (packed path)
        missing = [i for i, t in enumerate(targets) if t.p_orig is None]
        if missing:
            p, _ = self.lm.target_stats([targets[i].context for i in missing], np.array([targets[i].target_id for i in missing]), "original")
            for i, pi in zip(missing, p):
                targets[i].p_orig = float(pi)
        pos = [self.replaceable(t.context) for t in targets]
        n_keep = [min(cfg.keep_top_n, len(r) - 1) for r in pos]
        short = [len(r) <= cfg.keep_top_n for r in pos]
        self._targets, self._pos, self._n_keep, self._schedule = targets, pos, n_keep, schedule
        self._rows_used = rows_used = [0] * len(targets)
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
                    self._round([pr])
        else:
            active = probes
            while active:
                self._round(active)
                active = [p for p in active if not p.done]
        return self._collect(targets, pos, probes, rows_used)

    # ------------------------------------------------------------------------------------------
    # One round = one forward call. A probe either starts a block (its update rows are evaluated) or
    # finishes one (the stop rows built from its updated importances are evaluated). A probe finishing a
    # block whose successor would be speculative anyway (size >= 2) also sends that successor's update
    # rows in the same call: they do not depend on the outcome, and are discarded if the probe stops.

    def _draw(self, pr: _Probe, start: int, call: _Call) -> _Plan:
        """Draw the block starting after ``start`` steps and queue its update rows."""
        k = self._k(start, self._schedule)
        L = len(self._pos[pr.t])
        u = pr.rng.random((k, STEP_DRAWS, L))
        plan = _Plan(pr, start, k, u, u[:, 0] < self.cfg.replacing_ratio)
        steps = np.flatnonzero(plan.masks.any(axis=1))
        if steps.size:
            t = self._targets[pr.t]
            new = self.sampler.replace(t.context, self._pos[pr.t], plan.masks[steps], u[steps, 1])
            plan.rows = [(int(s), call.add(row, t.target_id)) for s, row in zip(steps, new)]
            self._rows_used[pr.t] += len(steps)
        return plan

    def _updated(self, plan: _Plan, p_new: np.ndarray) -> None:
        """Apply the block's updates to the probe's current z (all k steps) and build its stop rows."""
        pr = plan.probe
        t = self._targets[pr.t]
        d = np.zeros(plan.k)
        for s, i in plan.rows:
            d[s] = t.p_orig - p_new[i]
        upd = logit_update(d, plan.masks)
        plan.zs = self._running(pr.z, upd)
        if pr.replaced is not None:
            allowed = (np.logical_or.accumulate(plan.masks, axis=0) | pr.replaced).all(axis=1)
        else:
            allowed = np.ones(plan.k, dtype=bool)
        steps = np.flatnonzero(allowed)
        if steps.size:
            replace = ~top_mask(plan.zs[steps], self._n_keep[pr.t])
            new = self.sampler.replace(t.context, self._pos[pr.t], replace, plan.u[steps, 2])
            plan.stop_new = list(zip(steps.tolist(), new))
            self._rows_used[pr.t] += len(steps)

    @staticmethod
    def _running(z: np.ndarray, upd: np.ndarray) -> np.ndarray:
        zs = np.empty_like(upd)
        for s in range(upd.shape[0]):  # sequential sums: the same float results as one step at a time
            z = z + upd[s]
            zs[s] = z
        return zs

    def _decide(self, plan: _Plan, ranks: np.ndarray | None) -> None:
        """Stop rule over the block's evaluated stop rows, in step order."""
        pr = plan.probe
        pr.pending = None
        stop_at = None
        for s, i in plan.stop_rows:
            if ranks[i] < self.cfg.top_k:
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
            if pr.steps >= self.cfg.max_steps:
                pr.done = True

    def _settle(self, plan: _Plan) -> None:
        """After its updates: wait for the stop rows, or decide at once when there are none."""
        if plan.stop_new:
            plan.probe.pending = plan
        else:
            self._decide(plan, None)

    def _round(self, active: list[_Probe]) -> None:
        call = _Call()
        fresh: list[_Plan] = []
        finishing: list[tuple[_Plan, _Plan | None]] = []
        for pr in active:
            plan = pr.pending
            if plan is None:
                fresh.append(self._draw(pr, pr.steps, call))
                continue
            y = self._targets[pr.t].target_id
            plan.stop_rows = [(s, call.add(row, y)) for s, row in plan.stop_new]
            plan.stop_new = []
            nxt = None
            after = plan.start + plan.k
            if self._schedule != "sequential" and after < self.cfg.max_steps and self._k(after, self._schedule) >= 2:
                nxt = self._draw(pr, after, call)
            finishing.append((plan, nxt))
        p_new, ranks = self.lm.target_stats(call.rows, np.array(call.ys, dtype=np.int64), "step")
        for plan, nxt in finishing:
            self._decide(plan, ranks)
            if nxt is not None and not plan.probe.done:
                self._updated(nxt, p_new)
                self._settle(nxt)
        for plan in fresh:
            self._updated(plan, p_new)
            self._settle(plan)

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
