"""Exact per-example gradient features from batched forward + backward passes with module hooks.

Examples of a batch never interact, so the gradient of Σ_b f_c(x_b) with respect to a module's output at
example b's tokens is example b's own output-gradient. Forward hooks record each selected module's input
and output; one ``autograd.grad`` per differentiated logit returns the output-gradients; parameters never
require grad, so no summed weight gradient is ever formed and nothing before the first selected module
is differentiated. From (input, output-gradient):

- ``nn.Linear`` weight: kept as token factors (G_r = Σ_t g_rt ⊗ a_rt over tokens with g ≠ 0), or
  materialised once per block when the per-token kernel formula would cost more than a dense Gram
  (see :func:`block_features`); bias: Σ_t g_rt;
- ``nn.Embedding`` weight: (id, g) pairs;
- any other module with selected parameters of its own (norms, LoRA scalings, …): per-row gradients by
  ``torch.func.vjp`` of that module alone on the recorded input (cheap: these are small modules).

Raises :class:`HooksUnsupported` where the structure breaks these assumptions (a parameter shared by two
modules, a tuple output, a module that mixes examples); callers fall back to ``torch.func``.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vjp, vmap

from ..models.prompt import EncodedBatch, PromptClassifier
from .features import DenseColumns, EmbeddingFactors, FeatureBlock, LinearFactors
from .projection import ProjectionPlan, ProjectionSpec, plan_projection, tensor_forms

__all__ = ["HooksUnsupported", "block_features", "owning_modules"]


class HooksUnsupported(RuntimeError):
    """The model's structure does not allow the hook-based features (use ``torch.func``)."""


def owning_modules(clf: PromptClassifier, names: list[str]) -> dict[str, tuple[nn.Module, str]]:
    """Selected parameter name → (module that owns it directly, attribute name)."""
    wanted = set(names)
    found: dict[str, tuple[nn.Module, str]] = {}
    owners: dict[int, list[str]] = defaultdict(list)
    for mname, mod in clf.named_modules(remove_duplicate=False):
        for pname, p in mod.named_parameters(recurse=False):
            owners[id(p)].append(f"{mname}.{pname}" if mname else pname)
            full = f"{mname}.{pname}" if mname else pname
            if full in wanted:
                found[full] = (mod, pname)
    for n in names:
        if n not in found:
            raise HooksUnsupported(f"parameter {n} is not owned by a module")
        mod, attr = found[n]
        if len(owners[id(getattr(mod, attr))]) > 1:
            raise HooksUnsupported(f"parameter {n} is shared by several modules")
    return found


CALL_OVERHEAD_TOKENS = 16  # fixed cost of one forward call, in padded tokens (measured: ~35 ms ≈ 16 tokens of SmolLM2 on CPU)


def _micro_batches(lengths: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """Indices grouped into forward calls of length-sorted examples, each call's padded size ≤ max_tokens.

    The grouping minimises the padded tokens computed plus a fixed cost per call
    (:data:`CALL_OVERHEAD_TOKENS`) by dynamic programming over the sorted lengths (a group is a run of
    consecutive sorted examples, padded to its longest): splitting a block only where that pays keeps
    padding small without making the matrix products tiny. A single example longer than ``max_tokens``
    gets a call of its own.
    """
    order = np.argsort(lengths, kind="stable")
    ls = lengths[order].astype(np.int64)
    n = len(ls)
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    cut = np.zeros(n + 1, dtype=np.int64)
    for j in range(1, n + 1):  # best[j]: cost of the first j sorted examples; the last group is (i, j]
        longest = int(ls[j - 1])
        for i in range(j - 1, -1, -1):
            size = j - i
            if size > 1 and size * longest > max_tokens:
                break
            c = best[i] + size * longest + CALL_OVERHEAD_TOKENS
            if c < best[j]:
                best[j], cut[j] = c, i
    groups = []
    j = n
    while j > 0:
        groups.append(order[cut[j] : j])
        j = int(cut[j])
    return groups[::-1]


class _Recorder:
    """Forward hooks that record (input, output) of the modules owning selected parameters."""

    def __init__(self, modules: list[nn.Module], batch: int):
        self.batch = batch
        self.calls: dict[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
        self.handles = [m.register_forward_hook(self._hook) for m in modules]

    def _hook(self, mod: nn.Module, args, out):
        if not torch.is_tensor(out) or not args or not torch.is_tensor(args[0]):
            raise HooksUnsupported(f"{type(mod).__name__}: needs one tensor input and one tensor output")
        x = args[0]
        if out.shape[0] != self.batch:
            if out.shape[0] != 1 or x.shape[0] != 1:
                raise HooksUnsupported(f"{type(mod).__name__}: output batch dimension {out.shape[0]} != {self.batch}")
            out = out.expand(self.batch, *out.shape[1:])  # broadcast module (e.g. position embeddings)
            x = x.expand(self.batch, *x.shape[1:])
        if not out.requires_grad:
            out = out.detach().requires_grad_(True)  # first differentiated point: nothing before it is tracked
        self.calls[mod].append((x.detach(), out))
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class _Accumulator:
    """Collects per-row pieces of one block across micro-batches."""

    def __init__(self, rows: int):
        self.rows = rows
        self.dense: dict[str, torch.Tensor] = {}
        self.linear: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = defaultdict(list)
        self.embedding: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = defaultdict(list)

    def add_dense(self, key: str, rows: torch.Tensor, value: torch.Tensor) -> None:
        if key not in self.dense:
            self.dense[key] = torch.zeros(self.rows, value.shape[1], dtype=torch.float32)
        self.dense[key].index_add_(0, rows, value.to(device="cpu", dtype=torch.float32))


def _rows_of(x: torch.Tensor, n_out: int) -> torch.Tensor:
    """Per-example tensor (B, ...) → per-row (B·C', ...) (example-major rows)."""
    return x.repeat_interleave(n_out, dim=0) if n_out > 1 else x


def _record_micro_batch(
    clf: PromptClassifier,
    batch: EncodedBatch,
    owned: dict[str, tuple[nn.Module, str]],
    n_out: int,
    global_rows: torch.Tensor,
    acc: _Accumulator,
    proj: ProjectionPlan | None = None,
) -> None:
    by_module: dict[nn.Module, list[tuple[str, str]]] = defaultdict(list)
    for name, (mod, attr) in owned.items():
        by_module[mod].append((name, attr))
    dev = next(clf.parameters()).device
    b = len(batch)
    rec = _Recorder(list(by_module), b)
    try:
        logits = clf(batch.input_ids.to(dev), batch.attention_mask.to(dev), batch.read_pos.to(dev))
    finally:
        rec.remove()
    flat = [(mod, i, out) for mod, calls in rec.calls.items() for i, (_, out) in enumerate(calls)]
    if not flat:
        raise HooksUnsupported("no selected module took part in the forward pass")
    grads_per_out: list[list[torch.Tensor | None]] = []
    for c in range(n_out):
        gs = torch.autograd.grad(
            logits[:, c].sum(), [o for _, _, o in flat], allow_unused=True, retain_graph=c < n_out - 1
        )
        grads_per_out.append(list(gs))
    del logits
    for k in range(len(flat)):
        # Release each call's recorded tensors and output-gradients once its features are taken: with
        # every parameter selected they are as large as the features themselves.
        mod, i, out = flat[k]
        flat[k] = None
        x = rec.calls[mod][i][0]
        rec.calls[mod][i] = None
        per_c = [gs[k] if gs[k] is not None else torch.zeros_like(out) for gs in grads_per_out]
        for gs in grads_per_out:
            gs[k] = None
        g = torch.stack(per_c, dim=1).reshape(b * n_out, *out.shape[1:]).detach()  # example-major rows
        del per_c, out
        if proj is None:
            _features_of_call(mod, by_module[mod], x, g, n_out, global_rows, acc)
        else:
            _projected_features_of_call(mod, by_module[mod], x, g, n_out, global_rows, acc, proj)
        del x, g


def _embedding_tokens(mod: nn.Embedding, x: torch.Tensor, g: torch.Tensor, n_out: int):
    """The active tokens of an embedding call: their ids (N,), output-gradients (N, d) and rows (N,)."""
    if mod.max_norm is not None or mod.scale_grad_by_freq or mod.sparse:
        raise HooksUnsupported("nn.Embedding with max_norm/scale_grad_by_freq/sparse")
    ids = _rows_of(x.reshape(x.shape[0], -1), n_out)
    gg = g.reshape(g.shape[0], -1, mod.embedding_dim).float()
    active = (gg != 0).any(-1)
    if mod.padding_idx is not None:
        active &= ids != mod.padding_idx  # the padding row never receives gradient
    r_idx, t_idx = active.nonzero(as_tuple=True)
    return ids[r_idx, t_idx], gg[r_idx, t_idx], r_idx


def _features_of_call(mod, params, x, g, n_out, global_rows, acc: _Accumulator) -> None:
    rows = g.shape[0]
    if isinstance(mod, nn.Linear):
        d_in, d_out = mod.in_features, mod.out_features
        a = _rows_of(x.reshape(x.shape[0], -1, d_in), n_out).float()
        gg = g.reshape(rows, -1, d_out).float()
        for name, attr in params:
            if attr == "bias":
                acc.add_dense(name, global_rows, gg.sum(1))
            elif attr == "weight":
                active = (gg != 0).any(-1)  # (R, T)
                r_idx, t_idx = active.nonzero(as_tuple=True)
                acc.linear[name].append((a[r_idx, t_idx].cpu(), gg[r_idx, t_idx].cpu(), global_rows[r_idx.cpu()]))
            else:  # pragma: no cover - nn.Linear has no other parameters
                raise HooksUnsupported(f"{name}: unexpected Linear parameter")
        return
    if isinstance(mod, nn.Embedding):
        ids, gg, r_idx = _embedding_tokens(mod, x, g, n_out)
        for name, _ in params:
            acc.embedding[name].append((ids.cpu(), gg.cpu(), global_rows[r_idx.cpu()]))
        return
    per_row = _generic_per_row(mod, params, x, g, n_out)
    for name, attr in params:
        acc.add_dense(name, global_rows, per_row[attr].reshape(rows, -1))


def _generic_per_row(mod, params, x, g, n_out) -> dict[str, torch.Tensor]:
    """Per-row gradients of a generic module's own parameters: vjp of the module alone on its input."""
    xr = _rows_of(x, n_out)
    p0 = {attr: getattr(mod, attr).detach() for _, attr in params}

    def one(xi: torch.Tensor, gi: torch.Tensor) -> dict[str, torch.Tensor]:
        _, pull = vjp(lambda p: functional_call(mod, p, (xi[None],))[0], p0)
        return pull(gi)[0]

    try:
        return vmap(one)(xr, g)
    except Exception as err:  # noqa: BLE001 - any failure means this module is not supported here
        raise HooksUnsupported(f"{type(mod).__name__}: per-row vjp failed: {err}") from err


def _projected_features_of_call(mod, params, x, g, n_out, global_rows, acc: _Accumulator,
                                proj: ProjectionPlan) -> None:
    """Projected features (rows, D_t) of one recorded call: Linear weights and embedding tables by the
    Kronecker token form (per-example gradients never formed), everything else by projecting its per-row
    gradient."""
    rows = g.shape[0]
    if isinstance(mod, nn.Linear):
        d_in, d_out = mod.in_features, mod.out_features
        gg = g.reshape(rows, -1, d_out).float()
        for name, attr in params:
            if attr == "bias":
                acc.add_dense(name, global_rows, proj[name].project(gg.sum(1)))
            elif attr == "weight":
                r_idx, t_idx = (gg != 0).any(-1).nonzero(as_tuple=True)
                xa = x.reshape(x.shape[0], -1, d_in)
                a = xa[torch.div(r_idx, n_out, rounding_mode="floor"), t_idx].float()  # inputs are per example
                acc.add_dense(name, global_rows, proj[name].project_tokens(gg[r_idx, t_idx], a, r_idx, rows))
            else:  # pragma: no cover - nn.Linear has no other parameters
                raise HooksUnsupported(f"{name}: unexpected Linear parameter")
        return
    if isinstance(mod, nn.Embedding):
        ids, gg, r_idx = _embedding_tokens(mod, x, g, n_out)
        for name, _ in params:
            acc.add_dense(name, global_rows, proj[name].project_tokens(ids, gg, r_idx, rows))
        return
    per_row = _generic_per_row(mod, params, x, g, n_out)
    for name, attr in params:
        acc.add_dense(name, global_rows, proj[name].project(per_row[attr].reshape(rows, -1)))


def block_features(
    clf: PromptClassifier,
    batch: EncodedBatch,
    names: list[str],
    kind: str = "first_logit",
    *,
    max_tokens: int = 2048,
    dense_budget_bytes: int = 2 << 30,
    projection: ProjectionSpec | ProjectionPlan | None = None,
) -> FeatureBlock:
    """Gradient features of one block of B examples over the selected parameters ``names``.

    Args:
        clf: the prompt classifier (eval mode, parameters not requiring grad).
        batch: the block, encoded (right-padded).
        names: selected parameter names.
        kind: ``first_logit`` (C' = 1) or ``full`` (C' = C rows per example).
        max_tokens: padded tokens per micro-batch (examples are grouped by length to limit padding).
        dense_budget_bytes: at most this many bytes of materialised Linear-weight gradients per block;
            layers beyond it stay as token factors and are materialised tile by tile.
        projection: None for exact features; else random-projected features
            (:mod:`freeshap_ray.grads.projection`; a spec is planned over ``names``, a plan — built over
            the whole selection when ``names`` is a parameter shard — is used as is).

    Returns:
        A :class:`FeatureBlock` whose Gram with another block (``kernel.features.feature_tile``) is the
        eNTK tile, exactly (up to float rounding) what the explicit per-example Jacobians give. Projected:
        only ``dense`` (R, Σ_{names} D_t) float32, each parameter's span in the projected space in
        ``columns``; its Gram is an unbiased estimate of the eNTK tile.
    """
    owned = owning_modules(clf, names)
    if isinstance(projection, ProjectionSpec):
        projection = plan_projection(projection, tensor_forms(clf, names))
    n_out = 1 if kind == "first_logit" else clf.n_classes
    b = len(batch)
    acc = _Accumulator(b * n_out)
    lengths = batch.attention_mask.sum(1).numpy()
    with torch.enable_grad():
        for idx in _micro_batches(lengths, max_tokens):
            width = int(lengths[idx].max())
            sub = EncodedBatch(
                batch.input_ids[idx, :width], batch.attention_mask[idx, :width], batch.read_pos[idx]
            )
            ex = torch.from_numpy(idx).long()
            rows = (ex[:, None] * n_out + torch.arange(n_out)[None, :]).reshape(-1)
            _record_micro_batch(clf, sub, owned, n_out, rows, acc, projection)
    if projection is not None:
        return _assemble_projected(acc, names, projection, b, n_out)
    sizes = {n: getattr(m, a).numel() for n, (m, a) in owned.items()}
    return _assemble(acc, names, sizes, b, n_out, dense_budget_bytes)


def _cat_sorted(pieces: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    first = torch.cat([p[0] for p in pieces])
    second = torch.cat([p[1] for p in pieces])
    row = torch.cat([p[2] for p in pieces])
    order = torch.argsort(row, stable=True)
    return first[order], second[order], row[order]


def _assemble(
    acc: _Accumulator, names: list[str], sizes: dict[str, int], b: int, n_out: int, budget: int
) -> FeatureBlock:
    rows = b * n_out
    columns = DenseColumns()
    fill: list[tuple[str, object]] = []  # (parameter, source) in column order; source None means zeros
    linear: list[LinearFactors] = []
    embedding: list[EmbeddingFactors] = []
    spent = 0
    for name in names:  # model order: the layout is the same for every block
        if name in acc.dense:
            columns.add(name, acc.dense[name].shape[1])
            fill.append((name, acc.dense[name]))
        elif name in acc.linear:
            a, g, row = _cat_sorted(acc.linear.pop(name))  # pop: the pieces are freed as they are joined
            fac = LinearFactors(name, a.numpy(), g.numpy(), row.numpy())
            per_row_tokens = len(row) / max(rows, 1)
            tokens_cheaper = per_row_tokens**2 * (a.shape[1] + g.shape[1]) < fac.n_params
            size = rows * fac.n_params * 4
            if not tokens_cheaper and spent + size <= budget:
                spent += size
                columns.add(name, fac.n_params)
                fill.append((name, fac))
            else:
                linear.append(fac)
        elif name in acc.embedding:
            ids, g, row = _cat_sorted(acc.embedding.pop(name))
            embedding.append(EmbeddingFactors(name, ids.numpy(), g.numpy(), row.numpy()))
        else:  # the module never ran (or its output never reached the logits): zero gradient
            columns.add(name, sizes[name])
            fill.append((name, None))
    # One allocation, written in place (materialised gradients go straight into their column span).
    width = max((e for _, e in columns.spans.values()), default=0)
    dense = torch.empty(rows, width)
    for name, src in fill:
        s, e = columns.spans[name]
        if src is None:
            dense[:, s:e].zero_()
        elif isinstance(src, LinearFactors):
            src.materialize(rows, out=dense[:, s:e])
        else:
            dense[:, s:e] = src
    return FeatureBlock(b, n_out, dense.numpy(), columns, linear, embedding)


def _assemble_projected(acc: _Accumulator, names: list[str], proj: ProjectionPlan, b: int, n_out: int) -> FeatureBlock:
    columns = DenseColumns()
    dense = torch.zeros(b * n_out, proj.dims(names))
    for name in names:  # model order; a tensor whose module never ran keeps zero features
        s, e = columns.add(name, proj[name].dim)
        if name in acc.dense:
            dense[:, s:e] = acc.dense.pop(name)
    return FeatureBlock(b, n_out, dense.numpy(), columns)
