"""Kernel correctness against explicit per-example Jacobians (torch.func.jacrev), locally and on Ray."""

from __future__ import annotations

import numpy as np
import pytest

from freeshap_ray.config import KernelConfig, ModelConfig
from freeshap_ray.grads import flat_jacobian, param_sizes
from freeshap_ray.io import Layout, load_kernel
from freeshap_ray.kernel import kernel_tile
from freeshap_ray.models import load_classifier, resolve_model_path, select_params

from .helpers import (TEMPLATES, TEXTS, Interrupt, interrupt_after, reference_jacobians, reference_kernel, rel_err,
                      run_kernel_job)

ARCHS = ["llama", "bert", "bert-mlm"]


def _setup(arch: str, params: str = "all"):
    cfg = ModelConfig(path=f"tiny:{arch}", template=TEMPLATES[arch], label_words=("bad", "good"), params=params,
                      lora_r=4 if params == "lora" else 0)
    model_dir = resolve_model_path(cfg.path)
    clf = load_classifier(model_dir, cfg)
    return cfg, model_dir, clf, select_params(clf, cfg.params)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["first_logit", "full"])
@pytest.mark.parametrize("params", ["all", "lora"])
def test_block_kernel_matches_jacrev(arch, kind, params):
    _, _, clf, names = _setup(arch, params)
    texts = TEXTS[:5]  # different lengths → padding inside the block
    j = flat_jacobian(clf, clf.encode(texts), names, kind).numpy()
    ref = reference_jacobians(clf, texts, names)
    k = kernel_tile(j, j, chunk=1000)  # several float64 parameter chunks
    assert rel_err(k, reference_kernel(ref, ref, kind)) <= 1e-5


def test_full_kernel_first_entry_is_first_logit_kernel():
    _, _, clf, names = _setup("llama")
    b = clf.encode(TEXTS[:4])
    full = kernel_tile(*(2 * [flat_jacobian(clf, b, names, "full").numpy()]))
    first = kernel_tile(*(2 * [flat_jacobian(clf, b, names, "first_logit").numpy()]))
    np.testing.assert_allclose(full[..., 0, 0], first, rtol=1e-6, atol=1e-9)


def test_head_equals_lm_logits_at_init():
    """The label-word head reproduces the LM's own logits of the label words (causal LM)."""
    import torch

    from freeshap_ray.models import load_lm

    cfg, model_dir, clf, _ = _setup("llama")
    lm = load_lm(model_dir)
    b = clf.encode(TEXTS[:3])
    with torch.no_grad():
        ours = clf(b.input_ids, b.attention_mask, b.read_pos)
        full = lm.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        theirs = full[torch.arange(3), b.read_pos][:, clf.label_token_ids]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec,expect_blocks", [("last:1", {"1"}), ("last:0", set())])
def test_last_k_selection(spec, expect_blocks):
    _, _, clf, _ = _setup("llama")
    names = select_params(clf, spec)
    blocks = {n.split("layers.")[1].split(".")[0] for n in names if "layers." in n}
    assert blocks == expect_blocks
    assert "head.weight" in names and any(n.endswith("norm.weight") and "layers" not in n for n in names)


@pytest.mark.parametrize(
    "arch,kind,params,shards,method",
    [
        ("llama", "first_logit", "last:1", 2, "hooks"),
        ("llama", "full", "lora", 2, "func"),
        ("bert", "first_logit", "lora", 2, "auto"),
        ("bert", "full", "last:1", 2, "hooks"),
    ],
)
def test_ray_kernel_matches_reference(ray_local, tmp_path, monkeypatch, arch, kind, params, shards, method):
    """Blocks of 2 examples over 2 actors (2 parameter shards where asked): the assembled train×train and
    test×train kernels equal the explicit-Jacobian reference, with hook features and with torch.func. On llama
    one tile task per actor is in flight at a time (24 shard partials through 2 slots), on bert all at once."""
    from freeshap_ray.distributed import kernel_job
    from freeshap_ray.distributed.kernel_job import KernelInputs

    monkeypatch.setattr(kernel_job, "MAX_TILES_IN_FLIGHT_PER_ACTOR", 1 if arch == "llama" else 100)

    cfg, model_dir, clf, names = _setup(arch, params=params)
    train, test = TEXTS[:5], TEXTS[5:8]
    layout = Layout.of(tmp_path / "out")
    kcfg = KernelConfig(kind=kind, block_size=2, num_actors=2, num_cpus_per_actor=0.5, param_shards=shards,
                        method=method, precision="mixed" if arch == "bert" else "float64")
    info = run_kernel_job(KernelInputs(train, test, model_dir, cfg, kcfg, names, param_sizes(clf, names)), layout,
                          progress=False)
    assert len(info["tiles"]["train_train"]) == 6 and len(info["tiles"]["test_train"]) == 6
    assert len(info["param_shards"]) == shards and info["tiles_computed"] == 12
    kernel = load_kernel(layout.root)
    suffix = "" if kind == "first_logit" else "_full"
    rtr, rte = reference_jacobians(clf, train, names), reference_jacobians(clf, test, names)
    assert rel_err(kernel["train_train" + suffix], reference_kernel(rtr, rtr, kind)) <= 1e-5
    assert rel_err(kernel["test_train" + suffix], reference_kernel(rte, rtr, kind)) <= 1e-5
    k = kernel["train_train" + suffix]
    np.testing.assert_array_equal(k, k.swapaxes(0, 1) if kind == "first_logit" else k.transpose(1, 0, 3, 2))


def test_killed_actor_is_replaced_and_resume_skips_finished_tiles(ray_local, tmp_path):
    """Kill an actor after the first tile: the kernel is still identical. Then interrupt a run and rerun
    it: the rerun recomputes no finished tile."""
    import ray

    from freeshap_ray.distributed.kernel_job import KernelInputs

    cfg, model_dir, clf, names = _setup("llama", params="last:1")
    train, test = TEXTS[:6], TEXTS[6:8]
    kcfg = KernelConfig(block_size=2, num_actors=2, num_cpus_per_actor=0.5, param_shards=2, max_restarts=2)
    job = KernelInputs(train, test, model_dir, cfg, kcfg, names, param_sizes(clf, names))
    kw = dict(progress=False)

    def kill_once(actors, written):
        if written == 1:
            ray.kill(actors[1], no_restart=False)

    ref_layout = Layout.of(tmp_path / "ref")
    run_kernel_job(job, ref_layout, **kw)
    ref = load_kernel(ref_layout.root)["train_train"]
    killed = Layout.of(tmp_path / "killed")
    run_kernel_job(job, killed, on_tile=kill_once, **kw)
    np.testing.assert_allclose(load_kernel(killed.root)["train_train"], ref, rtol=1e-12)

    interrupt = interrupt_after(4)

    part = Layout.of(tmp_path / "part")
    with pytest.raises(Interrupt):
        run_kernel_job(job, part, on_tile=interrupt, **kw)
    assert not part.kernel_manifest.exists()
    # a tile is its matrix and its name: train_train and test_train tiles share names (tile-r00000-c00000, ...)
    finished = {p.relative_to(part.kernel_dir).as_posix() for p in part.kernel_dir.rglob("tile-*.parquet")}
    assert len(finished) == 4
    info = run_kernel_job(job, part, resume=True, **kw)
    assert info["tiles_skipped"] == 4 and info["tiles_computed"] == 6 + 3 - 4
    np.testing.assert_allclose(load_kernel(part.root)["train_train"], ref, rtol=1e-12)
    np.testing.assert_allclose(load_kernel(part.root)["test_train"], load_kernel(ref_layout.root)["test_train"], rtol=1e-12)


def test_spectrum_summary_is_json_safe_on_singular_kernels():
    """More points than features (rank 3 of 8) and a repeated row: no condition number (None, not inf), the
    numerical rank, and the regularised system's condition number equal to numpy's; a full-rank kernel keeps
    its condition number."""
    import json

    from freeshap_ray.kernel import condition_number, spectrum_summary

    rng = np.random.default_rng(0)
    phi = rng.normal(size=(8, 3)) * 50.0
    k = phi @ phi.T
    s = spectrum_summary(k, lam=1e-3, kernel_divisor=1e2)
    json.dumps(s, allow_nan=False)
    assert s["condition_number"] is None and s["numerical_rank"] == 3
    want = np.linalg.cond(k / 1e2 + 1e-3 * np.eye(8))
    assert abs(s["condition_number_regularized"] - want) <= 1e3 * 8 * np.finfo(float).eps * want**2
    a = rng.normal(size=(6, 6))
    full = a @ a.T + np.eye(6)
    f = spectrum_summary(full, lam=0.0, kernel_divisor=1.0)
    assert f["numerical_rank"] == 6 and f["condition_number_regularized"] is None
    assert abs(f["condition_number"] - condition_number(full)) <= 1e-12 * f["condition_number"]
