"""`explain`: Shapley values of the training examples for a prediction on new texts.

References: exact enumeration of the one-point game (2^n subsets at n <= 8), efficiency of every
untruncated permutation, the kernel job's own rows for the texts appended to the test set, and the
in-process path against the Ray path.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

import freeshap_ray
from freeshap_ray.apps.explain import Explainer, Explanation, run_explain_stage
from freeshap_ray.cli import main
from freeshap_ray.config import ExplainConfig
from freeshap_ray.errors import ConfigError, OutputError
from freeshap_ray.io.explanations import EXPLANATIONS_SCHEMA
from freeshap_ray.utility import FeatureProblem, RegressionProblem
from freeshap_ray.valuation import exact_shapley
from freeshap_ray.valuation.one_point import (
    EXPLAIN_UTILITIES,
    label_margin_per_test,
    label_probability_per_test,
    one_point_values,
    target_labels,
    one_point_problem,
)
from freeshap_ray.valuation.settings import ValuationSettings

from .helpers import TEXTS, job_args, primal_tol, rel_err, run_kernel_job, solve_tol, utility_tol, write_csv

NEW = ["what a great and wonderful film", "boring , awful and dull", "it was fine"]


def _tiny_run(root, *extra: str):
    csv = write_csv(root / "train.csv")
    out = root / "out"
    assert main(["run", *job_args(csv, out, *extra)]) == 0
    return out


@pytest.fixture(scope="module")
def run(ray_local, tmp_path_factory):
    """Tiny Llama run (6 training, 3 test texts)."""
    return _tiny_run(tmp_path_factory.mktemp("explain"))


@pytest.fixture(scope="module")
def explainer(run):
    with Explainer(run, use_ray=False) as ex:
        yield ex


# --------------------------------------------------------------------------------------------------
# The one-point game (pure)


def test_one_point_utilities_and_label_choice():
    pred = np.array([[[0.2, 1.0, -0.5]], [[0.0, 0.0, 0.0]]])  # (b=2, m=1, C=3)
    y = np.array([1])
    p = np.exp(pred) / np.exp(pred).sum(-1, keepdims=True)
    np.testing.assert_allclose(label_probability_per_test(pred, y), p[..., 1], rtol=1e-15)
    np.testing.assert_allclose(label_margin_per_test(pred, y), [[0.8], [0.0]], atol=1e-15)
    np.testing.assert_allclose(label_margin_per_test(pred, np.array([2])), [[-1.5], [0.0]], atol=1e-15)
    for name, empty in (("prob", 1 / 3), ("margin", 0.0)):  # the closed form is the zero prediction's utility
        u = EXPLAIN_UTILITIES[name]
        assert u.empty_value(y, 3) == pytest.approx(empty, abs=0) and u(np.zeros((1, 3)), y) == pytest.approx(empty)
    scores = np.array([[0.1, 0.3], [0.5, 0.5]])
    assert target_labels(scores, None).tolist() == [1, 0]  # ties: the lowest class, as accuracy
    assert target_labels(scores, 0).tolist() == [0, 0]
    with pytest.raises(ValueError, match="label"):
        target_labels(scores, 2)


def _synthetic(n: int, m: int, seed: int = 0) -> RegressionProblem:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n + m, 160))
    k = x @ x.T * 1e4
    y = (x[:n, 0] + 0.3 * rng.standard_normal(n) > 0).astype(int)
    return RegressionProblem.from_kernels(k[:n, :n], k[n:, :n], y, np.zeros(m, int), n_classes=2)


def test_one_point_problem_is_the_regression_of_one_test_point():
    p = _synthetic(20, 4)
    full = p.predict(None)
    for i in range(4):
        single = one_point_problem(p, i)
        assert single.m == 1 and single.y_test.tolist() == [p.y_test[i]]
        np.testing.assert_allclose(single.predict(None), full[i:i + 1], rtol=0,
                                   atol=solve_tol(p) * np.abs(full).max())


def test_efficiency_untruncated_exact_and_truncated_within_tolerance():
    p = _synthetic(120, 1)
    tol = utility_tol(p, float(np.abs(p.predict(None)).max()))
    for utility in ("prob", "margin"):
        settings = ValuationSettings.of(None, EXPLAIN_UTILITIES[utility], n_permutations=6, sampler="permutation")
        est = one_point_values(p, settings)
        gap = est.info["v_full"] - est.info["v_empty"]
        assert abs(est.values.values.sum() - gap) <= p.n * tol  # every permutation telescopes to U(N) - U(∅)
        trunc = ValuationSettings.of(None, EXPLAIN_UTILITIES[utility], n_permutations=20, truncation_tol=0.2)
        est = one_point_values(p, trunc)
        assert est.info["mean_truncated_at"] < p.n  # truncation happened, and the bound still holds
        assert abs(est.values.values.sum() - gap) <= 0.2 * abs(est.info["v_full"]) + p.n * tol


# --------------------------------------------------------------------------------------------------
# Correctness on a tiny model


@pytest.mark.parametrize("utility,label", [("prob", None), ("margin", None), ("prob", "negative")])
def test_values_equal_exact_enumeration_within_3_stderr(explainer, utility, label):
    cfg = ExplainConfig(utility=utility, label=label, sampler="permutation", n_permutations=300, seed=1)
    expl = explainer.explain(NEW, cfg)
    assert expl.values.shape == expl.stderr.shape == expl.k_test_train.shape == (3, explainer.n) and explainer.n <= 8
    rows = explainer.kernel_rows(NEW)
    problem, scores = explainer._problem(rows, None if label is None else 0)
    np.testing.assert_allclose(expl.scores, scores, rtol=0, atol=1e-12 * np.abs(scores).max())
    tol = utility_tol(problem, float(np.abs(scores).max()))
    for i in range(3):
        single = one_point_problem(problem, i)
        exact = exact_shapley(single, EXPLAIN_UTILITIES[utility])
        assert np.all(np.abs(expl.values[i] - exact) <= 3 * expl.stderr[i] + tol), (i, expl.values[i], exact)
        assert abs(exact.sum() - (expl.u_full[i] - expl.u_empty[i])) <= explainer.n * tol  # exact efficiency
        assert abs(expl.values[i].sum() - (expl.u_full[i] - expl.u_empty[i])) <= explainer.n * tol
    assert expl.label.tolist() == ([0, 0, 0] if label else np.argmax(expl.scores, 1).tolist())
    np.testing.assert_allclose(expl.prediction.sum(1), 1.0, rtol=1e-15)


def test_a_training_text_is_among_its_own_most_helpful_examples(explainer):
    train = explainer.run.train.column("text").to_pylist()
    expl = explainer.explain(train, ExplainConfig(n_permutations=100))
    for j in range(len(train)):  # the most helpful one: the fit with it interpolates its own label
        assert np.argmax(expl.values[j]) == j, (j, expl.values[j])


def test_table_lists_helpful_and_harmful(explainer):
    expl = explainer.explain(NEW[:2], ExplainConfig(n_permutations=40, top=2))
    t = expl.table()
    assert list(t.columns) == ["text_id", "effect", "rank", "train_index", "train_id", "train_text", "train_label",
                               "train_loo_label", "suspect_label", "value", "stderr"]
    for tid in (0, 1):
        helpful = t[(t.text_id == tid) & (t.effect == "helpful")]
        harmful = t[(t.text_id == tid) & (t.effect == "harmful")]
        assert len(helpful) <= 2 and len(harmful) <= 2 and (helpful.value > 0).all() and (harmful.value < 0).all()
        v = expl.values[tid]
        assert helpful.value.tolist() == sorted(v[v > 0], reverse=True)[:2]
        assert harmful.value.tolist() == sorted(v[v < 0])[:2]
        assert helpful["rank"].tolist() == list(range(1, len(helpful) + 1))
    assert len(expl.table(top=10)) == int((expl.values != 0).sum())
    row = t.iloc[0]
    assert row.train_text == TEXTS[row.train_id] and row.suspect_label == (row.train_label != row.train_loo_label)


# --------------------------------------------------------------------------------------------------
# Kernel rows: the kernel job's rows, in-process and on Ray alike


@pytest.mark.parametrize("extra", [(), ("kernel.kind=full",), ("kernel.projection_dim=64",)],
                         ids=["first_logit", "full", "projected"])
def test_rows_equal_the_kernel_jobs_rows_for_appended_texts(ray_local, tmp_path, extra):
    from freeshap_ray.distributed.kernel_job import KernelInputs
    from freeshap_ray.grads import param_sizes
    from freeshap_ray.io import KernelStore, Layout
    from freeshap_ray.io.run import read_finished_run
    from freeshap_ray.models import load_classifier, resolve_model_path, select_params

    out = _tiny_run(tmp_path, *extra)
    run = read_finished_run(out)
    cfg = run.config
    with Explainer(out, use_ray=False) as local, Explainer(out, use_ray=True) as remote:
        rows, phi = local._test_side(NEW)
        np.testing.assert_array_equal(local.kernel_rows(NEW), rows)
        # the same computation on an actor: equal up to the float32 rounding of the gradients (another process's
        # BLAS may order the float32 sums differently), inside the kernel's accuracy
        assert rel_err(remote.kernel_rows(NEW), rows) <= 1e-6
        expl = local.explain(NEW, ExplainConfig(sampler="permutation", n_permutations=10))
        problem, scores = local._problem(rows, None, phi)
        rel = _rel_tol(problem)
        tol = local.n * 4 * rel * max(1.0, float(np.abs(scores).max()))
        np.testing.assert_allclose(expl.values.sum(1), expl.u_full - expl.u_empty, rtol=0, atol=tol)  # efficiency
        direct = problem.predict(None)  # a fresh solve with the new rows (features) as test set
        np.testing.assert_allclose(expl.scores, direct, rtol=0, atol=rel * np.abs(direct).max())
    model_dir = resolve_model_path(cfg.model.path, seed=cfg.model.seed)
    clf = load_classifier(model_dir, cfg.model)
    names = select_params(clf, cfg.model.params)
    test = run.test.column("text").to_pylist()
    job = KernelInputs(run.train.column("text").to_pylist(), test + NEW, model_dir, cfg.model, cfg.kernel, names,
                       param_sizes(clf, names))
    layout = Layout.of(tmp_path / "appended")
    run_kernel_job(job, layout, progress=False)
    want = KernelStore(layout).read().test_train[len(test):]
    assert rows.shape == want.shape
    assert rel_err(rows, want) <= 1e-6


def _rel_tol(problem) -> float:
    """Relative accuracy of any two backward-stable evaluations of ``problem``'s predictions (for a projected
    run's feature problem, feature space and kernel space both)."""
    if isinstance(problem, FeatureProblem):
        return primal_tol(problem) + solve_tol(problem.to_dual())  # to_dual: n×n, the tiny test's reference only
    return solve_tol(problem)


def test_projected_run_explains_without_an_n_by_n_kernel(ray_local, tmp_path, monkeypatch):
    """A projected run (features dataset): the explainer never assembles the kernel (doing so raises here), its
    surrogate works in feature space, and the values equal exact enumeration of each text's one-point game within
    3 stderr (on the equivalent kernel problem, the reference at n = 6)."""
    from freeshap_ray.io import stores

    out = _tiny_run(tmp_path, "kernel.projection_dim=64")

    def formed(*args, **kwargs):
        raise AssertionError("the n×n kernel of the features was formed")

    monkeypatch.setattr(stores, "_kernel_of_features", formed)
    with Explainer(out, use_ray=False) as ex:
        assert ex.run.projected and ex.run.kernel is None and ex.n == 6
        expl = ex.explain(NEW, ExplainConfig(sampler="permutation", n_permutations=300, seed=1))
        rows, phi = ex._test_side(NEW)
        problem, scores = ex._problem(rows, None, phi)
    assert isinstance(problem, FeatureProblem) and rows.shape == (3, 6) and phi.shape[0] == 3
    np.testing.assert_allclose(expl.scores, scores, rtol=0, atol=1e-12 * np.abs(scores).max())
    dual = problem.to_dual()
    tol = 4 * _rel_tol(problem) * max(1.0, float(np.abs(scores).max()))
    for i in range(3):
        exact = exact_shapley(one_point_problem(dual, i), EXPLAIN_UTILITIES["prob"])
        assert np.all(np.abs(expl.values[i] - exact) <= 3 * expl.stderr[i] + tol), (i, expl.values[i], exact)
        assert abs(exact.sum() - (expl.u_full[i] - expl.u_empty[i])) <= ex.n * tol


def test_ray_values_equal_in_process_values(explainer, run, ray_local):
    from freeshap_ray.distributed.shapley_job import run_valuation
    from freeshap_ray.valuation.sinks import MemorySink

    cfg = ExplainConfig(n_permutations=30, seed=4, permutations_per_task=7)
    problem, scores = explainer._problem(explainer.kernel_rows(NEW[:1]), None)
    single = one_point_problem(problem, 0)
    settings = explainer._settings(cfg)
    local = one_point_values(single, settings)
    remote = run_valuation(single, settings, MemorySink(), progress=False)  # permutations as Ray tasks
    np.testing.assert_allclose(remote.values.values, local.values.values, rtol=0,
                               atol=utility_tol(problem, np.abs(scores).max()))
    np.testing.assert_array_equal(remote.values.counts, local.values.counts)
    assert remote.info["v_full"] == pytest.approx(local.info["v_full"], abs=utility_tol(problem, 1.0))
    with Explainer(run, use_ray=True) as ex:  # the whole explanation on Ray
        expl = ex.explain(NEW[:1], cfg)
    assert expl.info["ray"] and expl.counts.min() == 30
    gap = expl.u_full[0] - expl.u_empty[0]  # TMC (tol 0.05): the sum is within 0.05·|U(N)| of U(N) - U(∅)
    assert abs(expl.values[0].sum() - gap) <= 0.05 * abs(expl.u_full[0]) + utility_tol(problem, 1.0)


def test_ray_actors_given_are_reused_and_checked(run, ray_local):
    import ray

    from freeshap_ray.io.run import read_finished_run
    from freeshap_ray.kernel.worker import KernelWorker
    from freeshap_ray.models import resolve_model_path

    cfg = read_finished_run(run).config
    model_dir = str(resolve_model_path(cfg.model.path, seed=cfg.model.seed))
    cls = ray.remote(num_cpus=0.5)(KernelWorker)
    actor = cls.remote(model_dir, cfg.model, cfg.kernel)
    expl = freeshap_ray.explain(run, NEW[0], actors=[actor], n_permutations=10)
    assert isinstance(expl, Explanation) and expl.info["ray"]
    assert ray.get(actor.__ray_call__.remote(lambda w: len(w.names))) > 0  # still alive: not killed
    shard = cls.remote(model_dir, cfg.model, cfg.kernel, param_names=ray.get(
        actor.__ray_call__.remote(lambda w: w.names[:1])))
    with pytest.raises(ConfigError, match=r"actors\[0\]"):
        Explainer(run, actors=[shard]).prepare()
    for a in (actor, shard):
        ray.kill(a)


# --------------------------------------------------------------------------------------------------
# The training-gradient cache


def test_feature_cache_is_built_once_reused_and_validated(ray_local, tmp_path):
    out = _tiny_run(tmp_path)
    with Explainer(out, use_ray=False) as ex:
        rows = ex.kernel_rows(NEW)
    blocks = sorted((out / "explain" / "train_features").glob("block-*.npz"))
    assert len(blocks) == 2 and (out / "explain" / "train_features" / "key.json").is_file()  # 6 examples, blocks of 3
    stamp = [b.stat().st_mtime_ns for b in blocks]
    with Explainer(out, use_ray=False) as ex:
        np.testing.assert_array_equal(ex.kernel_rows(NEW), rows)
        assert ex.seconds["train_features"] == 0.0
    assert [b.stat().st_mtime_ns for b in blocks] == stamp  # reused, not rewritten
    with np.load(blocks[1], allow_pickle=False) as z:
        arrays = dict(z)
    arrays["dense"] = arrays["dense"][:1]  # a block that does not fit its examples
    with open(blocks[1], "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(OutputError, match="block-00001.npz"):
        Explainer(out, use_ray=False).kernel_rows(NEW)
    with Explainer(out, use_ray=False, overwrite=True) as ex:  # the bad block is recomputed, the good one kept
        np.testing.assert_array_equal(ex.kernel_rows(NEW), rows)
        assert ex.seconds["train_features"] > 0
    assert blocks[0].stat().st_mtime_ns == stamp[0] and blocks[1].stat().st_mtime_ns != stamp[1]
    key = json.loads((out / "explain" / "train_features" / "key.json").read_text())
    key["signature"] = "another plan"
    (out / "explain" / "train_features" / "key.json").write_text(json.dumps(key))
    with Explainer(out, use_ray=False) as ex:  # a cache of another plan is discarded
        np.testing.assert_array_equal(ex.kernel_rows(NEW), rows)
        assert ex.seconds["train_features"] > 0


# --------------------------------------------------------------------------------------------------
# CLI, explanations.parquet, resume


def _copy(run, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(run, out, ignore=shutil.ignore_patterns("explanations.parquet", "explain"))
    return out


def test_cli_explain_prints_writes_and_resumes(run, tmp_path, capsys):
    run = _copy(run, tmp_path)
    target = run / "explanations.parquet"
    (tmp_path / "t.txt").write_text("boring , awful and dull\n\n  \nit was fine\n", encoding="utf-8")
    args = ["explain", str(run), "--text", NEW[0], "--texts", str(tmp_path / "t.txt"), "--top", "2",
            "--n-permutations", "20", "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "prediction: negative" in printed and "most helpful:" in printed and "most harmful:" in printed
    assert " ± " in printed and "(0 reused)" in printed and "explanations.parquet" in printed
    t = pq.read_table(target)
    n = 6
    assert t.schema.names == EXPLANATIONS_SCHEMA.names and t.num_rows == 3 * n
    df = t.to_pandas()
    assert df.groupby("text_id").text.first().tolist() == NEW
    for _, g in df.groupby("text_id"):
        assert sorted(g["rank"]) == list(range(1, n + 1)) and sorted(g["index"]) == list(range(n))
        assert g.sort_values("rank").value.is_monotonic_decreasing
        assert abs(g.value.sum() - (g.u_full.iloc[0] - g.u_empty.iloc[0])) < 1e-9 + 0.05 * abs(g.u_full.iloc[0])
    before = target.read_bytes()
    assert main(args) == 0
    assert "(3 reused)" in capsys.readouterr().out and target.read_bytes() == before
    first = pq.read_table(target).to_pandas()
    assert main(["explain", str(run), "--text", "a new text", "--n-permutations", "20", "--no-progress"]) == 0
    df = pq.read_table(target).to_pandas()
    assert df.text_id.max() == 3 and df[df.text_id < 3].reset_index(drop=True).equals(first)
    stored = target.read_bytes()
    # the same text with other settings: refused, nothing changes; --overwrite replaces it (same text_id)
    assert main(["explain", str(run), "--text", NEW[0], "--seed", "5", "--no-progress"]) == 2
    assert "seed" in capsys.readouterr().err and target.read_bytes() == stored
    assert main(["explain", str(run), "--text", NEW[0], "--seed", "5", "--n-permutations", "20", "--overwrite",
                 "--no-progress"]) == 0
    df = pq.read_table(target).to_pandas()
    assert sorted(df.text_id.unique()) == [0, 1, 2, 3]
    assert json.loads(df[df.text_id == 0].settings.iloc[0])["seed"] == 5
    # "why not X?": another question about the same text is added, not a conflict
    assert main(["explain", str(run), "--text", NEW[0], "--label", "positive", "--seed", "5", "--n-permutations",
                 "20", "--no-progress"]) == 0
    df = pq.read_table(target).to_pandas()
    assert df.text_id.max() == 4 and (df[df.text_id == 4].label_name == "positive").all()
    assert not list(run.rglob(".*.tmp-*"))


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_cli_texts_from_tables(run, tmp_path, capsys, fmt):
    import pandas as pd

    path = tmp_path / f"t.{fmt}"
    df = pd.DataFrame({"text": NEW[:2], "other": [1, 2]})
    {"csv": lambda: df.to_csv(path, index=False), "jsonl": lambda: df.to_json(path, orient="records", lines=True),
     "parquet": lambda: df.to_parquet(path)}[fmt]()
    out = _copy(run, tmp_path)
    assert main(["explain", str(out), "--texts", str(path), "--n-permutations", "10", "--no-progress"]) == 0
    assert pq.read_table(out / "explanations.parquet").column("text").unique().to_pylist() == NEW[:2]
    capsys.readouterr()


@pytest.mark.parametrize("case,extra,needle", [
    ("no texts", [], "--text"),
    ("bad utility", ["--text", "x", "--utility", "nope"], "explain.utility"),
    ("bad permutations", ["--text", "x", "--n-permutations", "0"], "explain.n_permutations"),
    ("unknown label", ["--text", "x", "--label", "neutral"], "explain.label"),
    ("label index", ["--text", "x", "--label", "7"], "explain.label"),
    ("empty text", ["--text", "  "], "texts[0]"),
    ("missing file", ["--texts", "/nonexistent/t.txt"], "--texts"),
    ("empty row", ["--texts", "EMPTYROW"], "row 1"),
    ("bad column", ["--texts", "EMPTYROW", "--text-column", "nope"], "nope"),
    ("bad utf8", ["--texts", "LATIN1"], "line 2"),
])
def test_cli_explain_bad_input_exit_2_no_output(run, tmp_path, capsys, case, extra, needle):
    out = _copy(run, tmp_path)
    (tmp_path / "e.csv").write_text('text\nfine\n""\n', encoding="utf-8")
    (tmp_path / "l.txt").write_bytes("ok\ncaf\xe9\n".encode("latin-1"))
    extra = [str(tmp_path / "e.csv") if x == "EMPTYROW" else str(tmp_path / "l.txt") if x == "LATIN1" else x
             for x in extra]
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert main(["explain", str(out), *extra, "--no-progress"]) == 2
    assert needle in capsys.readouterr().err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # nothing written


def test_cli_explain_of_a_missing_run_exit_2(tmp_path, capsys):
    assert main(["explain", str(tmp_path / "nope"), "--text", "x"]) == 2
    assert "nope" in capsys.readouterr().err and not (tmp_path / "nope").exists()


def test_public_api(run, explainer, tmp_path):
    assert callable(freeshap_ray.explain) and freeshap_ray.Explainer is Explainer
    expl = freeshap_ray.explain(run, NEW[1], n_permutations=10, top=3, explainer=explainer)
    assert isinstance(expl, Explanation) and expl.values.shape == (1, explainer.n) and expl.settings.top == 3
    assert expl.prediction.shape == (1, 2) and expl.k_test_train.shape == (1, explainer.n)
    with pytest.raises(ConfigError, match="explain.truncation_tol"):
        freeshap_ray.explain(run, "x", truncation_tol=-1, explainer=explainer)
    with pytest.raises(TypeError):
        freeshap_ray.explain(run, "x", n_perms=3)
    with Explainer(_copy(run, tmp_path), use_ray=False) as ex:
        stored = freeshap_ray.explain(None, NEW[1], n_permutations=10, explainer=ex, save=True)
        again = run_explain_stage(ex, [NEW[1]], ExplainConfig(n_permutations=10))
    assert again.info["reused"] == [0] and stored.info["reused"] == []
    np.testing.assert_array_equal(again.values, stored.values)
