"""End-to-end CLI on a tiny model: outputs, schemas, readers, stage split, and bad input handling."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from freeshap_ray import load_kernel
from freeshap_ray.cli import main

from .helpers import TEXTS, TINY_JOB, job_args, write_csv


@pytest.fixture(scope="module")
def tiny_run(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    csv = write_csv(root / "train.csv")
    out = root / "out"
    assert main(["run", *job_args(csv, out)]) == 0
    return csv, out


def test_run_writes_everything(tiny_run):
    _, out = tiny_run
    for rel in ("manifest.json", "train.parquet", "test.parquet", "kernel/manifest.json", "values.parquet"):
        assert (out / rel).is_file(), rel
    assert list((out / "shapley" / "marginals").glob("part-*.parquet"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"kernel", "shapley"} <= set(manifest["stages"]) and "torch" in manifest["versions"]
    assert manifest["config"]["model"]["path"] == "tiny:llama"
    assert not list(out.rglob(".*.tmp-*")), "temp files left behind"


def test_run_with_the_default_estimator_stops_on_stability(tiny_run, tmp_path):
    """No estimator keys: the defaults (stratified on neg_ce, stop at split-half Spearman 0.9) end to end."""
    csv, _ = tiny_run
    base = [s for s in TINY_JOB if not s.startswith(("shapley.estimator", "shapley.utility", "shapley.convergence",
                                                     "shapley.n_permutations"))]
    out = tmp_path / "defaults"
    assert main(["run", *job_args(csv, out, "shapley.max_seconds=300", base=base)]) == 0
    info = json.loads((out / "manifest.json").read_text())["stages"]["shapley"]
    assert info["estimator"] == "stratified" and info["utility"] == "neg_ce"
    assert info["stop_reason"].startswith("converged: split-half Spearman"), info["stop_reason"]
    assert pq.read_table(out / "values.parquet").num_rows == len(pq.read_table(out / "train.parquet"))


def test_values_schema_and_readers(tiny_run, ray_local):
    _, out = tiny_run
    table = pq.read_table(out / "values.parquet")
    assert table.column_names == ["index", "id", "text", "label", "label_name", "value", "stderr", "count",
                                  "sign_agreement"]
    df = table.to_pandas()
    n = len(df)
    assert n == len(pq.read_table(out / "train.parquet")) and n >= 5
    assert set(df["text"]) <= set(TEXTS) and (df["count"] == 12).all()
    assert np.isfinite(df["value"]).all() and (df["stderr"] >= 0).all()
    # datasets and Ray Data read the same file
    import datasets
    import ray.data

    ds = datasets.Dataset.from_parquet(str(out / "values.parquet"))
    assert ds.num_rows == n and ds[0]["text"] == df["text"][0]
    assert ray.data.read_parquet(str(out / "values.parquet")).count() == n
    tiles = out / "kernel" / "train_train"
    assert ray.data.read_parquet(str(tiles)).count() == pq.read_table(tiles).num_rows > n


def test_marginals_efficiency(tiny_run):
    """Without truncation every permutation's marginals sum to v(N) − v(∅)."""
    csv, _ = tiny_run
    _, out = tiny_run
    m = pq.read_table(out / "shapley" / "marginals").to_pandas()
    assert sorted(m["perm_id"]) == list(range(12))
    manifest = json.loads((out / "manifest.json").read_text())["stages"]["shapley"]
    for _, row in m.iterrows():
        if row["truncated_at"] == len(row["order"]):
            assert sum(row["marginals"]) == pytest.approx(manifest["v_full"] - manifest["v_empty"], abs=1e-9)
        assert sorted(row["order"]) == list(range(len(row["order"])))


def test_stages_separately_match_run(tiny_run, tmp_path, ray_local):
    csv, out_run = tiny_run
    out = tmp_path / "staged"
    assert main(["kernel", *job_args(csv, out)]) == 0
    assert not (out / "values.parquet").exists()
    tiles = {p: p.stat().st_mtime_ns for p in (out / "kernel").rglob("tile-*.parquet")}
    assert main(["kernel", *job_args(csv, out)]) == 0  # a finished kernel of the same plan is reused
    assert {p: p.stat().st_mtime_ns for p in (out / "kernel").rglob("tile-*.parquet")} == tiles
    assert main(["shapley", *job_args(csv, out)]) == 0
    a, b = load_kernel(out), load_kernel(out_run)
    np.testing.assert_allclose(a["train_train"], b["train_train"], rtol=1e-6)
    va = pq.read_table(out / "values.parquet").column("value").to_numpy()
    vb = pq.read_table(out_run / "values.parquet").column("value").to_numpy()
    np.testing.assert_allclose(va, vb, atol=1e-12)  # same seed → same permutations
    # finished outputs are not overwritten without --overwrite
    assert main(["shapley", *job_args(csv, out)]) == 2
    assert main(["shapley", *job_args(csv, out), "--overwrite"]) == 0


def test_shapley_stage_without_kernel_fails(tmp_path, capsys):
    assert main(["shapley", *job_args("x.csv", tmp_path / "nothing")]) == 2
    assert "kernel" in capsys.readouterr().err


@pytest.mark.parametrize(
    "case,extra,needle",
    [
        ("unknown key", ["shapley.n_perms=3"], "shapley.n_perms"),
        ("wrong type", ["kernel.block_size=big"], "kernel.block_size"),
        ("label outside names", ["data.label_names=[good, awful]"], "positive"),
        ("missing column", ["data.text_column=sentence"], "sentence"),
        ("unknown model", ["model.path=/no/such/model"], "model.path"),
        ("bad param regex", ["model.params=^nothing_matches$"], "model.params"),
    ],
)
def test_bad_input_clear_error_no_output(tmp_path, capsys, case, extra, needle):
    csv = write_csv(tmp_path / "train.csv")
    out = tmp_path / "out"
    assert main(["run", *job_args(csv, out, *extra)]) == 2, case
    err = capsys.readouterr().err
    assert needle in err and err.count("error:") == 1, err
    assert not out.exists(), f"{case}: output directory was created"


def test_empty_dataset_no_output(tmp_path, capsys):
    csv = write_csv(tmp_path / "empty.csv", texts=[], labels=[])
    out = tmp_path / "out"
    assert main(["run", *job_args(csv, out)]) == 2
    assert "empty.csv" in capsys.readouterr().err and not out.exists()


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for cmd in ("run", "kernel", "shapley"):
        assert cmd in text


def test_show_config(capsys):
    assert main(["show-config", "--set", "shapley.seed=5"]) == 0
    assert "seed: 5" in capsys.readouterr().out


def test_unfinished_kernel_of_other_plan_is_not_mixed(tmp_path, capsys):
    """Tiles left by an interrupted run with a different config are never reused silently."""
    csv = write_csv(tmp_path / "train.csv")
    out = tmp_path / "out"
    (out / "kernel").mkdir(parents=True)
    (out / "kernel" / "plan.json").write_text(json.dumps({"signature": "something-else"}))
    assert main(["kernel", *job_args(csv, out)]) == 2
    assert "unfinished kernel" in capsys.readouterr().err


def test_finished_kernel_of_other_config_is_not_reused(tmp_path, capsys):
    csv = write_csv(tmp_path / "train.csv")
    out = tmp_path / "out"
    (out / "kernel").mkdir(parents=True)
    (out / "kernel" / "manifest.json").write_text(json.dumps({"signature": "another-plan"}))
    assert main(["run", *job_args(csv, out)]) == 2
    assert "different config" in capsys.readouterr().err
