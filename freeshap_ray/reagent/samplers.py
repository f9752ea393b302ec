"""Replacement samplers: turn (context, which positions to replace, uniform numbers) into new token rows.

Every sampler consumes exactly one uniform number per replaceable position and row, whatever it replaces,
so a probe's random stream does not depend on its importance state (the basis of exact speculative
execution). Sampled ids are always valid: below the model's and tokenizer's vocabulary size and never
a special token; special positions are never offered for replacement by the algorithm.

- ``uniform``: uniform over all valid (non-special, in-vocabulary) ids.
- ``pos``: uniform over valid ids of the same coarse part of speech as the replaced token, tagged in
  context with the offline perceptron tagger (:mod:`.pos`); falls back to uniform for groups with no
  vocabulary entry.
- ``mlm``: sampled from a masked LM's distribution at ``[MASK]`` (all replaced positions masked at once),
  restricted to ids that map onto a single valid token of the attributed LM.
"""

from __future__ import annotations

import hashlib
import os
import logging
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from .lm import special_token_ids, vocab_limit

__all__ = ["Sampler", "UniformSampler", "PosSampler", "MLMSampler", "valid_token_ids", "build_sampler"]

log = logging.getLogger(__name__)


def valid_token_ids(model, tokenizer) -> np.ndarray:
    """Sorted ids that may be sampled: ``< vocab_limit`` and not special."""
    limit = vocab_limit(model, tokenizer)
    ids = np.arange(limit, dtype=np.int64)
    special = np.fromiter((i for i in special_token_ids(tokenizer) if i < limit), dtype=np.int64)
    ids = np.setdiff1d(ids, special)
    if ids.size == 0:
        raise ValueError("tokenizer: no non-special token id to sample replacements from")
    return ids


def _pick(pool: np.ndarray, u: np.ndarray) -> np.ndarray:
    idx = np.minimum((u * len(pool)).astype(np.int64), len(pool) - 1)
    return pool[idx]


class Sampler:
    """Base class. ``replace`` returns (R, T) rows: ``context`` with ``positions[replace[r]]`` replaced."""

    name = "base"

    def __init__(self, valid_ids: np.ndarray) -> None:
        self.valid_ids = np.asarray(valid_ids, dtype=np.int64)

    def candidates(self, context: np.ndarray, positions: np.ndarray, replace: np.ndarray, u: np.ndarray) -> np.ndarray:
        """(R, L) replacement id for every replaceable position (only the replaced ones are used)."""
        raise NotImplementedError

    def replace(self, context: np.ndarray, positions: np.ndarray, replace: np.ndarray, u: np.ndarray) -> np.ndarray:
        replace = np.asarray(replace, dtype=bool)
        cand = self.candidates(context, positions, replace, u)
        rows = np.repeat(np.asarray(context, dtype=np.int64)[None], replace.shape[0], axis=0)
        rows[:, positions] = np.where(replace, cand, rows[:, positions])
        return rows


class UniformSampler(Sampler):
    name = "uniform"

    def candidates(self, context, positions, replace, u):
        return _pick(self.valid_ids, u)


class PosSampler(Sampler):
    """Same-coarse-POS replacement. The vocabulary is tagged once (cached on disk by vocabulary hash)."""

    name = "pos"

    def __init__(self, valid_ids: np.ndarray, tokenizer, *, cache_dir: str | Path | None = None) -> None:
        from .pos import COARSE_TAGS, coarse_tag, load_tagger

        super().__init__(valid_ids)
        self.tagger = load_tagger()  # raises TaggerMissingError naming reagent.sampler
        self.tokenizer = tokenizer
        self._coarse = coarse_tag
        self.tags = COARSE_TAGS
        group = self._vocab_groups(cache_dir)
        self.groups = {t: self.valid_ids[group == g] for g, t in enumerate(self.tags)}
        self._ctx_cache: dict[bytes, np.ndarray] = {}

    def _words(self, ids: np.ndarray) -> list[str]:
        toks = self.tokenizer.convert_ids_to_tokens([int(i) for i in ids])
        return [self.tokenizer.convert_tokens_to_string([t]).strip() if t is not None else "" for t in toks]

    def _vocab_groups(self, cache_dir) -> np.ndarray:
        from ..models.loading import cache_root

        key = hashlib.sha256(("\n".join(self._words(self.valid_ids))).encode("utf-8", "replace")).hexdigest()[:16]
        path = cache_root(str(cache_dir) if cache_dir else None) / "pos" / f"vocab-{key}.npy"
        if path.is_file():
            arr = np.load(path)
            if arr.shape == self.valid_ids.shape:
                return arr
        words = self._words(self.valid_ids)
        index = {t: g for g, t in enumerate(self.tags)}
        groups = np.array(
            [index["SPACE"] if not w else index[self._coarse(self.tagger.tag([w])[0])] for w in words], dtype=np.int8
        )
        try:  # a model-asset cache (like the de-quantised GGUF): temp file + rename, never a partial file
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            with open(tmp, "wb") as f:
                np.save(f, groups)
            os.replace(tmp, path)
        except OSError as err:  # cache is an optimisation only
            log.warning("could not cache POS tags of the vocabulary at %s: %s", path, err)
        return groups

    def context_tags(self, context: np.ndarray, positions: np.ndarray) -> list[str]:
        key = np.asarray(context, dtype=np.int64).tobytes() + b"|" + np.asarray(positions, dtype=np.int64).tobytes()
        hit = self._ctx_cache.get(key)
        if hit is None:
            words = self._words(np.asarray(context)[positions])
            nonempty = [w for w in words if w]
            tagged = iter(self.tagger.tag(nonempty)) if nonempty else iter(())
            hit = np.array([self._coarse(next(tagged)) if w else "SPACE" for w in words], dtype=object)
            if len(self._ctx_cache) > 4096:
                self._ctx_cache.clear()
            self._ctx_cache[key] = hit
        return list(hit)

    def candidates(self, context, positions, replace, u):
        tags = self.context_tags(context, positions)
        out = np.empty(u.shape, dtype=np.int64)
        for j, tag in enumerate(tags):
            pool = self.groups.get(tag)
            if pool is None or pool.size == 0:
                pool = self.valid_ids
            out[:, j] = _pick(pool, u[:, j])
        return out


class MLMSampler(Sampler):
    """Masked-LM replacement. With a shared vocabulary the context ids are fed to the MLM directly;
    otherwise each LM token's text is re-tokenised for the MLM and MLM tokens are mapped back to LM
    tokens whose text they spell (word-initial pieces get a leading space)."""

    name = "mlm"

    def __init__(self, valid_ids: np.ndarray, lm_tokenizer, mlm_model, mlm_tokenizer, *, batch_rows: int = 256) -> None:
        super().__init__(valid_ids)
        if getattr(mlm_tokenizer, "mask_token_id", None) is None:
            raise ConfigError("reagent.mlm_path: the tokenizer of that model has no mask token; give a masked LM")
        self.mlm = mlm_model.eval()
        self.mtok = mlm_tokenizer
        self.ltok = lm_tokenizer
        self.batch_rows = batch_rows
        self.device = next(mlm_model.parameters()).device
        self.shared = mlm_tokenizer.get_vocab() == lm_tokenizer.get_vocab()
        valid = set(self.valid_ids.tolist())
        mlm_limit = vocab_limit(mlm_model, mlm_tokenizer)
        mlm_special = special_token_ids(mlm_tokenizer)
        if self.shared:
            cand = [i for i in self.valid_ids.tolist() if i < mlm_limit and i not in mlm_special]
            self.cand_mlm = np.array(cand, dtype=np.int64)
            self.cand_lm = self.cand_mlm.copy()
        else:
            pairs = []
            for tok, mid in mlm_tokenizer.get_vocab().items():
                if mid >= mlm_limit or mid in mlm_special:
                    continue
                text = tok[2:] if tok.startswith("##") else " " + mlm_tokenizer.convert_tokens_to_string([tok]).strip()
                ids = lm_tokenizer.encode(text, add_special_tokens=False)
                if len(ids) == 1 and ids[0] in valid:
                    pairs.append((mid, ids[0]))
            pairs.sort()
            self.cand_mlm = np.array([p[0] for p in pairs], dtype=np.int64)
            self.cand_lm = np.array([p[1] for p in pairs], dtype=np.int64)
        if self.cand_mlm.size == 0:
            raise ConfigError("reagent.mlm_path: no token of that masked LM maps onto a token of the attributed LM")
        self._pieces: dict[int, list[int]] = {}

    def _mlm_pieces(self, lm_id: int) -> list[int]:
        p = self._pieces.get(lm_id)
        if p is None:
            text = self.ltok.decode([lm_id])
            p = self.mtok.encode(text.strip(), add_special_tokens=False) if text.strip() else []
            self._pieces[lm_id] = p
        return p

    @torch.inference_mode()
    def candidates(self, context, positions, replace, u):
        context = np.asarray(context, dtype=np.int64)
        n_rows, n_pos = replace.shape
        out = np.zeros((n_rows, n_pos), dtype=np.int64)
        cls = [self.mtok.cls_token_id] if self.mtok.cls_token_id is not None else []
        sep = [self.mtok.sep_token_id] if self.mtok.sep_token_id is not None else []
        mask_id = self.mtok.mask_token_id
        pos_index = {int(p): j for j, p in enumerate(positions)}
        seqs, where = [], []  # where[r] = list of (j, index in MLM sequence)
        for r in range(n_rows):
            seq, loc = list(cls), []
            for t, tid in enumerate(context.tolist()):
                j = pos_index.get(t)
                if j is not None and replace[r, j]:
                    loc.append((j, len(seq)))
                    seq.append(mask_id)
                elif self.shared:
                    seq.append(tid)
                else:
                    seq.extend(self._mlm_pieces(tid))
            seqs.append(seq + sep)
            where.append(loc)
        cand = torch.from_numpy(self.cand_mlm).to(self.device)
        pad = self.mtok.pad_token_id or 0
        for s in range(0, n_rows, self.batch_rows):
            chunk = list(range(s, min(n_rows, s + self.batch_rows)))
            if not any(where[r] for r in chunk):
                continue
            width = max(len(seqs[r]) for r in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            att = torch.zeros((len(chunk), width), dtype=torch.long)
            for k, r in enumerate(chunk):
                ids[k, : len(seqs[r])] = torch.tensor(seqs[r])
                att[k, : len(seqs[r])] = 1
            logits = self.mlm(input_ids=ids.to(self.device), attention_mask=att.to(self.device)).logits
            for k, r in enumerate(chunk):
                if not where[r]:
                    continue
                js = [j for j, _ in where[r]]
                locs = torch.tensor([i for _, i in where[r]], device=self.device)
                probs = torch.softmax(logits[k, locs][:, cand].double(), dim=-1).cpu().numpy()
                cdf = np.cumsum(probs, axis=1)
                cdf /= cdf[:, -1:]
                pick = np.array([np.searchsorted(cdf[i], u[r, j], side="right") for i, j in enumerate(js)])
                out[r, js] = self.cand_lm[np.minimum(pick, len(self.cand_lm) - 1)]
        return out


def build_sampler(name: str, model, tokenizer, *, mlm_path: str | None = None, cache_dir: str | None = None,
                  trust_remote_code: bool = False, batch_rows: int = 256) -> Sampler:
    """Sampler named by ``reagent.sampler`` for this model/tokenizer."""
    valid = valid_token_ids(model, tokenizer)
    if name == "uniform":
        return UniformSampler(valid)
    if name == "pos":
        return PosSampler(valid, tokenizer, cache_dir=cache_dir)
    if name == "mlm":
        if not mlm_path:
            raise ConfigError("reagent.mlm_path: required when reagent.sampler is 'mlm' (a masked LM directory, package:NAME or tiny:bert-mlm)")
        from ..models import load_lm, resolve_model_path

        lm = load_lm(resolve_model_path(mlm_path, cache_dir=cache_dir), trust_remote_code=trust_remote_code)
        if lm.kind != "masked":
            raise ConfigError(f"reagent.mlm_path: {mlm_path!r} is not a masked LM (found a {lm.kind} model)")
        params = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
        if params is not None:
            lm.model.to(params.device)
        return MLMSampler(valid, tokenizer, lm.model, lm.tokenizer, batch_rows=batch_rows)
    raise ConfigError(f"reagent.sampler: must be one of ['uniform', 'pos', 'mlm'], got {name!r}")
