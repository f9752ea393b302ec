"""CSV / TSV / JSON files as people write them: line breaks and quotes inside texts, pandas' own output,
files larger than one pyarrow block, JSON arrays, blank lines and very long lines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from freeshap_ray.config import DataConfig
from freeshap_ray.data import load_splits, load_table
from freeshap_ray.errors import DataError

LABELS = ("negative", "positive")

# Texts with every kind of line break and quoting a tweet or review can hold.
AWKWARD = [
    "line one\nline two",
    "windows\r\nline break",
    "\nstarts with a line break",
    "ends with a line break\n",
    "a lone\rcarriage return",  # pandas writes this one unquoted
    "ends with a carriage return\r",
    "\r\rtwo leading carriage returns",
    'she said "hi", then left',
    '"fully quoted"',
    "tab\tinside",
    "comma, inside",
    "blank line\n\ninside",
    "  padded  ",
    "123",
    "NA",
    "plain",
]


def _texts(n: int) -> list[str]:
    """``n`` distinct texts cycling through AWKWARD, long enough that 20,000 of them span several 1 MiB blocks."""
    rng = np.random.default_rng(0)
    return [f"{AWKWARD[i % len(AWKWARD)]} #{i} " + "word " * int(rng.integers(0, 40)) for i in range(n)]


def _frame(n: int) -> pd.DataFrame:
    return pd.DataFrame({"text": _texts(n), "label": [LABELS[i % 2] for i in range(n)], "extra": np.arange(n)})


def _roundtrip(path: Path, df: pd.DataFrame, **kw) -> None:
    """The file reads back as ``df``: same texts (exactly), labels and row order; splits trace back by id."""
    table = load_table(path, field="data.train", text_column="text", **kw)
    assert table.num_rows == len(df)
    assert table.column("text").to_pylist() == df["text"].tolist()
    assert table.column("label").to_pylist() == df["label"].tolist()
    assert table.column("extra").to_pylist() == df["extra"].tolist()
    s = load_splits(DataConfig(train=str(path), label_names=LABELS, **kw))
    for ex in (s.train, s.test):
        assert list(ex.texts) == [df["text"][i] for i in ex.ids]


@pytest.mark.parametrize("sep,suffix", [(",", "csv"), ("\t", "tsv")])
@pytest.mark.parametrize("lineterminator", ["\n", "\r\n"])
def test_pandas_written_file_with_line_breaks_round_trips(tmp_path, sep, suffix, lineterminator):
    df = _frame(20_000)
    path = tmp_path / f"d.{suffix}"
    df.to_csv(path, index=False, sep=sep, lineterminator=lineterminator)
    assert path.stat().st_size > 2 * (1 << 20)  # at least three of pyarrow's 1 MiB blocks
    raw = path.read_bytes()
    assert b'"line one\nline two' in raw and b"a lone\rcarriage" in raw  # quoted LF, unquoted lone CR
    _roundtrip(path, df)


@pytest.mark.parametrize("encoding", ["latin-1", "utf-16", "cp1252"])
def test_line_breaks_in_other_encodings(tmp_path, encoding):
    df = _frame(300)
    df.loc[0, "text"] = "caf\xe9\rcr\xe8me\nbr\xfbl\xe9e"
    path = tmp_path / "d.csv"
    df.to_csv(path, index=False, encoding=encoding)
    _roundtrip(path, df, encoding=encoding)


def test_python_csv_module_file_round_trips(tmp_path):
    """csv.writer's default CRLF rows quote every CR and LF."""
    import csv

    df = _frame(500)
    path = tmp_path / "d.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(df.columns)
        w.writerows(df.itertuples(index=False))
    _roundtrip(path, df)


def test_rows_ending_in_a_lone_cr_are_still_rows(tmp_path):
    """A classic-Mac file (rows end in CR) is read row by row; a quoted LF inside it stays in its text."""
    path = tmp_path / "mac.csv"
    path.write_bytes(b'text,label\r"a\nb",negative\rplain,positive\r')
    t = load_table(path, field="data.train", text_column="text")
    assert t.to_pylist() == [{"text": "a\nb", "label": "negative"}, {"text": "plain", "label": "positive"}]


@pytest.mark.parametrize(
    "content,needle",
    [
        ("text,label\na\rb,negative,extra\nc,positive\n", "Expected 2 columns"),  # ragged row after a lone CR
        ('text,label\na\rb,negative\n"open quote,positive\n', "CSV"),
    ],
)
def test_malformed_csv_with_lone_cr_names_the_file(tmp_path, content, needle):
    path = tmp_path / "bad.csv"
    path.write_bytes(content.encode())
    with pytest.raises(DataError, match=needle) as err:
        load_table(path, field="data.train", text_column="text")
    assert "data.train" in str(err.value) and "bad.csv" in str(err.value)


def test_invalid_utf8_with_lone_cr_still_names_the_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_bytes(b"text,label\na\rb,negative\n\xff broken,positive\n")
    with pytest.raises(DataError, match=r"bad\.csv.*not valid UTF-8 \(line 3"):
        load_table(path, field="data.train", text_column="text")


# ----------------------------------------------------------------------------------------------
# JSON Lines and JSON arrays


def test_pandas_json_lines_round_trip(tmp_path):
    df = _frame(3000)
    path = tmp_path / "d.jsonl"
    df.to_json(path, orient="records", lines=True, force_ascii=False)
    assert "\\n" in path.read_text() and "\\r" in path.read_text()  # escaped inside JSON strings
    _roundtrip(path, df)


def test_json_lines_blank_lines_crlf_and_long_lines(tmp_path):
    long_text = "a very long review " * 200_000  # 3.8 MB: longer than pyarrow's 1 MiB block
    rows = [{"text": "first", "label": 0}, {"text": long_text, "label": 1}, {"text": "x\ny", "label": 0}]
    path = tmp_path / "d.jsonl"
    a, b, c = (json.dumps(r) for r in rows)
    path.write_bytes(f"\n{a}\r\n\r\n{b}\n \n{c}\r\n\n  \n".encode())  # CRLF, blank and blank-looking lines
    t = load_table(path, field="data.train")
    assert t.column("text").to_pylist() == [r["text"] for r in rows]
    assert t.column("label").to_pylist() == [0, 1, 0]


@pytest.mark.parametrize("suffix", ["json", "jsonl"])
def test_json_array_of_records(tmp_path, suffix):
    df = _frame(400)
    path = tmp_path / f"d.{suffix}"
    df.to_json(path, orient="records")
    assert path.read_text().startswith("[")
    _roundtrip(path, df)
    # columns in order of first appearance; a key missing from an object is null
    path.write_text(json.dumps([{"text": "a", "label": 0}, {"label": 1, "text": "b", "note": "n"}]), encoding="utf-8")
    t = load_table(path, field="data.train")
    assert t.column_names == ["text", "label", "note"] and t.column("note").to_pylist() == [None, "n"]


@pytest.mark.parametrize(
    "content,needles",
    [
        ("[]", ["is empty"]),
        ('[{"text": "a", "label": 0}, "b"]', ["element 1", "str", "one object per example"]),
        ('[{"text": "a", "label": 0}, {"text": "b", "label": "x"}]', ["different types"]),
        ('[{"text": "a", "label": 0},\n {"text": "b"', ["cannot parse as a JSON array", "line 2"]),
        ('{"text": {"0": "a", "1": "b"}, "label": {"0": 0, "1": 1}}', ["orient='columns'", "orient='records'"]),
    ],
)
def test_bad_json_names_the_file(tmp_path, content, needles):
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_table(path, field="data.test")
    msg = str(err.value)
    assert msg.startswith("data.test: ") and "bad.json" in msg
    for needle in needles:
        assert needle in msg, msg
