"""Hand-built causal LMs for ReAGent tests, with a Hugging Face-like interface."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch


class OnePositionLM(torch.nn.Module):
    """Next-token logits at position t depend only on the token at position ``min(t, j)``.

    Embeddings are one-hot (V × V identity). ``logits = scale · onehot(f(x_j)) + bias`` with
    ``f(a) = targets[a % len(targets)]`` and a bias that decreases with the id, so a token other than
    ``f(x_j)`` ranks by its bias and the targets (high ids) rank far below the top 3 unless position
    j holds a token mapping to them. Every row is computed independently and exactly (no reductions
    whose order depends on the batch), so batched and batch-1 execution agree bit for bit.
    """

    def __init__(self, vocab_size: int, j: int, *, scale: float = 8.0, n_targets: int = 10) -> None:
        super().__init__()
        self.j = j
        self.config = SimpleNamespace(vocab_size=vocab_size)
        self.emb = torch.nn.Embedding(vocab_size, vocab_size)
        with torch.no_grad():
            self.emb.weight.copy_(torch.eye(vocab_size))
        self.targets = torch.arange(vocab_size - n_targets, vocab_size)
        fmap = self.targets[torch.arange(vocab_size) % n_targets]
        out = torch.zeros(vocab_size, vocab_size)
        out[torch.arange(vocab_size), fmap] = scale
        self.register_buffer("out", out)
        self.register_buffer("bias", torch.linspace(1.0, 0.0, vocab_size))
        self.forward_log: list[np.ndarray] = []

    def target_for(self, token_id: int) -> int:
        return int(self.targets[token_id % len(self.targets)])

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs):
        if inputs_embeds is None:
            self.forward_log.append(input_ids.detach().cpu().numpy().copy())
            e = self.emb(input_ids)
        else:
            e = inputs_embeds
        T = e.shape[1]
        idx = torch.clamp(torch.arange(T, device=e.device), max=self.j)
        src = e[:, idx]  # (B, T, V) one-hot rows (or scaled ones)
        # one-hot @ out is an exact row lookup; written as a sum of products it stays exact for 0/1 inputs
        logits = torch.einsum("btv,vw->btw", src, self.out) + self.bias
        return SimpleNamespace(logits=logits)


def tiny_tokenizer():
    """The word-level tokenizer of the tiny test models (specials: [PAD] [UNK] [CLS] [SEP] [MASK] <s> </s>)."""
    from freeshap_ray.models.tiny import _tokenizer

    tok, _ = _tokenizer("llama")
    return tok
