"""Soft-NS (sufficiency) and Soft-NC (comprehensiveness) faithfulness of token importances.

For a target y with context x, p = the model's next-token distribution on x. Importances of the
replaceable positions are normalised to a = s / max(s) in [0, 1]; special positions are always kept.
With S shared uniform draws u (S × L):

- sufficiency input: embedding i kept where ``u_i < a_i`` (kept with probability a_i), else zeroed;
- comprehensiveness input: embedding i zeroed where ``u_i < a_i`` (removed with probability a_i);
- baseline: every replaceable embedding zeroed.

With Hellinger ``D(p, q) = ||sqrt p - sqrt q||_2 / sqrt 2`` and ``D0 = D(p, q_zero)``:
``Soft-NS = mean_samples max(0, D0 - D(p, q_suff)) / D0`` and ``Soft-NC = mean_samples D(p, q_comp) / D0``
(higher is better for both). Each is reported with the same quantity for uniform random importances
(same u) as ``ln(score / score_random)`` (both floored at 1e-6); > 0 means better than random.
A model whose output ignores the input (D0 < 1e-12) gets 0 everywhere.
"""

from __future__ import annotations

import numpy as np
import torch

from .algorithm import Target

__all__ = ["hellinger", "soft_faithfulness", "random_scores", "FLOOR"]

FLOOR = 1e-6


def hellinger(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Hellinger distance along the last axis, in [0, 1]."""
    return np.sqrt(((np.sqrt(p) - np.sqrt(q)) ** 2).sum(-1)) / np.sqrt(2.0)


def random_scores(n: int, *, seed: int, prompt_id: int, position: int) -> np.ndarray:
    """Seeded uniform importances for ``n`` positions (the random attribution of the metrics)."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(prompt_id), int(position), 104])))
    return rng.random(n)


@torch.no_grad()
def _probs_from_embeds(model, embeds: torch.Tensor) -> np.ndarray:
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    logits = model(inputs_embeds=embeds, attention_mask=mask).logits[:, -1].double()
    return torch.softmax(logits, dim=-1).cpu().numpy()


def soft_faithfulness(model, target: Target, scores: np.ndarray, replaceable: np.ndarray, *, n_samples: int = 16,
                      seed: int = 0, reference_scores: np.ndarray | None = None) -> dict[str, float]:
    """Soft-NS/Soft-NC of ``scores`` (T,) and of random importances for one target (the whole next-token
    distribution after ``target.context`` is compared, not only ``target.target_id``'s probability).

    Returns ``soft_ns, soft_nc, soft_ns_random, soft_nc_random, log_soft_ns, log_soft_nc`` (floats).
    """
    context = np.array(target.context, dtype=np.int64)  # writable copy (Ray arrays are read-only)
    prompt_id, position = target.prompt_id, target.position
    pos = np.asarray(replaceable, dtype=np.int64)
    zero = dict(soft_ns=0.0, soft_nc=0.0, soft_ns_random=0.0, soft_nc_random=0.0, log_soft_ns=0.0, log_soft_nc=0.0)
    if pos.size == 0:
        return zero
    rand = reference_scores if reference_scores is not None else random_scores(len(pos), seed=seed, prompt_id=prompt_id, position=position)

    def norm(a):
        a = np.clip(np.asarray(a, dtype=np.float64), 0.0, None)
        m = a.max()
        return a / m if m > 0 else np.zeros_like(a)

    a_fa, a_rand = norm(np.asarray(scores)[pos]), norm(rand)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(prompt_id), int(position), 105])))
    u = rng.random((n_samples, len(pos)))
    T = len(context)
    keep = [np.ones(T), np.ones(T)]
    keep[1][pos] = 0.0  # all-zero baseline
    for a in (a_fa, a_rand):
        for suff in (True, False):
            for row in u:
                m = np.ones(T)
                m[pos] = (row < a) if suff else (row >= a)
                keep.append(m)
    params = next(iter(model.parameters()))
    emb = model.get_input_embeddings()(torch.from_numpy(context).to(params.device))
    scale = torch.from_numpy(np.stack(keep)).to(emb.dtype).to(emb.device)
    probs = _probs_from_embeds(model, emb[None] * scale[:, :, None])
    p, d = probs[0], hellinger(probs[0][None], probs[1:])
    d0, rest = d[0], d[1:].reshape(2, 2, n_samples)
    if d0 < 1e-12:
        return zero
    out = {}
    for k, name in enumerate(("", "_random")):
        out["soft_ns" + name] = float(np.maximum(0.0, d0 - rest[k, 0]).mean() / d0)
        out["soft_nc" + name] = float(rest[k, 1].mean() / d0)
    for m in ("soft_ns", "soft_nc"):
        out["log_" + m] = float(np.log(max(out[m], FLOOR) / max(out[m + "_random"], FLOOR)))
    del p
    return out
