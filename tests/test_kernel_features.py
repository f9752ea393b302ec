"""Hook-based gradient features (one batched forward+backward, per-token formula, materialised gradients)
against explicit per-example Jacobians (torch.func.jacrev)."""

from __future__ import annotations

import numpy as np
import pytest

from freeshap_ray.config import KernelConfig, ModelConfig
from freeshap_ray.errors import ConfigError
from freeshap_ray.grads.hooks import HooksUnsupported, block_features, owning_modules
from freeshap_ray.kernel.features import MIXED_CHUNK, feature_tile
from freeshap_ray.kernel.worker import KernelWorker
from freeshap_ray.models import load_classifier, resolve_model_path, select_params

from .helpers import TEMPLATES, TEXTS, reference_jacobians, reference_kernel, rel_err


def _clf(arch: str, params: str):
    cfg = ModelConfig(path=f"tiny:{arch}", template=TEMPLATES[arch], label_words=("bad", "good"), params=params,
                      lora_r=4 if params == "lora" else 0)
    clf = load_classifier(resolve_model_path(cfg.path), cfg, attn_implementation="sdpa")
    return cfg, clf, select_params(clf, cfg.params)


@pytest.mark.parametrize("arch", ["llama", "bert", "bert-mlm"])
@pytest.mark.parametrize("params", ["all", "lora", "last:1"])
def test_features_match_jacrev(arch, params):
    """Every representation (materialised, token factors, embeddings, generic vjp), both kernel kinds, both
    precisions, several micro-batches and blocks that chose different representations: ≤1e-5 relative."""
    cfg, clf, names = _clf(arch, params)
    eager = load_classifier(resolve_model_path(cfg.path), cfg)  # jacrev reference: no vmap rule for SDPA
    ref = reference_jacobians(eager, TEXTS, names)
    a, b = TEXTS[:5], TEXTS[5:]
    for kind in ("first_logit", "full"):
        dense_a = block_features(clf, clf.encode(a), names, kind, max_tokens=24)  # ≥ 2 micro-batches
        factors_a = block_features(clf, clf.encode(a), names, kind, dense_budget_bytes=0)
        dense_b = block_features(clf, clf.encode(b), names, kind)
        assert factors_a.linear and dense_a.dense.shape[1] > factors_a.dense.shape[1]
        if params == "all":
            assert factors_a.embedding  # word (and for BERT position/type) embeddings as (id, g) pairs
        want_aa = reference_kernel(ref[:5], ref[:5], kind)
        want_ab = reference_kernel(ref[:5], ref[5:], kind)
        for precision in ("float64", "mixed"):
            assert rel_err(feature_tile(dense_a, dense_a, precision=precision, chunk=1000), want_aa) <= 1e-5
            assert rel_err(feature_tile(factors_a, factors_a, precision=precision), want_aa) <= 1e-5
            assert rel_err(feature_tile(factors_a, dense_b, precision=precision), want_ab) <= 1e-5
            assert rel_err(feature_tile(dense_a, dense_b, precision=precision), want_ab) <= 1e-5


def test_only_read_position_layers_use_the_token_formula():
    """Causal LM, last block: q/o/MLP and the head get gradient at the read position only → 1 token per row."""
    _, clf, names = _clf("llama", "last:1")
    f = block_features(clf, clf.encode(TEXTS[:4]), names, dense_budget_bytes=0)
    per_row = {x.key: len(x.row) / f.rows for x in f.linear}
    for key in ("layers.1.self_attn.q_proj.weight", "layers.1.mlp.up_proj.weight", "head.weight"):
        assert per_row[next(k for k in per_row if k.endswith(key))] == 1.0
    assert per_row[next(k for k in per_row if k.endswith("layers.1.self_attn.k_proj.weight"))] > 1.0


def _share_a_weight(clf) -> None:
    layers = clf.backbone.model.layers
    layers[0].mlp.up_proj.weight = layers[1].mlp.up_proj.weight


def test_shared_parameter_is_refused_and_auto_falls_back(tmp_path):
    cfg, clf, names = _clf("llama", "all")
    _share_a_weight(clf)
    with pytest.raises(HooksUnsupported, match="shared"):
        owning_modules(clf, select_params(clf, "all"))

    worker = KernelWorker(resolve_model_path(cfg.path), cfg, KernelConfig(method="auto"))
    assert worker.method == "hooks"
    _share_a_weight(worker.clf)
    worker.names = select_params(worker.clf, "all")
    with pytest.raises(HooksUnsupported):
        worker.jacobian(TEXTS[:2])


def test_worker_methods_agree_and_hooks_error_names_the_field(monkeypatch):
    cfg, _, _ = _clf("bert", "last:1")
    model_dir = resolve_model_path(cfg.path)
    hooks = KernelWorker(model_dir, cfg, KernelConfig(kind="full", method="hooks", precision="mixed"))
    func = KernelWorker(model_dir, cfg, KernelConfig(kind="full", method="func"))
    assert (hooks.method, func.method) == ("hooks", "func")
    ka = hooks.tile(hooks.jacobian(TEXTS[:3]), hooks.jacobian(TEXTS[3:6]), 1 << 20)
    kb = func.tile(func.jacobian(TEXTS[:3]), func.jacobian(TEXTS[3:6]), 1 << 20)
    assert ka.shape == kb.shape == (3, 3, 2, 2)
    assert rel_err(ka, kb) <= 1e-5

    def boom(*a, **k):
        raise HooksUnsupported("test: unsupported structure")

    monkeypatch.setattr("freeshap_ray.kernel.worker.block_features", boom)
    with pytest.raises(ConfigError, match="kernel.method"):
        KernelWorker(model_dir, cfg, KernelConfig(method="hooks"))
    fallback = KernelWorker(model_dir, cfg, KernelConfig(method="auto"))
    assert fallback.method == "func"
    assert isinstance(fallback.jacobian(TEXTS[:2]), np.ndarray)


def test_kernel_config_checks_new_fields():
    with pytest.raises(ConfigError, match="kernel.micro_batch_tokens"):
        KernelConfig(micro_batch_tokens=0)
    with pytest.raises(ConfigError, match="kernel.feature_memory_gb"):
        KernelConfig(feature_memory_gb=-1.0)


def test_mixed_precision_keeps_float64_accuracy_over_many_parameters():
    """float32 GEMMs over ≤ 8,192 parameters summed in float64 stay within the error bound of a float32 dot
    product of length 8,192 (not of 2 million) on a kernel dominated by one shared component (what
    pretrained LMs give).

    Bound: Higham & Mary's probabilistic bound for a length-k float32 inner product, |err| ≤ λ·√k·u·Σ|x·y|
    with u = 2⁻²⁴, holding for any summation order with probability ≥ 1 − 2k·exp(−λ²/2); λ = 8 makes a
    failure (~1e-10) impossible in practice. The float64 sum of the chunks adds ~1e-16. One float32 GEMM
    over all 2e6 parameters only has the √(2e6) bound, 16× looser.
    """
    from freeshap_ray.grads.features import DenseColumns, FeatureBlock

    rng = np.random.default_rng(0)
    p = 2_000_000
    shared = rng.standard_normal(p).astype(np.float32)
    g = (shared[None] + 0.05 * rng.standard_normal((8, p))).astype(np.float32)
    cols = DenseColumns()
    cols.add("w", p)
    f = FeatureBlock(8, 1, g, cols)
    g64 = g.astype(np.float64)
    exact = g64 @ g64.T
    bound = 8.0 * np.sqrt(MIXED_CHUNK) * 2.0**-24 * (np.abs(g64) @ np.abs(g64).T)
    assert np.all(np.abs(feature_tile(f, f, precision="mixed") - exact) <= bound)


def test_micro_batches_are_an_optimal_partition_within_the_token_cap():
    """Length-sorted grouping: every example once, padded size ≤ cap (a longer example alone), and the
    padded-tokens-plus-call-cost equals the best over all partitions into runs of the sorted order."""
    from itertools import combinations

    from freeshap_ray.grads.hooks import CALL_OVERHEAD_TOKENS, _micro_batches

    def cost(groups, lengths):
        return sum(len(g) * int(lengths[g].max()) + CALL_OVERHEAD_TOKENS for g in groups)

    rng = np.random.default_rng(3)
    for trial in range(40):
        n = int(rng.integers(1, 9))
        lengths = rng.integers(1, 90, n)
        cap = int(rng.integers(40, 300))
        groups = _micro_batches(lengths, cap)
        assert sorted(np.concatenate(groups).tolist()) == list(range(n))
        assert all(len(g) == 1 or len(g) * lengths[g].max() <= cap for g in groups)
        order = np.argsort(lengths, kind="stable")
        best = None
        for k in range(n):  # every way of cutting the sorted order into consecutive runs
            for cuts in combinations(range(1, n), k):
                runs = [order[s:e] for s, e in zip((0, *cuts), (*cuts, n))]
                if all(len(r) == 1 or len(r) * lengths[r].max() <= cap for r in runs):
                    c = cost(runs, lengths)
                    best = c if best is None else min(best, c)
        assert cost(groups, lengths) == best
    assert [len(g) for g in _micro_batches(np.array([5, 3000, 7]), 2048)] == [2, 1]
