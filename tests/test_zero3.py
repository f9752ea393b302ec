"""``kernel.backend: deepspeed``: 2 Ray actors form one ZeRO-3 group (gloo, CPU) over a tiny Llama.

Checks that the ranks really hold the loaded weights (partitioned, gathered = safetensors file), that each
rank's Jacobian slice is the un-averaged per-example gradient, that the kernel equals the single-process
reference (params ``last:1`` through the kernel job with an interrupted run + resume, ``all`` through the
CLI), and that a dead rank fails the job cleanly.
"""

from __future__ import annotations

import numpy as np
import pytest

from freeshap_ray.config import KernelConfig, ModelConfig
from freeshap_ray.errors import ConfigError
from freeshap_ray.grads import flat_jacobian, param_sizes
from freeshap_ray.io import Layout, load_kernel
from freeshap_ray.models import load_classifier, resolve_model_path, select_params

from .helpers import (TEMPLATES, TEXTS, Interrupt, interrupt_after, job_args, reference_jacobians, reference_kernel,
                      rel_err, run_kernel_job, write_csv)

pytest.importorskip("deepspeed")

ZERO3 = dict(backend="deepspeed", num_actors=2, num_cpus_per_actor=0.5, block_size=2)


def _setup(params: str):
    cfg = ModelConfig(path="tiny:llama", template=TEMPLATES["llama"], label_words=("bad", "good"), params=params)
    model_dir = resolve_model_path(cfg.path)
    clf = load_classifier(model_dir, cfg)
    return cfg, model_dir, clf, select_params(clf, cfg.params)


def _remove_new_placement_groups(before: set) -> None:
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    for pg_id, info in ray.util.placement_group_table().items():
        if pg_id not in before and info["state"] != "REMOVED":
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))


def test_config_rules():
    assert KernelConfig(**ZERO3).param_shards == 1  # left at 1: each rank is its own shard
    assert KernelConfig(**ZERO3, param_shards=2).backend == "deepspeed"
    with pytest.raises(ConfigError, match=r"^kernel\.param_shards: .*deepspeed"):
        KernelConfig(backend="deepspeed", num_actors=3, param_shards=2)
    with pytest.raises(ConfigError, match=r"^kernel\.placement: "):
        KernelConfig(**ZERO3, placement="none")
    with pytest.raises(ConfigError, match=r"^kernel\.num_gpus_per_actor: "):
        KernelConfig(**ZERO3, num_gpus_per_actor=0.5)
    with pytest.raises(ConfigError, match=r"^kernel\.backend: "):
        KernelConfig(backend="jax")


def test_ranks_hold_loaded_weights_and_unaveraged_gradient_slices(ray_local):
    """Gathered weights equal the safetensors file; ZeRO-3 logits equal the plain model's; each rank holds
    about half of every parameter; the ranks' Jacobian slices put side by side are the single-process
    per-example Jacobian (an averaged or summed gradient would be off by a factor of 2)."""
    import ray
    from safetensors.torch import load_file

    from freeshap_ray.distributed.kernel_job import _placement
    from freeshap_ray.distributed.zero3_group import make_zero3_actors

    cfg, model_dir, clf, names = _setup("all")
    kcfg = KernelConfig(**ZERO3)
    texts = TEXTS[:3]
    pg = _placement(kcfg)
    actors = make_zero3_actors(model_dir, cfg, kcfg, pg)
    try:
        def on_all(method, *args):  # collectives: every rank makes the same call
            return ray.get([getattr(a, method).remote(*args) for a in actors])

        stored = load_file(str(model_dir / "model.safetensors"))
        for ours, theirs in [("backbone.model.embed_tokens.weight", "model.embed_tokens.weight"),
                             ("backbone.model.layers.1.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight")]:
            for got in on_all("gathered_param", ours):
                np.testing.assert_array_equal(got, stored[theirs].numpy())
        head = stored["lm_head.weight"].numpy()[clf.label_token_ids]
        for got in on_all("gathered_param", "head.weight"):
            np.testing.assert_array_equal(got, head)

        import torch

        with torch.no_grad():
            b = clf.encode(texts)
            plain = clf(b.input_ids, b.attention_mask, b.read_pos).double().numpy()
        for got in on_all("logits", texts):
            np.testing.assert_allclose(got, plain, rtol=1e-5, atol=1e-6)

        layouts = on_all("layout")
        blocks = on_all("jacobian", texts)
        sizes = dict(zip(names, param_sizes(clf, names)))
        assert set(layouts[0]) == set(names)
        assert sum(b.shape[2] for b in blocks) == sum(sizes.values())
        for n in names:  # every parameter is split between the ranks, none is kept whole
            (s0, e0, _), (s1, e1, _) = layouts[0][n], layouts[1][n]
            assert (s0, e1) == (0, sizes[n]) and e0 == s1 and 0 < e0 - s0 and (sizes[n] < 2 or 0 < e1 - s1)
        ref = flat_jacobian(clf, clf.encode(texts), names, "first_logit").numpy()
        starts = np.cumsum([0] + [sizes[n] for n in names])
        full = np.zeros_like(ref)
        for lay, block in zip(layouts, blocks):
            for i, n in enumerate(names):
                start, stop, offset = lay[n]
                full[:, :, starts[i] + start: starts[i] + stop] = block[:, :, offset: offset + stop - start]
        assert rel_err(full, ref) <= 1e-5
        norms = np.linalg.norm(full.reshape(3, -1), axis=1) / np.linalg.norm(ref.reshape(3, -1), axis=1)
        np.testing.assert_allclose(norms, 1.0, rtol=1e-6)
        tiles = ray.get([a.tile.remote(b, b, 1000) for a, b in zip(actors, blocks)])
        assert rel_err(sum(tiles), ref[:, 0].astype(np.float64) @ ref[:, 0].T.astype(np.float64)) <= 1e-5
    finally:
        from ray.util.placement_group import remove_placement_group

        for a in actors:
            ray.kill(a, no_restart=True)
        remove_placement_group(pg)


def test_kernel_job_last1_full_interrupted_then_resumed_matches_reference(ray_local, tmp_path):
    """params last:1, kind full, 3 train and 2 test blocks: interrupt after 4 of 12 tiles, rerun with
    resume; the kernel equals the explicit-Jacobian reference."""
    import ray

    from freeshap_ray.distributed.kernel_job import KernelInputs

    cfg, model_dir, clf, names = _setup("last:1")
    train, test = TEXTS[:5], TEXTS[5:8]
    kcfg = KernelConfig(**ZERO3, kind="full")
    job = KernelInputs(train, test, model_dir, cfg, kcfg, names, param_sizes(clf, names))
    layout = Layout.of(tmp_path / "out")

    interrupt = interrupt_after(4)

    before = set(ray.util.placement_group_table())
    with pytest.raises(Interrupt):
        run_kernel_job(job, layout, on_tile=interrupt, progress=False)
    _remove_new_placement_groups(before)  # an interrupted job leaves its placement group to the caller
    assert not layout.kernel_manifest.exists()
    info = run_kernel_job(job, layout, resume=True, progress=False)
    assert info["backend"] == "deepspeed" and info["tiles_skipped"] == 4
    assert info["tiles_computed"] == 12 - 4
    kernel = load_kernel(layout.root)
    rtr, rte = reference_jacobians(clf, train, names), reference_jacobians(clf, test, names)
    assert rel_err(kernel["train_train_full"], reference_kernel(rtr, rtr, "full")) <= 1e-5
    assert rel_err(kernel["test_train_full"], reference_kernel(rte, rtr, "full")) <= 1e-5


def test_dead_rank_fails_the_job_cleanly(ray_local, tmp_path, monkeypatch):
    """A rank that dies stops the whole group (the other rank would wait in a collective) with a clear error."""
    import ray

    from freeshap_ray.distributed import zero3_group
    from freeshap_ray.distributed.kernel_job import KernelInputs

    cfg, model_dir, clf, names = _setup("last:1")
    made = {}
    real = zero3_group.make_zero3_actors

    def make_and_kill_rank1(*args):
        made["actors"] = actors = real(*args)
        ray.kill(actors[1], no_restart=True)
        return actors

    monkeypatch.setattr(zero3_group, "make_zero3_actors", make_and_kill_rank1)
    layout = Layout.of(tmp_path / "out")
    with pytest.raises(zero3_group.Zero3GroupError, match="rerun the same command to resume"):
        run_kernel_job(KernelInputs(TEXTS[:4], TEXTS[4:6], model_dir, cfg, KernelConfig(**ZERO3), names,
                                    param_sizes(clf, names)), layout, progress=False)
    assert not layout.kernel_manifest.exists()
    with pytest.raises(ray.exceptions.RayActorError):  # rank 0 was stopped too
        ray.get(made["actors"][0].local_numel.remote(), timeout=60)


def test_cli_run_with_deepspeed_backend_matches_reference(ray_local, tmp_path):
    """``freeshap-ray run --set kernel.backend=deepspeed --set kernel.num_actors=2`` end to end, params all;
    its kernel equals the explicit-Jacobian reference on the run's own train/test split."""
    import pyarrow.parquet as pq

    from freeshap_ray.cli import main

    csv = write_csv(tmp_path / "train.csv")
    out = tmp_path / "out"
    extra = ["kernel.block_size=2", "kernel.backend=deepspeed", "kernel.num_actors=2"]
    assert main(["run", *job_args(csv, out, *extra)]) == 0
    assert (out / "values.parquet").is_file()
    kernel = load_kernel(out)
    assert kernel["manifest"]["backend"] == "deepspeed"
    train = pq.read_table(out / "train.parquet").column("text").to_pylist()
    test = pq.read_table(out / "test.parquet").column("text").to_pylist()
    assert len(train) >= 3 and len(test) >= 3  # >= 2 blocks of 2 per side
    _, _, clf, names = _setup("all")
    rtr, rte = reference_jacobians(clf, train, names), reference_jacobians(clf, test, names)
    assert rel_err(kernel["train_train"], reference_kernel(rtr, rtr, "first_logit")) <= 1e-5
    assert rel_err(kernel["test_train"], reference_kernel(rte, rtr, "first_logit")) <= 1e-5
