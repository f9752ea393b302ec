"""Projected gradient features (freeshap_ray.grads.projection): determinism, budget rule, agreement of the hook
path with explicit projection matrices applied to jacrev Jacobians, unbiasedness, and the exact fallback.

Rounding bounds are Higham's deterministic γ_n = n·u/(1 − n·u) (u = 2⁻²⁴) applied to the absolute values of
the computation: |fl(Σ x_i y_i) − Σ x_i y_i| ≤ γ_n Σ |x_i y_i|.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest
import torch

from freeshap_ray.config import KernelConfig, ModelConfig
from freeshap_ray.errors import ConfigError
from freeshap_ray.grads.features import LinearFactors
from freeshap_ray.grads.hooks import block_features
from freeshap_ray.grads.projection import (
    CHUNK_COLS,
    ProjectionSpec,
    TensorProjection,
    allocate,
    gaussian,
    plan_projection,
    tensor_forms,
)
from freeshap_ray.kernel.features import feature_tile
from freeshap_ray.kernel.worker import KernelWorker
from freeshap_ray.models import load_classifier, resolve_model_path, select_params

from .helpers import TEMPLATES, TEXTS, reference_jacobians, reference_kernel, rel_err

U32 = 2.0**-24


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread (a second one only spins, and slows the shared CPUs)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def gamma(n: int) -> float:
    return n * U32 / (1 - n * U32)


def _setup(arch: str, params: str = "all"):
    cfg = ModelConfig(path=f"tiny:{arch}", template=TEMPLATES[arch], label_words=("bad", "good"), params=params)
    model_dir = resolve_model_path(cfg.path)
    clf = load_classifier(model_dir, cfg, attn_implementation="sdpa")
    eager = load_classifier(model_dir, cfg)  # jacrev reference: no vmap rule for SDPA
    return cfg, clf, eager, select_params(clf, cfg.params)


def explicit_matrix(tp: TensorProjection) -> torch.Tensor:
    """(D_t, P_t) float64 matrix of a tensor's projection, built independently of ``project``: the stacked
    Kronecker products R_L^j ⊗ R_R^j (torch.kron) or the concatenated dense chunks."""
    if tp.exact:
        return torch.eye(tp.numel, dtype=torch.float64)
    if tp.form == "dense":
        chunks = [tp.dense_t(c) for c in range(math.ceil(tp.numel / CHUNK_COLS))]
        return torch.cat(chunks).double().T
    big_l, big_r = tp.shape
    lt = tp.left_t()
    rt = tp.right_t()
    lt = torch.eye(big_l) if lt is None else lt
    rt = torch.eye(big_r) if rt is None else rt
    kl, kr = tp.k_left, tp.k_right
    blocks = [torch.kron(lt[:, j * kl:(j + 1) * kl].T.contiguous().double(),
                         rt[:, j * kr:(j + 1) * kr].T.contiguous().double()) for j in range(tp.blocks)]
    return torch.cat(blocks)


# ---- matrices ------------------------------------------------------------------------------------------


def test_matrices_depend_only_on_seed_name_and_part_in_any_process(tmp_path):
    """Another interpreter (another hash salt) builds bitwise the same matrix; seed, name or part change it."""
    args = (7, "backbone.layers.0.mlp.up_proj.weight", "left", (64, 24), 0.25)
    here = gaussian(*args).numpy()
    out = tmp_path / "m.npy"
    code = ("import numpy as np; from freeshap_ray.grads.projection import gaussian; "
            f"np.save({str(out)!r}, gaussian(*{args!r}).numpy())")
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=root, timeout=300)
    assert np.array_equal(np.load(out), here)
    for other in ((8, *args[1:]), (7, args[1] + "x", *args[2:]), (7, args[1], "right", *args[3:])):
        assert not np.array_equal(gaussian(*other).numpy(), here)


def test_matrix_entries_have_the_stated_distribution():
    """Sample mean and variance of N entries of N(0, σ²): within 5 standard errors (σ/√N and σ²·√(2/N))."""
    std = 0.1
    x = gaussian(3, "w", "dense:0", (500, 400), std).double()
    n = x.numel()
    assert abs(float(x.mean())) <= 5 * std / math.sqrt(n)
    assert abs(float(x.var()) / std**2 - 1) <= 5 * math.sqrt(2 / n)


# ---- budget rule ---------------------------------------------------------------------------------------


def test_allocate_follows_the_documented_rule():
    # Floor f = 200 // 16 = 12: sizes 10 and 5 exact; 185 split ∝ size over (1000, 100), largest remainder.
    assert allocate([1000, 10, 100, 5], 200) == [168, 10, 17, 5]
    # f = 25: the 60-tensor's share (11.3) is floored to 25 — under half its size, so it stays projected.
    assert allocate([1000, 60], 200) == [175, 25]
    # f = 37 ≥ 60/2: the 60-tensor is kept exact and the rest goes to the large one.
    assert allocate([1000, 60], 300) == [240, 60]
    assert allocate([5, 7], 12) == [5, 7] and allocate([5, 7], 100) == [5, 7]
    with pytest.raises(ValueError, match="projection.dim"):
        allocate([10, 10, 10], 2)
    rng = np.random.default_rng(0)
    for _ in range(300):
        sizes = [int(s) for s in rng.integers(1, 5000, rng.integers(1, 12))]
        dim = int(rng.integers(len(sizes), sum(sizes)))
        out = allocate(sizes, dim)
        floor = max(1, dim // (4 * len(sizes)))
        assert sum(out) == dim
        assert all(1 <= d <= p for d, p in zip(out, sizes))
        assert all(d == p for d, p in zip(out, sizes) if p <= floor)
        assert all(d >= min(floor, p) for d, p in zip(out, sizes))
        # Projected tensors above the floor split what is left in proportion to their sizes (±1 rounding).
        prop = [i for i, (d, p) in enumerate(zip(out, sizes)) if d < p and d > floor + 1]
        if len(prop) > 1:
            left = sum(out[i] for i in prop)
            weight = sum(sizes[i] for i in prop)
            assert all(abs(out[i] - left * sizes[i] / weight) < 2 for i in prop)


@pytest.mark.parametrize("block", [0, 4])
def test_plan_factors_kronecker_tensors_within_caps(block):
    """MiniLM-like shapes: k ≤ side, D_t = m·k_L·k_R, identity sides only where the cap is reached, and
    the factoring loses less than one side (or one block) in total thanks to the carry."""
    shapes = [("q.weight", (384, 384), "kron"), ("q.bias", (384,), "dense"), ("up.weight", (1536, 384), "kron"),
              ("down.weight", (384, 1536), "kron"), ("ln.weight", (384,), "dense"),
              ("emb.weight", (30522, 384), "kron"), ("head.weight", (2, 384), "kron")]
    for dim in (64, 1000, 8192, 100_000):
        plan = plan_projection(ProjectionSpec(dim, 0, block), shapes)
        assert plan.dim <= dim
        worst = max(max(t.k_left, t.k_right) if not block else block * block for t in plan.tensors)
        assert dim - plan.dim < worst
        for t in plan.tensors:
            if t.form == "kron":
                big_l, big_r = t.shape
                assert t.dim == t.blocks * t.k_left * t.k_right
                assert 1 <= t.k_left <= big_l and 1 <= t.k_right <= big_r
                if t.blocks > 1:
                    assert t.k_left == t.k_right == block
    head = plan_projection(ProjectionSpec(8192), [("w", (384, 384), "kron"), ("b", (384,), "dense"),
                                                  ("head.weight", (2, 384), "kron")])
    assert head["head.weight"].exact and head["b"].exact  # the MiniLM cleaning selection


def test_spec_and_config_fields_are_checked():
    with pytest.raises(ValueError, match="projection.dim"):
        ProjectionSpec(0)
    with pytest.raises(ValueError, match="projection.seed"):
        ProjectionSpec(8, -1)
    with pytest.raises(ConfigError, match="kernel.projection_dim"):
        KernelConfig(projection_dim=-1)
    with pytest.raises(ConfigError, match="kernel.projection_seed"):
        KernelConfig(projection_seed=-2)
    with pytest.raises(ConfigError, match="kernel.projection_dim"):
        KernelConfig(projection_dim=64, backend="deepspeed", num_actors=2, param_shards=2)


def test_plan_signature_separates_projected_and_exact_plans():
    from freeshap_ray.kernel.plan import plan_signature

    model_cfg = ModelConfig(path="tiny:llama")
    sig = [plan_signature(["a"], ["b"], model_cfg, KernelConfig(projection_dim=d, projection_seed=s))
           for d, s in ((0, 0), (0, 5), (64, 0), (64, 1), (128, 0))]
    assert sig[0] == sig[1]  # the seed does not matter for an exact kernel
    assert len(set(sig[1:])) == 4


# ---- one tensor: projections against the explicit matrix -----------------------------------------------


@pytest.mark.parametrize("case", ["balanced", "blocks", "identity_left", "embedding", "dense"])
def test_tensor_projection_equals_explicit_matrix(case):
    """``project`` (materialised gradient) and ``project_tokens`` (token factors) against M·vec(G) in float64,
    within γ_n of the same computation on absolute values."""
    torch.manual_seed(0)
    rows, tokens = 3, 11
    big_l, big_r = {"identity_left": (2, 48), "embedding": (40, 16)}.get(case, (24, 40))
    form = "dense" if case == "dense" else "kron"
    shape = (big_l * big_r,) if form == "dense" else (big_l, big_r)
    block = 4 if case == "blocks" else 0
    alloc = {"dense": 300, "identity_left": 60}.get(case, 200)
    plan = plan_projection(ProjectionSpec(alloc, 5, block), [("t", shape, form)])
    tp = plan["t"]
    assert not tp.exact and (tp.blocks > 1) == (case == "blocks")
    assert form == "dense" or (tp.left_t() is None) == (case == "identity_left")
    m = explicit_matrix(tp)
    row = torch.sort(torch.randint(0, rows, (tokens,))).values
    left = torch.randint(0, big_l, (tokens,)) if case == "embedding" else torch.randn(tokens, big_l)
    right = torch.randn(tokens, big_r)
    lmat = torch.nn.functional.one_hot(left, big_l).float() if case == "embedding" else left
    g = torch.zeros(rows, big_l * big_r, dtype=torch.float64).index_add_(
        0, row, torch.einsum("tl,tr->tlr", lmat.double(), right.double()).reshape(tokens, -1))
    g_abs = torch.zeros_like(g).index_add_(
        0, row, torch.einsum("tl,tr->tlr", lmat.abs().double(), right.abs().double()).reshape(tokens, -1))
    scale = g_abs @ m.abs().T
    g32 = g.float()
    got = tp.project(g32).double()
    n = tp.numel if form == "dense" else big_l + big_r
    assert torch.all((got - g32.double() @ m.T).abs() <= gamma(n) * (g32.double().abs() @ m.abs().T))
    if form == "kron":  # G from float32 factors, summed in float64: exact up to ~1e-16
        got_tokens = tp.project_tokens(left, right, row, rows).double()
        assert torch.all((got_tokens - g @ m.T).abs() <= gamma(big_l + big_r + tokens + 1) * scale)


def test_projection_is_unbiased_for_each_form():
    """E[⟨Mx, My⟩] = ⟨x, y⟩ over S seeds for every form: |mean − ⟨x, y⟩| ≤ z·stderr, z for a two-sided
    family-wise α = 1e-3 over the 5 forms × 3 pairs (Bonferroni; the seeds are independent)."""
    torch.manual_seed(1)
    cases = {"balanced": ((24, 40), "kron", 0, 200), "blocks": ((24, 40), "kron", 4, 200),
             "identity_left": ((2, 48), "kron", 0, 60), "embedding": ((40, 16), "kron", 0, 150),
             "dense": ((960,), "dense", 0, 120)}
    s_count = 1000
    z = NormalDist().inv_cdf(1 - 1e-3 / (2 * 15))
    for key, (shape, form, block, alloc) in cases.items():
        p = math.prod(shape)
        x = torch.randn(3, p)
        x[1] = 0.8 * x[0] + 0.6 * x[1]  # a correlated pair
        exact = (x.double() @ x.double().T).numpy()
        est = []
        for s in range(s_count):
            tp = plan_projection(ProjectionSpec(alloc, s, block), [(key, shape, form)])[key]
            phi = tp.project(x).double()
            est.append((phi @ phi.T).numpy())
        est = np.stack(est)
        mean, se = est.mean(0), est.std(0, ddof=1) / math.sqrt(s_count)
        iu = np.triu_indices(3)
        assert np.all(np.abs(mean - exact)[iu] <= z * se[iu]), key
        assert np.all(z * se.diagonal() <= 0.1 * exact.diagonal()), key  # the test resolves a 10 % bias


# ---- the hook pass ---------------------------------------------------------------------------------------


def _hook_gradients(clf, batch, names, kind):
    """Exact hook-path gradients (rows, P) and Σ_τ |l_τ| ⊗ |r_τ| (the absolute values the projected token
    path sums), both float64, from the same forward and backward passes."""
    f = block_features(clf, batch, names, kind, max_tokens=24, dense_budget_bytes=0)
    sizes = {n: dict(clf.named_parameters())[n].numel() for n in names}
    lin = {x.key: x for x in f.linear}
    emb = {e.key: e for e in f.embedding}
    exact, absolute = [], []
    for n in names:
        if n in f.columns.spans:
            s, e = f.columns.spans[n]
            v = torch.from_numpy(f.dense[:, s:e]).double()
            exact.append(v)
            absolute.append(v.abs())
        elif n in lin:
            x = lin[n]
            exact.append(x.materialize(f.rows).double())
            absolute.append(LinearFactors(n, np.abs(x.a), np.abs(x.g), x.row).materialize(f.rows).double())
        else:
            e = emb[n]
            dim = e.g.shape[1]
            idx = torch.from_numpy(e.row) * (sizes[n] // dim) + torch.from_numpy(e.ids)
            g = torch.from_numpy(e.g).double()
            z = torch.zeros(f.rows * (sizes[n] // dim), dim, dtype=torch.float64)
            exact.append(z.clone().index_add_(0, idx, g).reshape(f.rows, -1))
            absolute.append(z.index_add_(0, idx, g.abs()).reshape(f.rows, -1))
    return torch.cat(exact, 1), torch.cat(absolute, 1), max(int(batch.attention_mask.sum(1).max()), 1)


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("params", ["all", "last:1"])
def test_hook_features_equal_the_projected_jacobians(arch, params):
    """Hook-path projected features (Kronecker token form, embeddings, biases, norms; ≥ 2 micro-batches,
    both kernel kinds, one or several Kronecker blocks) equal M·J with M the explicit matrices and J the
    jacrev Jacobians; ``project_flat`` (the ``func`` path) agrees too.

    Bound, per feature: |M| |J_hooks − J_ref| (the gradients' own float32 error, carried through the linear
    map) + 2·γ_n·|M| A, with A = Σ_τ |l_τ| ⊗ |r_τ| the absolute values that both the materialised and the
    projected token sums add up and n = T + L + R + 1 the longest chain of roundings.
    """
    _, clf, eager, names = _setup(arch, params)
    texts = TEXTS[:5]
    ref = reference_jacobians(eager, texts, names)
    forms = tensor_forms(clf, names)
    n_round = max(s[0] + s[1] if f == "kron" else s[0] for _, s, f in forms)
    batch = clf.encode(texts)
    for kind in ("first_logit", "full"):
        c = 1 if kind == "first_logit" else clf.n_classes
        j_ref = ref[:, :c].reshape(len(texts) * c, -1)
        j_hooks, j_abs, t_max = _hook_gradients(clf, batch, names, kind)
        for block in (0, 4):
            plan = plan_projection(ProjectionSpec(400, 11, block), forms)
            assert plan.dim <= 400 and any(t.blocks > 1 for t in plan.tensors) == (block > 0)
            m = torch.block_diag(*(explicit_matrix(plan[n]) for n in names))
            want = j_ref @ m.T
            bound = (j_hooks - j_ref).abs() @ m.abs().T + 2 * gamma(n_round + t_max + 1) * j_abs @ m.abs().T
            f = block_features(clf, batch, names, kind, max_tokens=24, projection=plan)
            assert not f.linear and not f.embedding and f.dense.shape == (len(texts) * c, plan.dim)
            assert list(f.columns.spans) == names
            got = torch.from_numpy(f.dense).double()
            assert torch.all((got - want).abs() <= bound)
            flat = plan.project_flat(j_hooks.float(), names).double()
            assert torch.all((flat - want).abs() <= bound)
            assert float(bound.max()) <= 1e-3 * float(want.abs().max())  # the bound is far below a real error


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_projected_kernel_is_unbiased(arch):
    """The mean of K̂ over S seeds (hook path, both kinds, all parameters) converges to the jacrev kernel.

    Per entry |mean − K| ≤ z·stderr with stderr = sd/√S; z is Bonferroni for a two-sided family-wise
    α = 1e-3 over the 16 + 64 entries tested (z ≈ 4.4 instead of 3 per entry: 3 standard errors alone would
    be exceeded by chance somewhere among 80 entries with probability up to 20 %). The test is not vacuous:
    one K̂ differs from K by far more than rounding, and the standard errors resolve a 50 % bias on every
    diagonal entry.
    """
    _, clf, eager, names = _setup(arch)
    texts = TEXTS[:4]
    ref = reference_jacobians(eager, texts, names)
    forms = tensor_forms(clf, names)
    batch = clf.encode(texts)
    s_count, dim = 300, 256
    z = NormalDist().inv_cdf(1 - 1e-3 / (2 * 80))
    for kind in ("first_logit", "full"):
        want = reference_kernel(ref, ref, kind)
        est = []
        for s in range(s_count):
            f = block_features(clf, batch, names, kind, projection=plan_projection(ProjectionSpec(dim, s), forms))
            est.append(feature_tile(f, f))
        est = np.stack(est)
        mean, se = est.mean(0), est.std(0, ddof=1) / math.sqrt(s_count)
        assert np.all(np.abs(mean - want) <= z * se)
        assert rel_err(est[0], want) > 1e-2
        diag = (lambda k: np.einsum("ii->i", k)) if kind == "first_logit" else (lambda k: np.einsum("iicc->ic", k))
        assert np.all(z * diag(se) <= 0.5 * np.abs(diag(want)))


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_error_falls_as_the_dimension_grows(arch):
    """Mean relative Frobenius error over 16 seeds drops at least 2× from D to 16·D (full kernel).

    Expected factor: 4 for dense projections and many-token layers (error ∝ D^(-1/2)), 2 in the worst case
    of one-token layers under a single Kronecker product (∝ D^(-1/4)); Kronecker blocks (the default) are
    ∝ D^(-1/2) again, and at 16·D more tensors are exact, so 2 is a safe lower bound.
    """
    _, clf, eager, names = _setup(arch)
    ref = reference_jacobians(eager, TEXTS[:5], names)
    j = ref.reshape(-1, ref.shape[-1])
    k = (j @ j.T).numpy()
    forms = tensor_forms(clf, names)

    def err(dim: int, seed: int) -> float:
        phi = plan_projection(ProjectionSpec(dim, seed), forms).project_flat(j.float(), names).double()
        return float(np.linalg.norm((phi @ phi.T).numpy() - k) / np.linalg.norm(k))

    small = np.mean([err(256, s) for s in range(16)])
    large = np.mean([err(4096, s) for s in range(16)])
    assert large <= small / 2


def test_exact_fallback():
    """D ≥ P keeps every tensor exact: the features are the gradients and K̂ = K (the exact path's 1e-5)."""
    cfg, clf, eager, names = _setup("bert")
    forms = tensor_forms(clf, names)
    total = sum(math.prod(s) for _, s, _ in forms)
    plan = plan_projection(ProjectionSpec(total + 1), forms)
    assert all(t.exact for t in plan.tensors) and plan.dim == total
    ref = reference_jacobians(eager, TEXTS[:4], names)
    f = block_features(clf, clf.encode(TEXTS[:4]), names, "full", projection=plan)
    assert rel_err(feature_tile(f, f), reference_kernel(ref, ref, "full")) <= 1e-5
    assert rel_err(f.dense, ref.reshape(8, -1).numpy()) <= 1e-5
    exact = block_features(clf, clf.encode(TEXTS[:4]), names, "full")
    assert exact.linear and exact.embedding  # projection=None: the exact representation, unchanged


# ---- the worker ------------------------------------------------------------------------------------------


def test_worker_projected_features_hooks_func_and_shards():
    """Both methods give the same projected features; two parameter shards planned over the whole selection
    give the columns of the unsharded features; ``features`` needs a projection."""
    cfg, _, _, names = _setup("llama", "last:1")
    model_dir = resolve_model_path(cfg.path)
    kw = dict(kind="full", projection_dim=300, projection_seed=3)
    hooks = KernelWorker(model_dir, cfg, KernelConfig(method="hooks", **kw))
    func = KernelWorker(model_dir, cfg, KernelConfig(method="func", **kw))
    fh, ff = hooks.features(TEXTS[:3]), func.features(TEXTS[:3])
    assert fh.shape == ff.shape == (6, hooks.projection.dim) and fh.dtype == np.float32
    assert rel_err(fh, ff) <= 1e-5
    ka = hooks.tile(hooks.jacobian(TEXTS[:3]), hooks.jacobian(TEXTS[3:5]), 1 << 20)
    kb = func.tile(func.jacobian(TEXTS[:3]), func.jacobian(TEXTS[3:5]), 1 << 20)
    assert ka.shape == (3, 2, 2, 2) and rel_err(ka, kb) <= 1e-5
    half = len(names) // 2
    shards = [KernelWorker(model_dir, cfg, KernelConfig(method="hooks", **kw), param_names=p)
              for p in (names[:half], names[half:])]
    joined = np.concatenate([w.features(TEXTS[:3]) for w in shards], axis=1)
    assert rel_err(joined, fh) <= 1e-5
    with pytest.raises(ValueError, match="projection_dim"):
        KernelWorker(model_dir, cfg, KernelConfig(kind="full", method="hooks")).features(TEXTS[:2])
