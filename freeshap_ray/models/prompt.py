"""Prompt-based classifier: language model + template + one label word per class.

The LM's output embedding is replaced by a C×d label-word head initialised from the output-embedding rows
of the label words, so at initialisation the classifier's logits equal the LM's logits restricted to the
label words. Causal LMs read the last prompt position (the next-token prediction), masked LMs read the
``{mask}`` position. An encoder without an LM head gets a fresh head initialised from the *input*
embedding rows of the label words (what a tied LM head would hold) and reads ``{mask}`` if the template
has one, else the first ([CLS]) position.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ModelError
from .loading import LoadedLM

__all__ = ["EncodedBatch", "PromptClassifier"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodedBatch:
    """Right-padded token ids of templated texts.

    Attributes:
        input_ids: (B, L) int64.
        attention_mask: (B, L) int64, 1 for real tokens.
        read_pos: (B,) int64 position whose features give the label-word logits.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    read_pos: torch.Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def _replace_module(root: nn.Module, target: nn.Module, new: nn.Module) -> nn.Module:
    """Replace submodule ``target`` of ``root`` by ``new``; returns the parent module."""
    for name, mod in root.named_modules():
        if mod is target and name:
            parent_name, _, attr = name.rpartition(".")
            parent = root.get_submodule(parent_name) if parent_name else root
            setattr(parent, attr, new)
            return parent
    raise ModelError("model: could not locate the output embedding module to replace")  # pragma: no cover


class PromptClassifier(nn.Module):
    """Label-word logits f(x) ∈ R^C of a templated input.

    Args:
        lm: loaded model, tokenizer and kind.
        template: prompt with ``{text}`` (and ``{mask}`` for masked LMs).
        label_words: one word per class; the first token of each is used.
        max_length: token budget; longer texts are truncated from the end, the template is kept.
    """

    def __init__(self, lm: LoadedLM, template: str, label_words: tuple[str, ...] | list[str], max_length: int = 128):
        super().__init__()
        self.kind = lm.kind
        self.tokenizer = lm.tokenizer
        self.template = template
        self.max_length = int(max_length)
        self._check_template()
        self.label_token_ids = self._label_ids(label_words)
        ids = torch.tensor(self.label_token_ids)
        model = lm.model
        if self.kind == "encoder":
            weight = model.get_input_embeddings().weight.detach()[ids].clone()
            bias = None
            if getattr(model, "pooler", None) is not None:
                model.pooler = None  # unused by label-word logits; its gradient would be zero
        else:
            out = model.get_output_embeddings()
            weight = out.weight.detach()[ids].clone()
            bias = out.bias.detach()[ids].clone() if getattr(out, "bias", None) is not None else None
            parent = _replace_module(model, out, nn.Identity())
            if isinstance(getattr(parent, "bias", None), nn.Parameter):
                parent.bias = None  # e.g. BERT's LM-head bias, now carried by the label-word head
        self.backbone = model
        self.head = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            self.head.weight.copy_(weight)
            if bias is not None:
                self.head.bias.copy_(bias)
        self.requires_grad_(False)  # gradients are taken with torch.func, never with .backward()
        self.eval()

    # ------------------------------------------------------------------------------------------
    @property
    def n_classes(self) -> int:
        return len(self.label_token_ids)

    def _check_template(self) -> None:
        has_mask = "{mask}" in self.template
        if self.kind == "causal" and has_mask:
            raise ModelError("model.template: causal LMs read the next-token position; remove '{mask}'")
        if self.kind == "masked" and not has_mask:
            raise ModelError("model.template: a masked LM needs '{mask}' where the label word goes")
        if has_mask and getattr(self.tokenizer, "mask_token", None) is None:
            raise ModelError("model.template: uses '{mask}' but the tokenizer has no mask token")

    def _label_ids(self, words) -> list[int]:
        ids = []
        for w in words:
            toks = self.tokenizer(w, add_special_tokens=False)["input_ids"]
            if not toks:
                raise ModelError(f"model.label_words: {w!r} tokenizes to nothing")
            if len(toks) > 1:
                log.warning("model.label_words: %r is %d tokens; using its first token", w, len(toks))
            ids.append(int(toks[0]))
        if len(set(ids)) != len(ids):
            raise ModelError(f"model.label_words: {list(words)} map to repeated first tokens {ids}")
        return ids

    # ------------------------------------------------------------------------------------------
    def _render(self, text: str) -> str:
        before, after = self.template.split("{text}", 1)
        mask = getattr(self.tokenizer, "mask_token", None) or ""
        return before.replace("{mask}", mask) + text + after.replace("{mask}", mask)

    def _ids(self, text: str) -> list[int]:
        ids = self.tokenizer(self._render(text))["input_ids"]
        if len(ids) <= self.max_length:
            return ids
        text_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        keep = max(0, len(text_ids) - (len(ids) - self.max_length))
        while True:
            ids = self.tokenizer(self._render(self.tokenizer.decode(text_ids[:keep])))["input_ids"]
            if len(ids) <= self.max_length:
                return ids
            if keep == 0:
                raise ModelError(f"model.max_length: {self.max_length} tokens cannot hold the template alone")
            keep = max(0, keep - 4)

    def _read_pos(self, ids: list[int]) -> int:
        if self.kind == "causal":
            return len(ids) - 1
        if "{mask}" in self.template:
            mask_id = self.tokenizer.mask_token_id
            if mask_id not in ids:
                raise ModelError("model.template: the mask token was lost in tokenization")
            return ids.index(mask_id)
        return 0

    def encode(self, texts: list[str] | tuple[str, ...]) -> EncodedBatch:
        """Template, tokenize, truncate and right-pad a list of texts."""
        rows = [self._ids(t) for t in texts]
        length = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        pad = 0 if pad is None else int(pad)
        input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
        attention = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r)
            attention[i, : len(r)] = 1
        read_pos = torch.tensor([self._read_pos(r) for r in rows], dtype=torch.long)
        return EncodedBatch(input_ids, attention, read_pos)

    # ------------------------------------------------------------------------------------------
    def _features(self, input_ids: torch.Tensor, mask) -> torch.Tensor:
        out = self.backbone(input_ids=input_ids, attention_mask=mask)
        return out.logits if self.kind != "encoder" else out.last_hidden_state

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, read_pos: torch.Tensor, single: bool = False
    ) -> torch.Tensor:
        """Label-word logits (B, C) of a batch with a standard 2-D padding mask.

        With ``single=True`` the inputs are ONE example ((L,), (L,), ()) and the result is (C,); this path
        is what ``torch.func`` transforms (see :meth:`single_logits`).
        """
        if single:
            return self.single_logits(input_ids, attention_mask, read_pos)
        feats = self._features(input_ids, attention_mask)  # (B, L, d)
        picked = feats[torch.arange(feats.shape[0]), read_pos]  # (B, d)
        return self.head(picked)

    def single_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, read_pos: torch.Tensor) -> torch.Tensor:
        """Logits (C,) of ONE example (L,), written without data-dependent control flow for vmap.

        Causal LMs need no mask: with right padding, pads come after the read position and cannot
        affect it. Bidirectional models get an additive 4-D mask (1, 1, L, L).
        """
        length = input_ids.shape[0]
        if self.kind == "causal":
            mask = None
        else:
            neg = torch.finfo(torch.float32).min
            mask = ((1.0 - attention_mask.to(torch.float32)) * neg)[None, None, None, :].expand(1, 1, length, length)
        feats = self._features(input_ids[None], mask)[0]  # (L, d)
        onehot = (torch.arange(length, device=feats.device) == read_pos).to(feats.dtype)  # (L,)
        return self.head(onehot @ feats)
