"""The pipeline on projected features (kernel.projection_dim > 0): a features dataset instead of tiles, values
with the feature-space solver (nothing n×n), the same values as the dual solver on the same features, clean."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from freeshap_ray import read_kernel
from freeshap_ray.cli import main
from freeshap_ray.io import FeatureStore

from .helpers import job_args, write_csv

PROJ = ("kernel.projection_dim=48", "kernel.projection_seed=3", "shapley.truncation_tol=0", "shapley.seed=2",
        "shapley.n_permutations=16")


@pytest.fixture(scope="module")
def projected_run(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("proj")
    csv = write_csv(root / "train.csv")
    out = root / "primal"
    assert main(["run", *job_args(csv, out, *PROJ, "shapley.solver=primal")]) == 0
    return csv, root, out


def test_features_replace_tiles_and_the_primal_solver_runs(projected_run):
    _, _, out = projected_run
    kman = json.loads((out / "kernel" / "manifest.json").read_text())
    assert kman["representation"] == "features" and kman["tiles"] == {"train_train": [], "test_train": []}
    assert not list((out / "kernel").rglob("tile-*.parquet"))
    phi, labels = FeatureStore.of(out).read_matrix("train")
    assert phi.shape[1] == kman["projection"]["dim"] and phi.dtype == np.float32
    stage = json.loads((out / "manifest.json").read_text())["stages"]["shapley"]
    assert stage["solver"] == "primal" and stage["n_permutations"] == 16
    # the API's kernel of a projected run is <phi, phi'> of the stored features
    k = read_kernel(out)
    np.testing.assert_allclose(k.train_train, phi.astype(np.float64) @ phi.astype(np.float64).T, rtol=1e-12)


def test_primal_values_equal_dual_values_on_the_same_features(projected_run, tmp_path):
    """Same features, same permutations: the two solvers give the same marginals up to the solve bound; with
    untruncated permutations only the rounding of the two solvers differs (≲ 1e-6 relative to the values here)."""
    csv, root, out = projected_run
    dual = root / "dual"
    assert main(["run", *job_args(csv, dual, *PROJ, "shapley.solver=dual")]) == 0
    a = pq.read_table(out / "values.parquet").column("value").to_numpy()
    b = pq.read_table(dual / "values.parquet").column("value").to_numpy()
    assert json.loads((dual / "manifest.json").read_text())["stages"]["shapley"]["solver"] == "dual"
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * max(1.0, np.abs(b).max()))


def test_clean_on_projected_features(projected_run, capsys):
    csv, _, out = projected_run
    assert main(["clean", *job_args(csv, out, *PROJ, "shapley.solver=primal", "clean.noise_fraction=0.3",
                                    "clean.curve_steps=3", "clean.random_repeats=1")]) == 0
    summary = json.loads((out / "clean" / "summary.json").read_text())
    assert set(summary["noise"]["methods"]) >= {"freeshap", "loo", "influence"}
    assert pq.read_table(out / "suspects.parquet").num_rows == 6  # 9 texts, 30 % test
    assert "rank_by" in summary


def test_auto_solver_records_its_choice_and_gives_the_primal_values(projected_run, tmp_path, capsys):
    """``shapley.solver: auto`` on features: pilot walks, a choice recorded with its reasons, the same values."""
    import shutil

    csv, _, out = projected_run
    auto = tmp_path / "auto"
    shutil.copytree(out, auto)
    capsys.readouterr()
    assert main(["shapley", *job_args(csv, auto, *PROJ, "shapley.solver=auto", "shapley.resume=false"),
                 "--overwrite"]) == 0
    stage = json.loads((auto / "manifest.json").read_text())["stages"]["shapley"]
    choice = stage["solver_auto"]
    assert stage["solver"] == choice["solver"] == "dual"  # 6 points: the n×n dual is far cheaper
    assert choice["expected_prefix_len"] == 6 and choice["dual_time"] < choice["primal_time"]
    assert "solver auto -> dual" in capsys.readouterr().out
    a = pq.read_table(out / "values.parquet").column("value").to_numpy()
    b = pq.read_table(auto / "values.parquet").column("value").to_numpy()
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * max(1.0, np.abs(b).max()))
