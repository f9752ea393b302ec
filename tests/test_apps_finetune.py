"""Optional real fine-tuning re-evaluation of removal curves (tiny random models)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from freeshap_ray.apps import run_clean
from freeshap_ray.apps.finetune import FinetuneSettings, Labelled, finetune_accuracy
from freeshap_ray.config import ModelConfig, config_from_dict
from freeshap_ray.models import load_classifier, resolve_model_path

from .helpers import LABELS, TEXTS
from .test_apps_clean import job_dict, write_synthetic_run

TINY = ModelConfig(path="tiny:llama", template="{text} sentiment :", label_words=("bad", "good"), params="last:1")


@pytest.fixture(scope="module")
def tiny_dir():
    return resolve_model_path(TINY.path, cache_dir=None, seed=0)


def test_finetuning_fits_its_subset_and_is_reproducible(tiny_dir):
    y = np.array([0 if lab == "negative" else 1 for lab in LABELS])
    fast = FinetuneSettings(epochs=40, lr=3e-2, batch_size=4, seed=1)
    a = finetune_accuracy(tiny_dir, TINY, Labelled(TEXTS, y), Labelled(TEXTS[:4], y[:4]), fast)
    assert a["train_accuracy"] == 1.0 and a["steps"] == 40 * 3
    b = finetune_accuracy(tiny_dir, TINY, Labelled(TEXTS, y), Labelled(TEXTS[:4], y[:4]), fast)
    assert a["accuracy"] == b["accuracy"] and a["train_accuracy"] == b["train_accuracy"]
    # the empty subset is the untrained (zero-shot) classifier
    empty = finetune_accuracy(tiny_dir, TINY, Labelled([], y[:0]), Labelled(TEXTS, y))
    clf = load_classifier(tiny_dir, TINY)
    enc = clf.encode(TEXTS)
    zero_shot = float((clf(enc.input_ids, enc.attention_mask, enc.read_pos).argmax(1).numpy() == y).mean())
    assert empty["steps"] == 0 and empty["accuracy"] == pytest.approx(zero_shot)


def test_clean_adds_finetuned_removal_curves(ray_local, tmp_path):
    from freeshap_ray.pipeline import run_shapley_stage

    out = tmp_path / "ft"
    write_synthetic_run(out, n=16, m=8)
    d = job_dict(out, noise_fraction=0.0, curve_steps=4, random_repeats=1, baselines=["loo"], finetune=True,
                 finetune_fractions=[0.0, 0.5], finetune_epochs=1, finetune_num_cpus=1.0)
    d["model"] = {"path": TINY.path, "template": TINY.template, "label_words": list(TINY.label_words), "params": "last:1"}
    cfg = config_from_dict(d)
    run_shapley_stage(cfg, progress=False)
    summary = run_clean(cfg, progress=False)
    c = pq.read_table(out / "clean" / "curves.parquet").to_pandas()
    ft = c[c["evaluator"] == "finetune"]
    assert set(zip(ft["method"], ft["curve"], ft["fraction"])) == {
        (m, cv, f) for m in ("freeshap", "random") for cv in ("remove_high", "remove_low") for f in (0.0, 0.5)}
    assert ft[ft["fraction"] == 0.0]["accuracy"].nunique() == 1  # the same full set, fine-tuned once
    assert (ft[ft["fraction"] == 0.5]["n_train"] == 8).all() and ft["accuracy"].between(0, 1).all()
    assert len(summary["finetune"]) == 8
    assert set(c[c["evaluator"] == "kernel"]["method"]) == {"freeshap", "loo", "random"}
