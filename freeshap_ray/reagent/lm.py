"""Forward passes of a causal LM that return only what ReAGent needs: the target's probability and rank.

Any callable ``model(input_ids=..., attention_mask=...)`` returning an object with ``.logits`` of shape
(B, T, V) works (Hugging Face causal LMs, hand-built test modules): the *plain* path right-pads rows of
different lengths (with causal attention the padding after a row's last token cannot change that token's
logits, so no position ids are needed), cuts a batch where padding would waste more than ~1/8 of it, and
asks Hugging Face models that accept ``logits_to_keep`` for each row's last position only (the LM head is
~20 % of a small LM's forward).

Hugging Face decoder LMs of the families in :data:`~.packed.PACKED_MODEL_TYPES` take the *packed* path
(:mod:`.packed`) once the engine has registered the base sequences the rows derive from (``set_bases``):
no padding, and each row's unchanged prefix comes from the base's key/value cache. Both paths give the
same logits up to float rounding (``packed=False`` forces the plain path).

A row evaluated twice for the same target within one run (identical ids) is computed once (``memo``).
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["ForwardStats", "TargetLM", "special_token_ids", "vocab_limit"]

log = logging.getLogger(__name__)


def special_token_ids(tokenizer) -> set[int]:
    """Ids the tokenizer marks special: ``all_special_ids`` plus added tokens flagged ``special``."""
    ids = set(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
    for i, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(tok, "special", False):
            ids.add(int(i))
    return ids


def vocab_limit(model, tokenizer=None) -> int:
    """Number of ids the model can embed *and* the tokenizer can decode (ids ≥ this are never sampled)."""
    sizes = []
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "vocab_size", None):
        sizes.append(int(cfg.vocab_size))
    get_emb = getattr(model, "get_input_embeddings", None)
    if callable(get_emb):
        try:
            emb = get_emb()
            if emb is not None and hasattr(emb, "weight"):
                sizes.append(int(emb.weight.shape[0]))
        except (NotImplementedError, AttributeError):
            pass
    if tokenizer is not None:
        sizes.append(len(tokenizer))
    if not sizes:
        raise ValueError("model: cannot tell the vocabulary size (no config.vocab_size, input embeddings or tokenizer)")
    return min(sizes)


@dataclass
class ForwardStats:
    """Forward calls and rows (sequences) evaluated, for benchmarks and manifests. ``tokens``: the rows'
    tokens; ``computed``: the token positions actually run through the model (padding included, cached
    prefixes excluded); ``memo_hits``: rows answered from an identical earlier row."""

    calls: int = 0
    rows: int = 0
    tokens: int = 0
    computed: int = 0
    memo_hits: int = 0
    by_kind: dict = field(default_factory=dict)

    def add(self, kind: str, rows: int, tokens: int, computed: int | None = None) -> None:
        self.calls += 1
        self.rows += rows
        self.tokens += tokens
        self.computed += tokens if computed is None else computed
        c, r = self.by_kind.get(kind, (0, 0))
        self.by_kind[kind] = (c + 1, r + rows)


def _length_chunks(lengths: np.ndarray, batch_rows: int, waste: float = 0.125, min_rows: int = 8) -> list[np.ndarray]:
    """Row indices in chunks of at most ``batch_rows``, longest first; a chunk ends early once right-padding
    would exceed ``waste`` of its computed tokens (never below ``min_rows`` rows)."""
    order = np.argsort(-lengths, kind="stable")
    chunks, cur, width, real = [], [], 0, 0
    for i in order.tolist():
        n = int(lengths[i])
        if cur and (len(cur) >= batch_rows or (len(cur) >= min_rows and (width * (len(cur) + 1) - real - n) > waste * width * (len(cur) + 1))):
            chunks.append(np.asarray(cur, dtype=np.int64))
            cur, real = [], 0
        if not cur:
            width = n
        cur.append(i)
        real += n
    if cur:
        chunks.append(np.asarray(cur, dtype=np.int64))
    return chunks


class TargetLM:
    """Batched ``p(target | row)`` and target rank for many rows at once.

    Args:
        model: the causal LM (put in eval mode by the caller).
        batch_rows: most rows per forward; larger requests are split in chunks.
        last_logits_only: request only each row's last-position logits when the model supports
            ``logits_to_keep`` (Hugging Face); otherwise full logits are computed and the last read.
        packed: ``None`` (default): packed prefix-reusing forwards where the model supports them
            (:mod:`.packed`); ``False``: always the plain padded path; ``True``: require the packed path.
        memo: answer a row seen before in this run (same ids, same target) without a forward.
        max_cache_mb: size limit of the packed path's store of prefix keys/values.
    """

    def __init__(self, model, *, batch_rows: int = 256, last_logits_only: bool = True, pad_id: int = 0,
                 packed: bool | None = None, memo: bool = True, max_cache_mb: float = 512.0):
        self.model = model
        self.batch_rows = max(1, int(batch_rows))
        self.pad_id = int(pad_id)
        self.stats = ForwardStats()
        params = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
        self.device = params.device if params is not None else torch.device("cpu")
        fwd = getattr(model, "forward", model)
        try:
            sig = inspect.signature(fwd).parameters
        except (TypeError, ValueError):  # pragma: no cover - C callables
            sig = {}
        self._keep_arg = last_logits_only and "logits_to_keep" in sig
        self._keep_2d: bool | None = None  # does this transformers version take per-row (B, 1) positions?
        self.packed = None
        self.packed_reason = "disabled (packed=False)"
        if packed is not False:
            from .packed import PackedPrefixLM, packed_support

            self.packed_reason = packed_support(model)
            if self.packed_reason is None:
                self.packed = PackedPrefixLM(model, max_cache_mb=max_cache_mb)
            elif packed:
                raise ValueError(f"packed forward requested but unavailable: {self.packed_reason}")
        self._memo: dict | None = {} if memo else None

    # ------------------------------------------------------------------------------------------
    def set_bases(self, sequences: list[np.ndarray]) -> None:
        """Start a run: forget the memo and the packed path's prefix store, then register the base sequences
        the rows will derive from (with the packed path, each base is evaluated once so that its keys and
        values are stored)."""
        if self._memo is not None:
            self._memo = {}
        if self.packed is None:
            return
        self.packed.reset()
        bases = [np.array(s, dtype=np.int64) for s in sequences if len(s)]
        if not bases or not self.packed.usable(max(len(b) for b in bases)):
            return
        with torch.inference_mode():
            for s in range(0, len(bases), self.batch_rows):
                chunk = bases[s : s + self.batch_rows]
                _, computed = self.packed.last_logits(chunk, whole=True)
                self.stats.add("prefix", len(chunk), sum(len(b) for b in chunk), computed)
        if not self.packed.verified:
            self._self_check(bases[0])

    @torch.inference_mode()
    def _self_check(self, base: np.ndarray) -> None:
        """Compare the packed and the plain path once on rows derived from a base; a mismatch beyond float
        rounding switches the packed path off (logged) rather than give different results."""
        if len(base) < 2:
            return
        rows = [base, base[:-1].copy(), base.copy()]
        mid = len(base) // 2
        rows[2][mid] = base[0] if base[mid] != base[0] else base[-1]
        got = self.packed.last_logits(rows)[0]
        ref = torch.cat([self._plain_logits([r]) for r in rows])
        err = float((got - ref).abs().max())
        scale = float(ref.abs().max())
        if not err <= 1e-4 * max(scale, 1.0):
            log.warning("packed prefix forward disagrees with the plain forward (max |diff| %.3g); using the plain path", err)
            self.packed = None
            self.packed_reason = f"self-check failed (max |diff| {err:.3g})"
        else:
            self.packed.verified = True

    def _logits_last(self, ids: torch.Tensor, mask: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """(B, V) logits at position ``last[b]`` of each row."""
        b = ids.shape[0]
        if self._keep_arg:
            uniform = bool((last == ids.shape[1] - 1).all())
            if uniform:
                out = self.model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits
                return out[:, -1]
            if self._keep_2d is not False:
                try:
                    out = self.model(input_ids=ids, attention_mask=mask, logits_to_keep=last[:, None]).logits
                    if out.shape[:2] == (b, 1):
                        self._keep_2d = True
                        return out[:, 0]
                except (TypeError, IndexError, RuntimeError):
                    pass
                self._keep_2d = False
        out = self.model(input_ids=ids, attention_mask=mask).logits
        return out[torch.arange(b, device=out.device), last]

    def _plain_logits(self, rows: list[np.ndarray]) -> torch.Tensor:
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        width = int(lengths.max())
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for j, r in enumerate(rows):
            ids[j, : len(r)] = r
            mask[j, : len(r)] = 1
        t_ids = torch.from_numpy(ids).to(self.device)
        t_mask = torch.from_numpy(mask).to(self.device)
        last = torch.from_numpy(lengths - 1).to(self.device)
        return self._logits_last(t_ids, t_mask, last).float()

    @torch.inference_mode()
    def target_stats(self, rows: list[np.ndarray], targets: np.ndarray, kind: str = "rows") -> tuple[np.ndarray, np.ndarray]:
        """For each row (1-D id array) the probability (float64) and rank (0 = top-1) of ``targets[i]``
        as the next token after the row."""
        n = len(rows)
        probs = np.empty(n, dtype=np.float64)
        ranks = np.empty(n, dtype=np.int64)
        if n == 0:
            return probs, ranks
        targets = np.asarray(targets, dtype=np.int64)
        todo = np.arange(n)
        keys = None
        if self._memo is not None:
            keys = [(int(targets[i]), rows[i].tobytes()) for i in range(n)]
            first: dict = {}
            todo_l, dup = [], []
            for i, k in enumerate(keys):
                hit = self._memo.get(k)
                if hit is not None:
                    probs[i], ranks[i] = hit
                    self.stats.memo_hits += 1
                elif k in first:
                    dup.append((i, first[k]))
                    self.stats.memo_hits += 1
                else:
                    first[k] = i
                    todo_l.append(i)
            todo = np.asarray(todo_l, dtype=np.int64)
        lengths = np.fromiter((len(rows[i]) for i in todo), dtype=np.int64, count=len(todo))
        use_packed = self.packed is not None and len(todo) and self.packed.usable(int(lengths.max()))
        if use_packed:
            chunks = [todo[s : s + self.batch_rows] for s in range(0, len(todo), self.batch_rows)]
        else:
            chunks = [todo[c] for c in _length_chunks(lengths, self.batch_rows)] if len(todo) else []
        for idx in chunks:
            chunk = [rows[i] for i in idx]
            real = sum(len(r) for r in chunk)
            if use_packed:
                logits, computed = self.packed.last_logits(chunk)
            else:
                logits = self._plain_logits(chunk)
                computed = len(chunk) * max(len(r) for r in chunk)
            tgt = torch.from_numpy(targets[idx]).to(logits.device)
            tl = logits.gather(1, tgt[:, None])
            p = torch.softmax(logits, dim=-1).gather(1, tgt[:, None])[:, 0]
            r = (logits > tl).sum(dim=1)
            probs[idx] = p.double().cpu().numpy()
            ranks[idx] = r.cpu().numpy()
            self.stats.add(kind, len(idx), real, computed)
        if self._memo is not None:
            for i in todo.tolist():
                self._memo[keys[i]] = (probs[i], ranks[i])
            for i, j in dup:
                probs[i], ranks[i] = probs[j], ranks[j]
        return probs, ranks

    @torch.inference_mode()
    def sequence_probs(self, sequence: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """``p(sequence[t] | sequence[:t])`` for each ``t`` in ``positions``, from one forward of the sequence
        (prefix reuse: every target of a prompt shares this forward)."""
        seq = np.array(sequence, dtype=np.int64)  # a copy: arrays from Ray are read-only
        positions = np.asarray(positions, dtype=np.int64)
        ids = torch.from_numpy(seq[: int(positions.max())][None]).to(self.device)
        mask = torch.ones_like(ids)
        read = torch.from_numpy(positions - 1).to(self.device)
        if self._keep_arg:
            logits = self.model(input_ids=ids, attention_mask=mask, logits_to_keep=read).logits[0]
        else:
            logits = self.model(input_ids=ids, attention_mask=mask).logits[0, read]
        logits = logits.float()
        tgt = torch.from_numpy(seq[positions]).to(self.device)
        p = torch.softmax(logits, dim=-1).gather(1, tgt[:, None])[:, 0]
        self.stats.add("original", 1, int(ids.shape[1]))
        return p.double().cpu().numpy()
