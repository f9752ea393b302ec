"""Packed, prefix-reusing forwards of a Hugging Face decoder-only LM.

The rows of one ReAGent batch go through the model as one sequence of the tokens that actually need
computing, with no padding; everything before them comes from a key/value store of token prefixes seen
earlier in the run (the prompts with their targets, registered first, and every row computed since).

Why this is exact up to float rounding. Under causal attention the key and value of position ``i`` of a
row depend only on ``row[: i + 1]``, so they can be taken from any earlier sequence that starts with the
same ``i + 1`` tokens. For each row the longest stored prefix (at most ``len(row) - 1`` tokens) is looked
up by content; only the tokens after it are computed, at their own rotary positions (``position_ids``),
attending to the stored prefix and to their own row (an additive causal mask over a small per-row
layout; two small batched matrix products, cheaper than SDPA's kernel at these sizes). Linear
layers see only real tokens, the LM head only each row's last position. The logits differ from a plain
forward of the row only by the rounding of differently shaped matrix products (max |Δ logit| ~1e-5 on
SmolLM2; the tests compare both paths).

Memory: the store keeps the keys and values of the base sequences and of the first ``store_depth`` (2)
computed tokens of every row (deeper tokens are rarely shared: a later row would need the same random
replacements; on the benchmark prompts depth 2 computes 1.4 % more tokens than storing everything, with
half the memory), up to ``max_cache_mb`` (46 KB per token for SmolLM2-135M in float32); once full, later
rows still reuse what is stored but add nothing.

Only model families whose attention is plain causal self-attention over rotary-embedded keys, computed
through the ``AttentionInterface`` of transformers, are used (:data:`PACKED_MODEL_TYPES`); a model with a
sliding window shorter than the rows, or any other model, takes the plain padded path of
:class:`~.lm.TargetLM`, which also compares both paths once before trusting this one.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import torch

__all__ = ["PackedPrefixLM", "packed_support", "PACKED_MODEL_TYPES"]

log = logging.getLogger(__name__)

PACKED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo", "olmo2", "granite"})
_ATTN_NAME = "freeshap_packed_prefix"
_state = threading.local()  # the plan of the forward in progress (set only around our own forward calls)


def _packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention of the N packed computed tokens (``query`` (1, H, N, d); ``key``/``value`` (1, KV, N, d),
    rotary applied) over their row's stored prefix and their own row. The new keys and values are
    written to the store first; the per-row layout (R rows × K key slots) is then gathered from it."""
    plan = getattr(_state, "plan", None)
    if plan is None:  # pragma: no cover - only reachable if someone selects this implementation by hand
        raise RuntimeError(f"attention implementation {_ATTN_NAME!r} is only usable inside PackedPrefixLM")
    store_k, store_v = plan["store"][module.layer_idx]
    w0, n = plan["write_at"], key.shape[2]
    store_k[:, w0 : w0 + n] = key[0]
    store_v[:, w0 : w0 + n] = value[0]
    h, d = query.shape[1], query.shape[3]
    kv_heads = key.shape[1]
    rep = h // kv_heads  # query heads per key/value head (consecutive heads share one)
    R, S, K = plan["rows"], plan["smax"], plan["kmax"]
    q = query[0].index_select(1, plan["q_idx"]).view(kv_heads, rep, R, S, d).permute(2, 0, 1, 3, 4)  # (R, KV, rep, S, d)
    k = store_k.index_select(1, plan["k_idx"]).view(kv_heads, R, K, d).transpose(0, 1)  # (R, KV, K, d)
    v = store_v.index_select(1, plan["k_idx"]).view(kv_heads, R, K, d).transpose(0, 1)
    q = q.reshape(R * kv_heads, rep * S, d)
    scores = torch.baddbmm(plan["bias"], q, k.reshape(R * kv_heads, K, d).transpose(1, 2),
                           alpha=scaling if scaling is not None else d**-0.5)
    out = torch.bmm(torch.softmax(scores, dim=-1), v.reshape(R * kv_heads, K, d))  # (R·KV, rep·S, d)
    out = out.view(R, h, S, d).transpose(1, 2).reshape(R * S, h, d).index_select(0, plan["out_idx"])  # (N, H, d)
    return out.unsqueeze(0), None


def _register() -> None:
    from transformers import AttentionInterface

    if _ATTN_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(_ATTN_NAME, _packed_attention)


def packed_support(model) -> str | None:
    """``None`` when :class:`PackedPrefixLM` can run ``model``, else the reason it cannot."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(model, "set_attn_implementation") or not hasattr(model, "parameters"):
        return "not a Hugging Face model"
    mtype = getattr(cfg, "model_type", None)
    if mtype not in PACKED_MODEL_TYPES:
        return f"model type {mtype!r} not in the packed-attention list"
    if getattr(cfg, "_attn_implementation", None) not in ("sdpa", "eager"):
        return f"attention implementation {getattr(cfg, '_attn_implementation', None)!r}"
    try:
        import transformers
    except ImportError:  # pragma: no cover
        return "transformers not installed"
    if not hasattr(transformers, "AttentionInterface"):  # pragma: no cover - transformers < 4.48
        return "transformers without AttentionInterface"
    return None


class PackedPrefixLM:
    """Last-position logits of many rows, reusing stored keys/values of their longest known prefix.

    ``reset()`` empties the store (the engine does so at the start of every run, then registers the
    base sequences by evaluating them); ``last_logits(rows)`` returns the (R, V) logits at each row's
    last position and stores the computed tokens' keys and values.
    """

    def __init__(self, model, *, max_cache_mb: float = 512.0, store_depth: int = 2) -> None:
        reason = packed_support(model)
        if reason is not None:
            raise ValueError(f"packed prefix forward unavailable: {reason}")
        _register()
        self.model = model
        cfg = model.config
        self.device = next(iter(model.parameters())).device
        self.dtype = next(iter(model.parameters())).dtype
        self.window = getattr(cfg, "sliding_window", None)
        self.n_layers = int(cfg.num_hidden_layers)
        self.n_heads = int(cfg.num_attention_heads)
        self.kv_heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        per_token = 2 * self.n_layers * self.kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8
        self.max_tokens = max(0, int(max_cache_mb * 2**20 // per_token))
        self.store_depth = max(1, int(store_depth))
        self.verified = False  # set by TargetLM's one-off comparison with the plain path
        self.reset()

    def reset(self) -> None:
        self._store: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._capacity = 0
        self._size = 0  # stored (addressable) tokens
        self._index: dict[bytes, int] = {}  # token prefix (int64 bytes) -> store address of its last token
        self.reused = 0  # prefix tokens taken from the store so far

    def usable(self, max_len: int) -> bool:
        return not self.window or max_len <= int(self.window)

    def _ensure(self, tokens: int) -> None:
        """Room for ``tokens`` more slots after the stored ones (the new tokens of a forward always get
        slots, stored or not)."""
        need = self._size + tokens
        if need <= self._capacity:
            return
        cap = max(need, min(2 * self._capacity, self.max_tokens + tokens), 1024)
        shape = (self.kv_heads, cap, self.head_dim)
        new = [(torch.empty(shape, dtype=self.dtype, device=self.device),
                torch.empty(shape, dtype=self.dtype, device=self.device)) for _ in range(self.n_layers)]
        for (nk, nv), (ok, ov) in zip(new, self._store):
            nk[:, : self._size] = ok[:, : self._size]
            nv[:, : self._size] = ov[:, : self._size]
        self._store, self._capacity = new, cap

    # ------------------------------------------------------------------------------------------
    def _prefix(self, row: np.ndarray) -> list[int]:
        """Store addresses of the longest stored prefix of ``row`` (at most ``len(row) - 1`` tokens)."""
        index = self._index
        addr: list[int] = []
        for i in range(1, len(row)):
            a = index.get(row[:i].tobytes())
            if a is None:
                break
            addr.append(a)
        return addr

    def _plan(self, rows: list[np.ndarray]):
        prefixes = [self._prefix(r) for r in rows]
        f = np.fromiter((len(p) for p in prefixes), dtype=np.int64, count=len(rows))
        n = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        s = n - f  # computed tokens per row (>= 1)
        R, S, K = len(rows), int(s.max()), int(n.max())
        starts = np.concatenate([[0], np.cumsum(s)[:-1]])
        N = int(s.sum())
        self._ensure(N)
        w0 = self._size
        ids = np.concatenate([r[fi:] for r, fi in zip(rows, f)])
        pos = np.concatenate([np.arange(fi, ni) for fi, ni in zip(f, n)])
        i = np.arange(S)
        j = np.arange(K)
        q_idx = np.where(i[None] < s[:, None], starts[:, None] + i[None], 0)  # (R, S) packed token index
        k_idx = np.where(j[None] < n[:, None], w0 + starts[:, None] + (j[None] - f[:, None]), 0)  # (R, K) store slot
        for r, p in enumerate(prefixes):
            if p:
                k_idx[r, : len(p)] = p
        mask = (j[None, None] <= (f[:, None, None] + i[None, :, None])) & (j[None, None] < n[:, None, None])  # (R, S, K)
        rep = self.n_heads // self.kv_heads
        bias = np.where(mask, np.float32(0), np.float32(-np.inf)).astype(np.float32)
        bias = np.broadcast_to(bias[:, None, None], (len(rows), self.kv_heads, rep, S, K)).reshape(-1, rep * S, K)
        valid = (i[None] < s[:, None]).reshape(-1)
        dev = self.device
        plan = dict(rows=R, smax=S, kmax=K, store=self._store, write_at=w0,
                    q_idx=torch.from_numpy(q_idx.reshape(-1)).to(dev),
                    k_idx=torch.from_numpy(k_idx.reshape(-1)).to(dev),
                    bias=torch.from_numpy(np.ascontiguousarray(bias)).to(device=dev, dtype=self.dtype),
                    out_idx=torch.from_numpy(np.flatnonzero(valid)).to(dev))
        self.reused += int(f.sum())
        return plan, ids, pos, starts + s - 1, f, starts

    def _commit(self, rows: list[np.ndarray], f: np.ndarray, starts: np.ndarray, whole: bool) -> None:
        """Make the first ``store_depth`` new tokens of each row (all of them if ``whole``: the bases)
        addressable, in row order until the store is full; the kept slots are moved together."""
        w0 = self._size
        room = self.max_tokens - w0
        if room <= 0:
            return
        index = self._index
        keep: list[int] = []  # slots (relative to w0) written by this forward that get an address
        for r, row in enumerate(rows):
            fr = int(f[r])
            stop = len(row) if whole else min(len(row), fr + self.store_depth)
            for i in range(fr, stop):
                if len(keep) >= room:
                    break
                key = row[: i + 1].tobytes()
                if key not in index:
                    index[key] = w0 + len(keep)
                    keep.append(int(starts[r]) + i - fr)
        if keep and keep[-1] != len(keep) - 1:  # gaps: move the kept slots to w0, w0 + 1, ...
            sel = torch.tensor(keep, device=self.device) + w0
            for sk, sv in self._store:
                sk[:, w0 : w0 + len(keep)] = sk.index_select(1, sel)
                sv[:, w0 : w0 + len(keep)] = sv.index_select(1, sel)
        self._size = w0 + len(keep)

    @torch.inference_mode()
    def last_logits(self, rows: list[np.ndarray], *, whole: bool = False) -> tuple[torch.Tensor, int]:
        """(R, V) float logits at each row's last position, and the number of tokens computed. ``whole``:
        store every computed token (base sequences), not only the first ``store_depth`` of each row."""
        rows = [np.ascontiguousarray(r, dtype=np.int64) for r in rows]
        plan, ids, pos, last, f, starts = self._plan(rows)
        model = self.model
        old = model.config._attn_implementation
        model.set_attn_implementation(_ATTN_NAME)
        _state.plan = plan
        try:
            out = model(input_ids=torch.from_numpy(ids)[None].to(self.device),
                        position_ids=torch.from_numpy(pos)[None].to(self.device),
                        use_cache=False, logits_to_keep=torch.from_numpy(last).to(self.device))
        finally:
            _state.plan = None
            model.set_attn_implementation(old)
        self._commit(rows, f, starts, whole)
        return out.logits[0].float(), len(ids)
