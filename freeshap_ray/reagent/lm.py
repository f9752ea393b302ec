"""Forward passes of a causal LM that return only what ReAGent needs: the target's probability and rank.

Any callable ``model(input_ids=..., attention_mask=...)`` returning an object with ``.logits`` of shape
(B, T, V) works (Hugging Face causal LMs, hand-built test modules). Rows of different lengths are
right-padded: with causal attention the padding after a row's last token cannot change that token's
logits, so no position ids are needed. Hugging Face models that accept ``logits_to_keep`` project only
each row's last position onto the vocabulary (the LM head is ~20 % of a small LM's forward).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["ForwardStats", "TargetLM", "special_token_ids", "vocab_limit"]


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
    """Forward calls and rows (sequences) evaluated, for benchmarks and manifests."""

    calls: int = 0
    rows: int = 0
    tokens: int = 0
    by_kind: dict = field(default_factory=dict)

    def add(self, kind: str, rows: int, tokens: int) -> None:
        self.calls += 1
        self.rows += rows
        self.tokens += tokens
        c, r = self.by_kind.get(kind, (0, 0))
        self.by_kind[kind] = (c + 1, r + rows)


class TargetLM:
    """Batched ``p(target | row)`` and target rank for many rows at once.

    Args:
        model: the causal LM (put in eval mode by the caller).
        batch_rows: most rows per forward; larger requests are split in length-sorted chunks.
        last_logits_only: request only each row's last-position logits when the model supports
            ``logits_to_keep`` (Hugging Face); otherwise full logits are computed and the last read.
    """

    def __init__(self, model, *, batch_rows: int = 256, last_logits_only: bool = True, pad_id: int = 0):
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

    # ------------------------------------------------------------------------------------------
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
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=n)
        order = np.argsort(-lengths, kind="stable")
        for s in range(0, n, self.batch_rows):
            idx = order[s : s + self.batch_rows]
            width = int(lengths[idx].max())
            ids = np.full((len(idx), width), self.pad_id, dtype=np.int64)
            mask = np.zeros((len(idx), width), dtype=np.int64)
            for j, i in enumerate(idx):
                ids[j, : lengths[i]] = rows[i]
                mask[j, : lengths[i]] = 1
            t_ids = torch.from_numpy(ids).to(self.device)
            t_mask = torch.from_numpy(mask).to(self.device)
            last = torch.from_numpy(lengths[idx] - 1).to(self.device)
            logits = self._logits_last(t_ids, t_mask, last).float()
            tgt = torch.from_numpy(targets[idx]).to(self.device)
            tl = logits.gather(1, tgt[:, None])
            p = torch.softmax(logits, dim=-1).gather(1, tgt[:, None])[:, 0]
            r = (logits > tl).sum(dim=1)
            probs[idx] = p.double().cpu().numpy()
            ranks[idx] = r.cpu().numpy()
            self.stats.add(kind, len(idx), int(lengths[idx].sum()))
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
