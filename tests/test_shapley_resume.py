"""Streaming, interruption and resume of the Shapley stage on Ray; convergence and time budgets."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

import freeshap_ray
from freeshap_ray.config import config_from_dict
from freeshap_ray.errors import OutputError
from freeshap_ray.io import KernelStore, Layout, MarginalsStore, write_examples, write_kernel_tile
from freeshap_ray.utility import RegressionProblem
from freeshap_ray.valuation import exact_shapley

from .helpers import run_resumable


class Interrupt(RuntimeError):
    """Stands for the driver being killed."""


def kernels(n=10, m=12, d=5, seed=0):
    rng = np.random.default_rng(seed)
    x, xt = rng.normal(size=(n, d)), rng.normal(size=(m, d))
    w = rng.normal(size=(d, 2))
    y = np.argmax(x @ w + 0.7 * rng.normal(size=(n, 2)), axis=1)
    yt = np.argmax(xt @ w, axis=1)
    return x @ x.T, xt @ x.T, y, yt


def problem(**kw):
    k, kt, y, yt = kernels(**kw)
    return RegressionProblem.from_kernels(k, kt, y, yt, lam=0.3, kernel_divisor=1.0)


def interrupt_after(k):
    seen = []

    def hook(batch):
        seen.append(batch)
        if len(seen) >= k:
            raise Interrupt(f"killed after {k} batches")

    return hook


def stored_ids(store):
    t = store.read(["perm_id", "seed"])
    return list(zip(t.column("seed").to_pylist(), t.column("perm_id").to_pylist()))


COMMON = dict(utility="neg_ce", truncation_tol=0.05, permutations_per_task=3, num_cpus_per_task=0.5, progress=False)


@pytest.mark.parametrize("sampler,per_test", [("tmc", False), ("antithetic", True)])
def test_resume_after_kill_equals_uninterrupted(ray_local, tmp_path, sampler, per_test):
    prob = problem()
    whole = run_resumable(prob, MarginalsStore(tmp_path / "whole"), sampler=sampler, n_permutations=30, seed=5,
                          per_test_point=per_test, **COMMON)
    store = MarginalsStore(tmp_path / "killed")
    with pytest.raises(Interrupt):
        run_resumable(prob, store, sampler=sampler, n_permutations=30, seed=5, per_test_point=per_test,
                      on_batch=interrupt_after(2), **COMMON)
    first = stored_ids(store)
    assert 0 < len(first) < 30 and len(first) == len(set(first))
    # a temp file left by a write in flight is ignored
    (store.parts_dir / ".part-00099.parquet.tmp-deadbeef").write_bytes(b"partial")
    resumed = run_resumable(prob, store, sampler=sampler, n_permutations=30, seed=5, per_test_point=per_test,
                            **COMMON)
    union = stored_ids(store)
    assert len(union) == len(set(union)) == 30, "a permutation was run twice or lost"
    assert set(first) <= set(union)
    assert sorted(union) == [(5, i) for i in range(30)]
    assert resumed.info["n_resumed"] == len(first) and resumed.info["n_new"] == 30 - len(first)
    np.testing.assert_array_equal(resumed.values.values, whole.values.values)  # bitwise: same samples, same order
    np.testing.assert_array_equal(resumed.values.stderr, whole.values.stderr)
    np.testing.assert_array_equal(resumed.sign.per_point, whole.sign.per_point)
    if per_test:
        np.testing.assert_allclose(resumed.per_test.values, whole.per_test.values, rtol=0, atol=1e-12)
        np.testing.assert_allclose(resumed.per_test.stderr, whole.per_test.stderr, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(resumed.per_test.values.mean(axis=1), resumed.values.values, atol=1e-12)
        assert (resumed.values.counts == 15).all()  # 15 antithetic pairs
    # a rerun with nothing missing runs nothing and changes nothing
    again = run_resumable(prob, store, sampler=sampler, n_permutations=30, seed=5, per_test_point=per_test,
                          **COMMON)
    assert again.info["n_new"] == 0
    np.testing.assert_array_equal(again.values.values, whole.values.values)


def test_a_new_seed_is_an_independent_replicate(ray_local, tmp_path):
    """Changing shapley.seed computes that seed's own samples (budget and values per seed); the other seeds'
    samples stay in the store as replicates, are reported and compared, and never mixed in."""
    prob = problem()
    store = MarginalsStore(tmp_path / "s")
    first = run_resumable(prob, store, n_permutations=6, seed=0, **COMMON)
    more = run_resumable(prob, store, n_permutations=15, seed=1, **COMMON)
    ids = stored_ids(store)
    assert len(ids) == len(set(ids)) == 21
    assert sorted(ids) == [(0, i) for i in range(6)] + [(1, i) for i in range(15)]
    assert more.info["n_new"] == 15 and more.info["n_resumed"] == 0 and (more.values.counts == 15).all()
    assert more.info["seeds"] == [0, 1] and more.info["samples_per_seed"] == {"0": 6, "1": 15}
    assert set(more.info["seed_spearman"]) == {"0"}
    alone = run_resumable(prob, MarginalsStore(tmp_path / "alone"), n_permutations=15, seed=1, **COMMON)
    np.testing.assert_array_equal(more.values.values, alone.values.values)  # seed 0 is not mixed in
    back = run_resumable(prob, store, n_permutations=6, seed=0, **COMMON)  # seed 0 again: all stored
    assert back.info["n_new"] == 0
    np.testing.assert_array_equal(back.values.values, first.values.values)


def test_mismatched_settings_are_refused(ray_local, tmp_path):
    prob = problem()
    store = MarginalsStore(tmp_path / "s")
    run_resumable(prob, store, n_permutations=3, seed=0, **COMMON)
    with pytest.raises(OutputError, match="truncation_tol=0.05.*truncation_tol=0.2"):
        run_resumable(prob, store, n_permutations=6, seed=0, **{**COMMON, "truncation_tol": 0.2})
    other = problem(seed=1)
    with pytest.raises(OutputError, match="problem="):
        run_resumable(other, store, n_permutations=6, seed=0, **COMMON)
    fresh = run_resumable(other, store, n_permutations=4, seed=0, discard_mismatched=True, **COMMON)
    assert fresh.info["n_resumed"] == 0 and len(stored_ids(store)) == 4
    restart = run_resumable(other, store, n_permutations=2, seed=0, resume=False, **COMMON)
    assert restart.info["n_resumed"] == 0 and len(stored_ids(store)) == 2
    store.run_file.unlink()  # parts whose settings cannot be verified are not reused silently
    with pytest.raises(OutputError, match="run.json"):
        run_resumable(other, store, n_permutations=4, seed=0, **COMMON)


def test_zero_tolerance_equals_untruncated_sampler(ray_local):
    k, kt, y, yt = kernels()
    kw = dict(lam=0.3, kernel_divisor=1.0, utility="accuracy", n_permutations=16, seed=4, permutations_per_task=4,
              num_cpus_per_task=0.5, estimator="tmc", convergence="none")
    off = freeshap_ray.shapley(k, kt, y, yt, truncation_tol=0.0, **kw)
    plain = freeshap_ray.shapley(k, kt, y, yt, truncation_tol=0.5, sampler="permutation", **kw)
    on = freeshap_ray.shapley(k, kt, y, yt, truncation_tol=0.5, **kw)
    np.testing.assert_allclose(off.values, plain.values, rtol=0, atol=1e-12)
    assert off.info["mean_truncated_at"] == plain.info["mean_truncated_at"] == 10
    assert on.info["mean_truncated_at"] < 10


def test_convergence_and_time_budget_stop_early(ray_local, tmp_path):
    k, kt, y, yt = kernels()
    kw = dict(lam=0.3, kernel_divisor=1.0, utility="neg_ce", truncation_tol=0.0, permutations_per_task=4,
              num_cpus_per_task=0.5, estimator="tmc")
    res = freeshap_ray.shapley(k, kt, y, yt, n_permutations=5000, convergence="stderr", convergence_tol=0.2,
                               min_permutations=8, seed=3, **kw)
    assert res.info["stop_reason"].startswith("converged")
    assert 8 <= res.info["n_permutations"] < 5000
    assert np.max(res.stderr) <= 0.2 * (res.values.max() - res.values.min())
    # efficiency holds for the values of any set of untruncated permutations
    assert res.values.sum() == pytest.approx(res.info["v_full"] - res.info["v_empty"], abs=1e-9)
    timed = freeshap_ray.shapley(k, kt, y, yt, n_permutations=10**6, max_seconds=3.0, seed=3, convergence="none", **kw)
    assert timed.info["stop_reason"].startswith("time budget")
    assert 0 < timed.info["n_permutations"] < 10**6


def test_api_checkpoint_dir_and_sign_agreement(ray_local, tmp_path):
    k, kt, y, yt = kernels(n=6, m=16)
    kw = dict(lam=0.5, kernel_divisor=1.0, utility="accuracy", truncation_tol=0.0, seed=2, permutations_per_task=50,
              estimator="tmc", convergence="none")
    exact = exact_shapley(RegressionProblem.from_kernels(k, kt, y, yt, lam=0.5, kernel_divisor=1.0), "accuracy")
    assert np.abs(exact).max() > 1e-3
    prob = RegressionProblem.from_kernels(k, kt, y, yt, lam=0.5, kernel_divisor=1.0)
    with pytest.raises(Interrupt):  # a killed earlier call left some batches in the checkpoint
        run_resumable(prob, MarginalsStore(tmp_path / "ck"), utility="accuracy", sampler="antithetic",
                      n_permutations=400, truncation_tol=0.0, seed=2, permutations_per_task=50, progress=False,
                      on_batch=interrupt_after(1))
    res = freeshap_ray.shapley(k, kt, y, yt, n_permutations=400, sampler="antithetic", checkpoint_dir=tmp_path / "ck",
                               **kw)
    assert res.info["n_resumed"] > 0 and res.info["n_permutations"] == 400 and (res.counts == 200).all()
    z = np.abs(res.values - exact) / res.stderr
    assert z.max() < 3.0
    mem = freeshap_ray.shapley(k, kt, y, yt, n_permutations=400, sampler="antithetic", **kw)
    np.testing.assert_allclose(mem.values, res.values, atol=1e-12)
    for r in (res, mem):
        sa = r.info["sign_agreement"]
        assert sa.shape == (6,) and np.all((sa >= 0) & (sa <= 1))
        assert 0 <= r.info["sign_agreement_halves"] <= 1
    np.testing.assert_allclose(res.info["sign_agreement"], mem.info["sign_agreement"])


# ---- the pipeline stage ---------------------------------------------------------------------------------


def write_fake_kernel_stage(out, n=9, m=7, seed=0):
    """A finished kernel stage written by hand (no model): examples + one tile per matrix + manifest."""
    k, kt, y, yt = kernels(n=n, m=m, seed=seed)
    layout = Layout.of(out)
    names = ["negative", "positive"]
    write_examples(layout, "train", [f"train {i}" for i in range(n)], y, np.arange(n), names)
    write_examples(layout, "test", [f"test {i}" for i in range(m)], yt, np.arange(m), names)
    write_kernel_tile(layout, "train_train", "tile-r00000-c00000", 0, 0, k * 1e4)
    write_kernel_tile(layout, "test_train", "tile-r00000-c00000", 0, 0, kt * 1e4)
    KernelStore(layout).finish({"n_train": n, "n_test": m, "n_classes": 2, "kind": "first_logit",
                                   "tiles": {"train_train": ["tile-r00000-c00000"],
                                             "test_train": ["tile-r00000-c00000"]}})
    return layout


def stage_cfg(out, **shapley):
    base = {"n_permutations": 24, "permutations_per_task": 4, "num_cpus_per_task": 0.5, "lam": 0.3,
            "utility": "neg_ce", "seed": 7, "estimator": "tmc", "convergence": "none"}
    return config_from_dict({"output": str(out), "shapley": {**base, **shapley}})


def test_pipeline_stage_resumes_after_kill(ray_local, tmp_path):
    from freeshap_ray.pipeline import run_shapley_stage

    ref_layout = write_fake_kernel_stage(tmp_path / "ref")
    ref_info = run_shapley_stage(stage_cfg(ref_layout.root), progress=False)
    layout = write_fake_kernel_stage(tmp_path / "out")
    cfg = stage_cfg(layout.root)
    with pytest.raises(Interrupt):
        run_shapley_stage(cfg, progress=False, on_batch=interrupt_after(2))
    assert not layout.values.exists()
    info = run_shapley_stage(cfg, progress=False)  # plain rerun: resumes
    assert info["n_resumed"] >= 8 and info["n_resumed"] + info["n_new"] == 24
    parts = pq.read_table(layout.marginals_dir).to_pandas()
    assert sorted(parts["perm_id"]) == list(range(24)) and (parts["seed"] == 7).all()
    got, want = pq.read_table(layout.values), pq.read_table(ref_layout.values)
    assert got.column_names[-1] == "sign_agreement"
    for col in ("value", "stderr", "count", "sign_agreement"):
        np.testing.assert_array_equal(got.column(col).to_numpy(), want.column(col).to_numpy())
    manifest = json.loads(layout.manifest.read_text())["stages"]["shapley"]
    for key in ("sign_agreement_halves", "sign_agreement_mean", "stop_reason", "n_permutations"):
        assert key in manifest
    assert manifest["n_permutations"] == ref_info["n_permutations"] == 24
    assert not list(layout.root.rglob(".*.tmp-*"))
    # finished values are kept without overwrite; with it, changed settings discard the stream
    with pytest.raises(OutputError, match="values.parquet"):
        run_shapley_stage(cfg, progress=False)
    changed = stage_cfg(layout.root, sampler="antithetic", n_permutations=8)
    info = run_shapley_stage(changed, overwrite=True, progress=False)
    assert info["n_resumed"] == 0 and info["sampler"] == "antithetic" and info["n_samples"] == 4
