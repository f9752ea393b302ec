"""``data.dedupe``: normalisation, keep-first, conflicts, train/test leakage, order of operations, outputs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from freeshap_ray.config import DataConfig
from freeshap_ray.data import load_splits
from freeshap_ray.data.dedupe import (
    URL_TOKEN,
    Duplicates,
    conflict_groups,
    dedupe_keys,
    first_occurrences,
    normalize_text,
    occurrences_in,
)
from freeshap_ray.errors import ConfigError, DataError

NAMES = ("negative", "positive")


# ----------------------------------------------------------------------------------------------
# Keys


@pytest.mark.parametrize(
    "a,b",
    [
        ("Great Movie", "great movie"),  # case
        ("STRASSE", "straße"),  # case folding, not just lower()
        ("a  b\tc\nd", "a b c d"),  # whitespace runs
        ("  padded\u00a0text \r\n", "padded text"),  # leading/trailing, non-breaking space
        ("see http://t.co/abc now", "see https://t.co/XYZ now"),  # URLs
        ("see www.example.com/x now", "see HTTPS://other.org now"),
        ("link:http://a.b/c?d=1&e=2", "link: www.x.y"),  # a URL glued to a word is still one placeholder
    ],
)
def test_normalized_keys_equal(a, b):
    assert normalize_text(a) == normalize_text(b)
    assert dedupe_keys([a, b], "normalized")[0] == dedupe_keys([a, b], "normalized")[1]
    assert dedupe_keys([a, b], "exact") == [a, b]  # exact keeps them apart


@pytest.mark.parametrize(
    "a,b",
    [
        ("great!", "great"),  # punctuation counts
        ("not good", "good"),
        ("see http://t.co/abc", "see"),  # a URL is not nothing
        (f"see {URL_TOKEN}x", "see http://t.co/abc x"),
        ("awww.lol", "awww.omg"),  # www. inside a word is no URL
    ],
)
def test_normalized_keys_differ(a, b):
    assert normalize_text(a) != normalize_text(b)


def test_normalized_form_and_unknown_mode():
    assert normalize_text("  Hello\n\nWORLD  http://x.io/a  ") == f"hello world {URL_TOKEN}"
    with pytest.raises(ValueError, match="mode"):
        dedupe_keys(["a"], "fuzzy")


def test_first_occurrences_and_occurrences_in_match_brute_force():
    rng = np.random.default_rng(0)
    keys = [str(k) for k in rng.integers(0, 12, 80)]
    ref = [str(k) for k in rng.integers(6, 20, 40)]
    kept, dropped, first = first_occurrences(keys)
    assert kept.tolist() == [i for i, k in enumerate(keys) if k not in keys[:i]]
    assert dropped.tolist() == [i for i, k in enumerate(keys) if k in keys[:i]]
    assert first.tolist() == [keys.index(keys[i]) for i in dropped]
    kept, dropped, match = occurrences_in(keys, ref)
    assert kept.tolist() == [i for i, k in enumerate(keys) if k not in ref]
    assert dropped.tolist() == [i for i, k in enumerate(keys) if k in ref]
    assert match.tolist() == [ref.index(keys[i]) for i in dropped]
    for out in (first_occurrences([]), occurrences_in([], ref), occurrences_in(keys, [])):
        assert all(a.dtype == np.int64 for a in out)


def test_conflict_groups_list_whole_groups_with_different_labels():
    rows = [
        {"split": "train", "id": 5, "label_name": "pos", "kept_id": 2, "kept_text": "b", "kept_label_name": "pos"},
        {"split": "train", "id": 9, "label_name": "neg", "kept_id": 2, "kept_text": "b", "kept_label_name": "pos"},
        {"split": "train", "id": 4, "label_name": "neg", "kept_id": 1, "kept_text": "a", "kept_label_name": "neg"},
        {"split": "test", "id": 0, "label_name": "pos", "kept_id": 0, "kept_text": "z", "kept_label_name": "neg"},
    ]
    assert conflict_groups(rows) == [
        {"text": "z", "ids": [0, 0], "labels": ["neg", "pos"], "splits": ["train", "test"]},
        {"text": "b", "ids": [2, 5, 9], "labels": ["pos", "pos", "neg"], "splits": ["train", "train", "train"]},
    ]
    assert conflict_groups([]) == []


# ----------------------------------------------------------------------------------------------
# load_splits: each mode on files with repeats, conflicts and leakage

TRAIN = [  # (text, label)
    ("Great movie!", "positive"),  # 0
    ("great   MOVIE!", "positive"),  # 1 normalized repeat of 0
    ("Great movie!", "negative"),  # 2 exact repeat of 0, other label
    ("Check http://a.co/1 now", "negative"),  # 3
    ("check https://b.co/2 NOW", "positive"),  # 4 normalized repeat of 3, other label
    ("boring", "negative"),  # 5
    ("fun", "positive"),  # 6
    ("awful plot", "negative"),  # 7
    ("lovely", "positive"),  # 8
    ("Boring", "negative"),  # 9 normalized repeat of 5
]
TEST = [
    ("boring", "negative"),  # 0 exact copy of train 5
    ("FUN", "positive"),  # 1 normalized copy of train 6
    ("new text", "positive"),  # 2
    ("lovely", "negative"),  # 3 exact copy of train 8, other label
    ("unique", "negative"),  # 4
]

# mode -> (train ids kept, test ids kept, dropped (split, id, reason, kept_id), conflicting kept ids)
EXPECTED = {
    "exact": ([0, 1, 3, 4, 5, 6, 7, 8, 9], [1, 2, 4],
              [("train", 2, "repeat", 0), ("test", 0, "test_in_train", 5), ("test", 3, "test_in_train", 8)],
              [0, 8]),
    "normalized": ([0, 3, 5, 6, 7, 8], [2, 4],
                   [("train", 1, "repeat", 0), ("train", 2, "repeat", 0), ("train", 4, "repeat", 3),
                    ("train", 9, "repeat", 5), ("test", 0, "test_in_train", 5), ("test", 1, "test_in_train", 6),
                    ("test", 3, "test_in_train", 8)],
                   [0, 3, 8]),
}


def _csv(path: Path, rows) -> str:
    pd.DataFrame(rows, columns=["text", "label"]).to_csv(path, index=False)
    return str(path)


def _files(tmp_path: Path) -> tuple[str, str]:
    return _csv(tmp_path / "train.csv", TRAIN), _csv(tmp_path / "test.csv", TEST)


@pytest.mark.parametrize("mode", ["exact", "normalized"])
def test_each_mode_drops_repeats_and_leakage(tmp_path, mode):
    train, test = _files(tmp_path)
    s = load_splits(DataConfig(train=train, test=test, label_names=NAMES, dedupe=mode))
    train_ids, test_ids, dropped, conflicts = EXPECTED[mode]
    assert s.train.ids.tolist() == train_ids and s.test.ids.tolist() == test_ids
    assert list(s.train.texts) == [TRAIN[i][0] for i in train_ids]
    assert list(s.test.texts) == [TEST[i][0] for i in test_ids]
    d = s.duplicates
    assert d.mode == mode
    assert list(zip(d.split, d.ids.tolist(), d.reason, d.kept_ids.tolist())) == dropped
    src = {"train": TRAIN, "test": TEST}
    assert list(d.texts) == [src[sp][i][0] for sp, i, _, _ in dropped]
    assert list(d.kept_texts) == [TRAIN[k][0] for *_, k in dropped]
    assert [NAMES[x] for x in d.labels] == [src[sp][i][1] for sp, i, _, _ in dropped]
    assert [NAMES[x] for x in d.kept_labels] == [TRAIN[k][1] for *_, k in dropped]
    assert d.conflict.tolist() == [src[sp][i][1] != TRAIN[k][1] for sp, i, _, k in dropped]
    assert d.counts() == {"mode": mode, "train_dropped": sum(r == "repeat" for *_, r, _ in dropped),
                          "test_dropped": sum(r == "test_in_train" for *_, r, _ in dropped),
                          "conflicts": len(conflicts)}
    # afterwards: no repeated training key, no test key among the training keys
    train_keys = dedupe_keys(s.train.texts, mode)
    assert len(set(train_keys)) == len(train_keys)
    assert not set(dedupe_keys(s.test.texts, mode)) & set(train_keys)


def test_none_keeps_everything_and_warns(tmp_path, caplog):
    train, test = _files(tmp_path)
    with caplog.at_level(logging.WARNING, logger="freeshap_ray.data.splits"):
        s = load_splits(DataConfig(train=train, test=test, label_names=NAMES))
    assert s.duplicates is None and DataConfig(label_names=NAMES).dedupe == "none"
    assert s.train.ids.tolist() == list(range(10)) and s.test.ids.tolist() == list(range(5))
    assert "1 training texts repeat an earlier one (1 with a different label)" in caplog.text
    assert "2 test texts also occur in the training data" in caplog.text
    assert "data.dedupe" in caplog.text


@pytest.mark.parametrize("mode", ["exact", "normalized"])
def test_holdout_dedupes_the_source_before_the_split(tmp_path, mode):
    """Without data.test: no text on both sides, and the split is made of distinct texts."""
    rows = [(f"Text number {i}" if r % 2 else f"text   NUMBER {i}", NAMES[i % 2]) for i in range(30) for r in range(3)]
    s = load_splits(DataConfig(train=_csv(tmp_path / "t.csv", rows), label_names=NAMES, dedupe=mode,
                               test_fraction=0.2, max_examples=20))
    n_distinct = 30 if mode == "normalized" else 60
    n_test = round(0.2 * n_distinct)
    assert len(s.test) == n_test and len(s.train) == 20  # the sizes asked for, from distinct texts
    keys = dedupe_keys(s.train.texts + s.test.texts, mode)
    assert len(set(keys)) == len(keys)
    assert set(s.duplicates.reason) == {"repeat"} and set(s.duplicates.split) == {"train"}
    assert len(s.duplicates) == 90 - n_distinct
    assert s.source["test"] == "split:0.2"


def test_subsampling_comes_after_dedupe(tmp_path):
    """max_test_examples is met from the test texts left after the leaked ones are dropped."""
    train = _csv(tmp_path / "train.csv", [(f"train {i}", NAMES[i % 2]) for i in range(20)])
    test_rows = [(f"train {i}", NAMES[i % 2]) for i in range(6)] + [(f"test {i}", NAMES[i % 2]) for i in range(6)]
    test = _csv(tmp_path / "test.csv", test_rows)
    s = load_splits(DataConfig(train=train, test=test, label_names=NAMES, dedupe="exact", max_test_examples=6,
                               max_examples=10))
    assert list(s.test.texts) == [f"test {i}" for i in range(6)] and len(s.train) == 10
    assert s.duplicates.ids.tolist() == list(range(6))


def test_every_test_text_in_train_is_an_error(tmp_path):
    train = _csv(tmp_path / "train.csv", TRAIN)
    test = _csv(tmp_path / "test.csv", [("GREAT movie!", "positive"), ("boring", "negative")])
    load_splits(DataConfig(train=train, test=test, label_names=NAMES, dedupe="exact"))  # one is left
    with pytest.raises(DataError, match=r"data\.test: .*test\.csv.*all 2 test texts.*data\.dedupe=normalized"):
        load_splits(DataConfig(train=train, test=test, label_names=NAMES, dedupe="normalized"))


def test_too_few_distinct_texts_to_hold_out(tmp_path):
    train = _csv(tmp_path / "train.csv", [("same", "positive"), ("SAME ", "negative")])
    with pytest.raises(DataError, match=r"has 1 example\(s\) \(after data\.dedupe=normalized\)"):
        load_splits(DataConfig(train=train, label_names=NAMES, dedupe="normalized"))


def test_unknown_mode_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^data\.dedupe: must be one of \['none', 'exact', 'normalized'\]"):
        DataConfig(label_names=NAMES, dedupe="fuzzy")


def test_duplicates_add_and_empty():
    e = Duplicates.empty("exact")
    assert len(e) == 0 and e.counts() == {"mode": "exact", "train_dropped": 0, "test_dropped": 0, "conflicts": 0}
    with pytest.raises(ValueError, match="mode"):
        e + Duplicates.empty("normalized")


# ----------------------------------------------------------------------------------------------
# A tiny job writes duplicates.parquet and the counts


def test_tiny_job_writes_duplicates(ray_local, tmp_path, capsys):
    from freeshap_ray.cli import main

    from .helpers import job_args

    train, test = _files(tmp_path)
    out = tmp_path / "out"
    assert main(["kernel", *job_args(train, out, f"data.test={test}", "data.dedupe=normalized")]) == 0
    t = pq.read_table(out / "duplicates.parquet")
    assert t.column_names == ["split", "id", "text", "label", "label_name", "reason", "kept_id", "kept_text",
                              "kept_label", "kept_label_name", "conflict"]
    _, test_ids, dropped, conflicts = EXPECTED["normalized"]
    assert list(zip(t.column("split").to_pylist(), t.column("id").to_pylist(), t.column("reason").to_pylist(),
                    t.column("kept_id").to_pylist())) == dropped
    assert t.column("conflict").to_pylist() == [False, True, True, False, False, False, True]
    assert t.column("kept_label_name").to_pylist()[:3] == ["positive", "positive", "negative"]
    assert pq.read_table(out / "test.parquet").column("id").to_pylist() == test_ids
    stage = json.loads((out / "manifest.json").read_text())["stages"]["kernel"]
    assert stage["duplicates"] == {"mode": "normalized", "train_dropped": 4, "test_dropped": 3,
                                   "conflicts": len(conflicts)}
    assert stage["data_summary"]["test_in_train"] == 0 and stage["data_summary"]["train_repeats"] == 0
    printed = capsys.readouterr().out
    assert "repeated training texts: 0, test texts also in training (leakage): 0" in printed
    assert "data.dedupe=normalized dropped 4 repeated and 3 test-in-train texts" in printed
    # rerun without dedupe (another plan; the embedded quickstart config sets normalized): the stale file goes
    assert main(["kernel", *job_args(train, out, f"data.test={test}", "data.dedupe=none"), "--overwrite"]) == 0
    assert not (out / "duplicates.parquet").exists()
    summary = json.loads((out / "manifest.json").read_text())["stages"]["kernel"]["data_summary"]
    assert summary["test_in_train"] > 0 and summary["train_repeats"] > 0  # what the summary line then reports
    assert "duplicates" not in json.loads((out / "manifest.json").read_text())["stages"]["kernel"]
