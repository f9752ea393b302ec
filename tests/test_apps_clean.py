"""`clean` end to end on a small separable synthetic run: suspects, baselines, curves, noise detection, errors.

The run directory is built without a language model: examples are written with the run's own writers,
the kernel is an RBF Gram matrix of 2-D-separable synthetic features stored as kernel tiles, and the
values come from the real Shapley stage (Ray).
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from freeshap_ray.apps import KernelSurrogate, inject_noise, run_clean, write_suspects
from freeshap_ray.apps.cleaning import prepare_clean
from freeshap_ray.cli import main
from freeshap_ray.config import config_from_dict, config_to_dict
from freeshap_ray.errors import ConfigError, OutputError
from freeshap_ray.apps.cleaning import summary_lines
from freeshap_ray.data.dedupe import Duplicates
from freeshap_ray.io import KernelStore, Layout, write_duplicates, write_examples, write_kernel_tile
from freeshap_ray.io.apps_store import (
    CURVES_SCHEMA,
    DETECTION_SCHEMA,
    SCORES_SCHEMA,
    SUSPECTS_SCHEMA,
    read_scores,
)
from freeshap_ray.utility import RegressionProblem

N_TRAIN, N_TEST, DIM = 100, 60, 8
NAMES = ["negative", "positive"]

_BUILT: dict[str, object] = {}


def synthetic_kernel(n: int, m: int, seed: int = 0):
    """RBF kernel (× 1e4, as stored by the pipeline) of two well separated Gaussian classes."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n + m)
    X = rng.normal(size=(n + m, DIM))
    X[:, 0] += np.where(y == 1, 2.0, -2.0)
    sq = ((X[:, None] - X[None]) ** 2).sum(-1)
    K = np.exp(-sq / (2 * DIM)) * 1e4
    return K[:n, :n], K[n:, :n], y[:n], y[n:]


def job_dict(out, **clean) -> dict:
    return {
        "data": {"train": "synthetic", "label_names": NAMES},
        "model": {"label_words": [" bad", " good"]},
        "shapley": {"n_permutations": 40, "permutations_per_task": 10, "num_cpus_per_task": 0.5, "seed": 0},
        "clean": {"noise_fraction": 0.1, "noise_seed": 0, "curve_steps": 10, "random_repeats": 3,
                  "baselines": ["random", "loo", "influence", "tracin", "loo_margin"], **clean},
        "output": str(out),
    }


def write_synthetic_run(out, n=N_TRAIN, m=N_TEST, seed=0):
    """A run directory with examples, a first-logit kernel and the manifest; no values yet."""
    k_tt, k_st, y, yt = synthetic_kernel(n, m, seed)
    layout = Layout.of(out)
    texts = [f"train point {i} <b>&amp; {NAMES[c]}</b>" for i, c in enumerate(y)]
    write_examples(layout, "train", texts, y, np.arange(n) + 1000, NAMES)
    write_examples(layout, "test", [f"test point {i}" for i in range(m)], yt, np.arange(m), NAMES)
    write_kernel_tile(layout, "train_train", "tile-r00000-c00000", 0, 0, k_tt)
    write_kernel_tile(layout, "test_train", "tile-r00000-c00000", 0, 0, k_st)
    KernelStore(layout).finish({"kind": "first_logit", "n_train": n, "n_test": m, "n_classes": 2, "n_params": DIM,
                                   "tiles": {"train_train": ["tile-r00000-c00000"], "test_train": ["tile-r00000-c00000"]}})
    return k_tt, k_st, y, yt


def write_synthetic_duplicates(out, y) -> list[dict]:
    """``duplicates.parquet`` as ``data.dedupe`` writes it for the synthetic run's first three training points
    (ids 1000..1002): a conflicting train+test group, a consistent group and a conflicting test copy.
    Returns the conflicting groups ``clean`` should list."""
    t = [f"train point {i} <b>&amp; {NAMES[c]}</b>" for i, c in enumerate(y[:3])]
    flip = [1 - int(c) for c in y[:3]]
    dups = Duplicates("normalized", ("train", "test", "train", "test"), ("repeat", "test_in_train", "repeat",
                      "test_in_train"), np.array([5000, 7, 5001, 8]), (t[0].upper(), t[0], t[1], t[2]),
                      np.array([flip[0], y[0], y[1], flip[2]]), np.array([1000, 1000, 1001, 1002]),
                      (t[0], t[0], t[1], t[2]), np.array([y[0], y[0], y[1], y[2]]))
    write_duplicates(Layout.of(out), dups, NAMES)
    return [{"text": t[0], "ids": [1000, 5000, 7], "labels": [NAMES[y[0]], NAMES[flip[0]], NAMES[y[0]]],
             "splits": ["train", "train", "test"]},
            {"text": t[2], "ids": [1002, 8], "labels": [NAMES[y[2]], NAMES[flip[2]]], "splits": ["train", "test"]}]


def built_run(tmp_path_factory):
    """Synthetic run + Shapley stage + `clean` with 10 % noise (built once per session)."""
    if "out" not in _BUILT:
        from freeshap_ray.pipeline import run_shapley_stage

        out = tmp_path_factory.mktemp("clean") / "out"
        kernels = write_synthetic_run(out)
        conflicts = write_synthetic_duplicates(out, kernels[2])
        cfg = config_from_dict(job_dict(out))
        run_shapley_stage(cfg, progress=False)
        summary = run_clean(cfg, progress=False)
        _BUILT.update(out=out, cfg=cfg, summary=summary, kernels=kernels, conflicts=conflicts)
    return _BUILT


@pytest.fixture(scope="module")
def run(ray_local, tmp_path_factory):
    return built_run(tmp_path_factory)


def test_inject_noise_is_seeded_and_flips_to_another_class():
    y = np.arange(1000) % 3
    noisy, flipped = inject_noise(y, 0.1, seed=5, n_classes=3)
    assert flipped.sum() == 100 and np.all(noisy[flipped] != y[flipped]) and np.all(noisy[~flipped] == y[~flipped])
    again, f2 = inject_noise(y, 0.1, seed=5, n_classes=3)
    assert np.array_equal(again, noisy) and np.array_equal(f2, flipped)
    assert not np.array_equal(inject_noise(y, 0.1, seed=6, n_classes=3)[1], flipped)
    assert set(np.unique(noisy[flipped])) == {0, 1, 2}


def test_clean_writes_every_table_with_its_schema(run):
    apps = Layout.of(run["out"])
    for path, schema in ((apps.suspects, SUSPECTS_SCHEMA), (apps.noise_suspects, SUSPECTS_SCHEMA),
                         (apps.scores, SCORES_SCHEMA), (apps.noise_scores, SCORES_SCHEMA),
                         (apps.curves, CURVES_SCHEMA), (apps.detection, DETECTION_SCHEMA)):
        t = pq.read_table(path)
        assert t.schema.names == schema.names and t.num_rows > 0, path
    assert json.loads(apps.summary.read_text())["n_train"] == N_TRAIN
    assert not list(run["out"].rglob(".*.tmp-*")), "temp files left behind"
    methods = set(read_scores(apps.scores))
    assert methods == {"freeshap", "random", "loo", "influence", "tracin", "loo_margin"}


def test_suspects_are_ranked_by_score_with_values_and_loo_predictions(run):
    sus = pq.read_table(Layout.of(run["out"]).suspects).to_pandas()
    vals = pq.read_table(Layout.of(run["out"]).values).to_pandas()
    assert sus["rank"].tolist() == list(range(N_TRAIN))
    assert np.all(np.diff(sus["score"].to_numpy()) >= 0)  # most suspicious (lowest score of clean.rank_by) first
    assert sorted(sus["index"]) == list(range(N_TRAIN)) and sus["flipped"].isna().all()
    merged = sus.set_index("index").loc[vals["index"]]
    assert np.array_equal(merged["value"].to_numpy(), vals["value"].to_numpy())
    assert (merged["text"].to_numpy() == vals["text"].to_numpy()).all() and (merged["id"] == vals["id"].to_numpy()).all()
    # predicted label = argmax of the fit on all other points (brute force for a few points)
    k_tt, _k_st, y, _yt = run["kernels"]
    for i in sus["index"][:5].tolist() + sus["index"][-3:].tolist():
        rest = np.array([j for j in range(N_TRAIN) if j != i])
        sub = RegressionProblem.from_kernels(k_tt[np.ix_(rest, rest)], k_tt[np.ix_([i], rest)], y[rest], y[[i]],
                                             n_classes=2)
        row = sus.set_index("index").loc[i]
        pred = sub.predict()[0]
        assert row["predicted_label"] == int(np.argmax(pred))
        assert row["predicted_label_name"] == NAMES[int(np.argmax(pred))]
        assert row["loo_margin"] == pytest.approx(pred[y[i]] - pred[1 - y[i]], rel=1e-6, abs=1e-9)


def test_freeshap_finds_most_flipped_points_in_the_first_fifth(run):
    noise = run["summary"]["noise"]
    assert noise["n_flipped"] == 10
    fs, rnd = noise["methods"]["freeshap"], noise["methods"]["random"]
    assert fs["recall_at_0.2"] >= 0.7, noise
    assert fs["recall_at_0.2"] >= rnd["recall_at_0.2"] + 0.3, noise
    assert fs["auc"] >= 0.8 and fs["auc"] > rnd["auc"] + 0.2
    sus = pq.read_table(Layout.of(run["out"]).noise_suspects).to_pandas()
    assert int(sus["flipped"].sum()) == 10
    flipped = sus[sus["flipped"]]
    assert (flipped["label"] != flipped["original_label"]).all()
    assert (sus[~sus["flipped"]]["label"] == sus[~sus["flipped"]]["original_label"]).all()
    # the detection table's freeshap curve reaches recall 1 at the end and agrees with the summary
    det = pq.read_table(Layout.of(run["out"]).detection).to_pandas()
    d = det[det["method"] == "freeshap"].sort_values("fraction_inspected")
    assert d["fraction_found"].iloc[-1] == 1.0
    assert np.trapezoid(d["fraction_found"], d["fraction_inspected"]) == pytest.approx(fs["auc"])


def test_random_removal_stays_near_full_accuracy_and_values_order_the_curves(run):
    c = pq.read_table(Layout.of(run["out"]).curves).to_pandas()
    full = c[(c["method"] == "freeshap") & (c["curve"] == "remove_high") & (c["fraction"] == 0)]["accuracy"].item()
    rnd = c[(c["method"] == "random") & (c["curve"] == "remove_high") & (c["fraction"] <= 0.5)]
    assert (np.abs(rnd["accuracy"] - full) <= 0.08).all(), rnd
    fs = c[c["method"] == "freeshap"].set_index(["curve", "fraction"])["accuracy"]
    # removing the most valuable points hurts more than removing the least valuable ones
    assert fs[("remove_high", 0.5)] < fs[("remove_low", 0.5)]
    assert fs[("keep_top", 1.0)] == pytest.approx(full) and fs[("keep_top", 0.0)] == 0.5


def test_conflicting_duplicates_are_listed(run):
    """Groups from duplicates.parquet whose labels differ: in summary.json and the CLI lines."""
    assert run["summary"]["conflicting_duplicates"] == run["conflicts"]
    on_disk = json.loads(Layout.of(run["out"]).summary.read_text())["conflicting_duplicates"]
    assert on_disk == run["conflicts"]
    lines = "\n".join(summary_lines(run["summary"], run["out"]))
    assert "2 conflicting duplicate groups" in lines and "duplicates.parquet" in lines
    assert "train:1000" in lines and "test:8" in lines and "train:1001" not in lines


def test_clean_names_an_unreadable_duplicates_file(ray_local, tmp_path):
    out = tmp_path / "dups"
    write_synthetic_run(out, n=20, m=10)
    Layout.of(out).duplicates.write_bytes(b"not parquet")
    from freeshap_ray.pipeline import run_shapley_stage

    run_shapley_stage(config_from_dict(job_dict(out)), progress=False)
    with pytest.raises(OutputError, match="duplicates.parquet"):
        prepare_clean(config_from_dict(job_dict(out, noise_fraction=0.0)))
    assert not Layout.of(out).suspects.exists()


def test_clean_refuses_to_overwrite_and_names_bad_settings(run, tmp_path):
    cfg = run["cfg"]
    with pytest.raises(OutputError, match="--overwrite"):
        prepare_clean(cfg)
    with pytest.raises(ConfigError, match="shapley.lam"):
        prepare_clean(config_from_dict({**job_dict(run["out"]), "shapley": {"lam": 1e-3}}), overwrite=True)
    with pytest.raises(ConfigError, match="clean.noise_fraction"):
        prepare_clean(config_from_dict(job_dict(run["out"], noise_fraction=0.001)), overwrite=True)
    with pytest.raises(ConfigError, match="clean.baselines"):
        config_from_dict(job_dict(run["out"], baselines=["loo", "nope"]))
    with pytest.raises(ConfigError, match="clean.use_kernel"):
        prepare_clean(config_from_dict(job_dict(run["out"], use_kernel=False)), overwrite=True)
    # CLI: a run without values -> exit 2, error names the file, nothing written
    out = tmp_path / "novalues"
    write_synthetic_run(out, n=20, m=10)
    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text(yaml.safe_dump(job_dict(out)))
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert main(["clean", str(cfg_file), "--no-progress"]) == 2
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert main(["report", str(out)]) == 2 and not (out / "report.html").exists()


def test_clean_cli_without_noise_and_full_kernel(ray_local, tmp_path, capsys):
    """The full (C×C) kernel path: LOO predictions from 2×2 blocks; CLI without noise needs no Ray."""
    from freeshap_ray.pipeline import run_shapley_stage

    out = tmp_path / "full"
    k_tt, k_st, y, yt = synthetic_kernel(40, 20, seed=3)
    layout = Layout.of(out)
    write_examples(layout, "train", [f"t{i}" for i in range(40)], y, np.arange(40), NAMES)
    write_examples(layout, "test", [f"s{i}" for i in range(20)], yt, np.arange(20), NAMES)
    eye = np.eye(2)
    full_tt = k_tt[:, :, None, None] * eye + 0.3 * k_tt[:, :, None, None]  # PSD: K ⊗ (I + 0.3·11ᵀ)
    full_st = k_st[:, :, None, None] * eye + 0.3 * k_st[:, :, None, None]
    write_kernel_tile(layout, "train_train", "t0", 0, 0, full_tt)
    write_kernel_tile(layout, "test_train", "t0", 0, 0, full_st)
    KernelStore(layout).finish({"kind": "full", "n_train": 40, "n_test": 20, "n_classes": 2,
                                   "tiles": {"train_train": ["t0"], "test_train": ["t0"]}})
    d = job_dict(out, noise_fraction=0.0, per_class_normalise=True, baselines=["loo", "tracin"])
    run_shapley_stage(config_from_dict(d), progress=False)
    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text(yaml.safe_dump(config_to_dict(config_from_dict(d))))
    assert main(["clean", str(cfg_file), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "suspects.parquet" in printed and "leave-one-out" in printed
    sus = pq.read_table(out / "suspects.parquet").to_pandas()
    assert np.all(np.diff(sus["score"].to_numpy()) >= 0) and sus["predicted_label"].notna().all()
    prob = RegressionProblem.from_kernels(full_tt, full_st, y, yt, n_classes=2)
    pred = KernelSurrogate.fit(prob).loo_train_predictions()
    assert np.array_equal(sus.sort_values("index")["predicted_label"].to_numpy(), pred.argmax(1))
    assert not Layout.of(out).detection.exists()
    assert main(["clean", str(cfg_file), "--no-progress"]) == 2  # exists; needs --overwrite
    stale = Layout.of(out).detection  # as if an earlier clean had run the noise evaluation
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    assert main(["clean", str(cfg_file), "--no-progress", "--overwrite"]) == 0
    assert not stale.exists() and Layout.of(out).summary.is_file()
    assert "conflicting_duplicates" not in json.loads(Layout.of(out).summary.read_text())  # no data.dedupe


def test_suspects_stream_from_parquet_without_reading_whole_tables(tmp_path, monkeypatch):
    """200k points: the ranking holds only the vectors; texts are taken one rank chunk at a time."""
    n = 200_000
    rng = np.random.default_rng(0)
    texts = pa.array([f"text number {i}" for i in range(n)])
    ex = pa.table({"index": np.arange(n), "id": np.arange(n) + 7, "text": texts,
                   "label": rng.integers(0, 2, n), "label_name": pa.array(["x"] * n)})
    src = tmp_path / "train.parquet"
    pq.write_table(ex, src, row_group_size=20_000)
    values = rng.normal(size=n)
    order = np.argsort(values, kind="stable")
    real_read_table = pq.read_table

    def guarded(*a, **k):
        raise AssertionError("the suspects writer must not read whole tables")

    monkeypatch.setattr(pq, "read_table", guarded)
    monkeypatch.setattr(pq.ParquetFile, "read", guarded)
    labels = ex.column("label").to_numpy()
    write_suspects(tmp_path / "s.parquet", src, order,
                   {"label": labels, "value": values, "stderr": np.abs(values), "score": values},
                   NAMES, chunk_rows=30_000)
    monkeypatch.setattr(pq, "read_table", real_read_table)
    out = pq.ParquetFile(tmp_path / "s.parquet")
    assert out.metadata.num_rows == n and out.metadata.num_row_groups >= 7
    t = real_read_table(tmp_path / "s.parquet", columns=["rank", "index", "id", "text", "value", "predicted_label"])
    assert np.array_equal(t.column("index").to_numpy(), order)
    assert np.array_equal(t.column("rank").to_numpy(), np.arange(n))
    assert np.array_equal(t.column("id").to_numpy(), order + 7)
    assert t.column("text")[123].as_py() == f"text number {order[123]}"
    assert np.all(np.diff(t.column("value").to_numpy()) >= 0) and t.column("predicted_label").null_count == n


def test_clean_and_report_without_kernel_stream_a_large_run(tmp_path, monkeypatch):
    """n = 200k, `clean.use_kernel: false`: only per-point vectors are read whole, never the texts."""
    from freeshap_ray.apps import build_report
    from freeshap_ray.io import write_values

    n = 200_000
    rng = np.random.default_rng(1)
    out = tmp_path / "big"
    layout = Layout.of(out)
    y = rng.integers(0, 2, n)
    write_examples(layout, "train", [f"example {i}" for i in range(n)], y, np.arange(n), NAMES)
    examples = pq.read_table(layout.examples("train"))
    v = rng.normal(size=n)
    write_values(layout, examples, v, np.full(n, 0.1), np.full(n, 50))
    del examples
    real = pq.read_table

    def numeric_only(path, *a, columns=None, **k):
        if columns is None or "text" in columns:
            raise AssertionError(f"whole-table read of {path} (columns={columns})")
        return real(path, *a, columns=columns, **k)

    monkeypatch.setattr(pq, "read_table", numeric_only)
    cfg = config_from_dict(job_dict(out, noise_fraction=0.0, baselines=["random"], use_kernel=False))
    summary = run_clean(cfg, progress=False)
    assert summary["n_train"] == n and "curves" not in summary and "given" not in summary
    html = build_report(out, top_k=3)
    monkeypatch.setattr(pq, "read_table", real)
    assert 'id="fig-values"' in html and f"example {int(np.argmin(v))}" in html
    sus = pq.ParquetFile(Layout.of(out).suspects)
    first = next(sus.iter_batches(batch_size=5, columns=["index", "value", "predicted_label"]))
    assert first.column("index").to_pylist() == np.argsort(v, kind="stable")[:5].tolist()
    assert first.column("predicted_label").null_count == 5


def test_suspects_writer_names_a_misordered_examples_file(tmp_path):
    src = tmp_path / "train.parquet"
    pq.write_table(pa.table({"index": np.array([0, 2, 1]), "id": np.arange(3), "text": ["a", "b", "c"]}), src)
    cols = {"label": np.zeros(3, np.int64), "value": np.zeros(3), "stderr": np.zeros(3), "score": np.zeros(3)}
    with pytest.raises(OutputError, match=r"train.parquet: row 1 holds index 2"):
        write_suspects(tmp_path / "s.parquet", src, np.arange(3), cols, NAMES)
    assert not (tmp_path / "s.parquet").exists() and not list(tmp_path.glob(".*tmp*"))


def test_rank_by_auto_picks_the_method_that_found_the_injected_flips(run):
    """auto: suspects are ranked by the method with the best detection AUC on this dataset, and say so."""
    summary, out = run["summary"], run["out"]
    aucs = {m: d["auc"] for m, d in summary["noise"]["methods"].items() if m != "random"}
    best = summary["rank_by"]["method"]
    assert aucs[best] == max(aucs.values()) and summary["rank_by"]["auc"] == aucs[best]
    assert summary["rank_by"]["why"].startswith("auto: best detection AUC")
    sus = pq.read_table(out / "suspects.parquet").to_pandas()
    want = read_scores(Layout.of(out).scores)[best]
    np.testing.assert_array_equal(sus.sort_values("index")["score"].to_numpy(), want)
    assert np.all(np.diff(sus.sort_values("rank")["score"].to_numpy()) >= 0)  # most suspicious (lowest) first
    assert best in summary["ranking"]


def test_rank_by_is_validated():
    with pytest.raises(ConfigError, match="^clean.rank_by"):
        config_from_dict({**job_dict("x"), "clean": {"rank_by": "tracin", "baselines": ["random", "loo"]}})
    with pytest.raises(ConfigError, match="^clean.rank_by"):
        config_from_dict({**job_dict("x"), "clean": {"rank_by": "random"}})


def test_noise_evaluation_uses_the_jobs_valuation_settings(ray_local, tmp_path):
    """The values on the noisy labels are computed exactly as the job's: its stopping rule, time budget and
    estimator apply (the budget alone is replaced by clean.noise_permutations when that is set)."""
    from freeshap_ray.pipeline import run_shapley_stage

    out = tmp_path / "out"
    write_synthetic_run(out, n=60, m=30)
    d = job_dict(out, baselines=["random", "loo"], curves=False)
    d["shapley"].update(n_permutations=4000, convergence="rank", convergence_top_k=1, convergence_patience=1,
                        min_permutations=4, estimator="cv", permutations_per_task=4)
    cfg = config_from_dict(d)
    run_shapley_stage(cfg, progress=False)
    noise = run_clean(cfg, progress=False)["noise"]["shapley"]
    assert noise["stop_reason"].startswith("converged") and noise["n_permutations"] < 4000
    assert noise["estimator"] == "cv"
