"""Hostile and bad input: configs, data files, encodings, kernels, model directories, existing outputs.

Every case goes through the CLI where it can (``freeshap_ray.cli.main``) and checks the contract: exit
code 2, exactly one error line naming the field or file, no traceback, and no output written (or, for a
finished run, its files unchanged byte for byte). Nearly all cases fail before Ray starts; one module
fixture runs a real tiny job on Ray for the truncation and no-overwrite checks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from freeshap_ray.cli import main
from freeshap_ray.config import DataConfig, ModelConfig, load_config
from freeshap_ray.data import load_splits
from freeshap_ray.errors import KernelError, ModelError
from freeshap_ray.models import check_model_dir, load_classifier, load_lm, resolve_model_path

from .helpers import job_args

torch.set_num_threads(1)

TEXTS = ["the movie was great", "bad acting and a boring plot", "i loved it", "the worst film ever made",
         "a wonderful story", "dull", "brilliant cast", "i hated the ending", "fun and funny"]
LABELS = ["positive", "negative", "positive", "negative", "positive", "negative", "positive", "negative", "positive"]

TINY = [
    "model.path=tiny:llama", "model.template={text} sentiment :", "model.label_words=[bad, good]",
    "model.params=all", "data.min_confidence=null", "data.max_examples=null", "data.max_test_examples=null",
    "data.test_fraction=0.3", "kernel.block_size=4", "kernel.num_cpus_per_actor=0.5",
    "shapley.n_permutations=6", "shapley.permutations_per_task=3", "shapley.num_cpus_per_task=0.5",
    "data.dedupe=none",  # repeated rows stay (the quickstart config this builds on drops them)
]


def _args(train, out, *extra) -> list[str]:
    return job_args(train, out, *extra, base=TINY)


def _csv(path: Path, texts=TEXTS, labels=LABELS, **extra_cols) -> Path:
    pd.DataFrame({"text": list(texts), "label": list(labels), **extra_cols}).to_csv(path, index=False)
    return path


def _fails(capsys, argv: list[str], *needles: str) -> str:
    """Run the CLI, expect exit 2 and ONE error line (no traceback) containing every needle."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("freeshap-ray: error:") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in: {err}"
    return err


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------
# Malformed configs


@pytest.mark.parametrize(
    "case,text,needles",
    [
        ("invalid YAML", "data: [unclosed\n", ["cfg.yaml", "invalid YAML"]),
        ("tab indentation", "data:\n\ttrain: x.csv\n", ["cfg.yaml", "invalid YAML"]),
        ("duplicate key", "shapley:\n  seed: 1\nshapley:\n  seed: 2\n", ["cfg.yaml", "duplicate key 'shapley'"]),
        ("alias bomb", "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                       "c: [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n", ["cfg.yaml", "aliases"]),
        ("top level list", "- data\n- model\n", ["cfg.yaml", "mapping"]),
        ("unknown section", "dataa:\n  train: x.csv\n", ["dataa: unknown key"]),
        ("unknown key", "shapley:\n  n_perms: 3\n", ["shapley.n_perms: unknown key"]),
        ("wrong type", "kernel:\n  block_size: big\n", ["kernel.block_size: expected an integer"]),
        ("string for list", "model:\n  label_words: good\n", ["model.label_words: expected a list"]),
        ("section is a scalar", "data: 5\n", ["data: expected a mapping"]),
        ("bad value", "data:\n  test_fraction: 1.5\n", ["data.test_fraction: must be in (0, 1)"]),
        ("nan", "shapley:\n  lam: .nan\n", ["shapley.lam: expected a finite number"]),
        ("inf", "shapley:\n  truncation_tol: .inf\n", ["shapley.truncation_tol: expected a finite number"]),
        ("negative cpus", "ray:\n  num_cpus: -2\n", ["ray.num_cpus: must be >= 1"]),
        ("unknown encoding", "data:\n  encoding: klingon-8\n", ["data.encoding: unknown text encoding"]),
        ("unknown dedupe mode", "data:\n  dedupe: fuzzy\n", ["data.dedupe: must be one of", "normalized"]),
        ("null dedupe mode", "data:\n  dedupe: null\n", ["data.dedupe: must be one of"]),
        ("word/class count", "model:\n  label_words: [a, b, c]\n", ["model.label_words: 3 words"]),
        ("bool for pickle flag", "model:\n  allow_pickle: yes please\n", ["model.allow_pickle: expected true/false"]),
    ],
)
def test_malformed_config(tmp_path, capsys, case, text, needles):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(text)
    out = tmp_path / "out"
    _fails(capsys, ["run", str(cfg), "--set", f"output={out}"], *needles)
    assert not out.exists(), case


@pytest.mark.parametrize("payload", ["output: caf\xe9\n".encode("latin-1"), "output: x\n".encode("utf-16")])
def test_config_not_utf8(tmp_path, capsys, payload):
    cfg = tmp_path / "enc.yaml"
    cfg.write_bytes(payload)
    _fails(capsys, ["show-config", str(cfg)], "enc.yaml", "not valid UTF-8")


def test_bad_override(capsys):
    _fails(capsys, ["show-config", "--set", "shapley.seed"], "KEY=VALUE")
    _fails(capsys, ["show-config", "--set", "shapley.lam=.nan"], "shapley.lam")


# ----------------------------------------------------------------------------------------------
# Bad data files (all fail before the model is loaded or Ray starts)


def _parquet(path: Path) -> Path:
    pq.write_table(pa.table({"text": TEXTS * 20, "label": LABELS * 20}), path)
    return path


def _make_data(kind: str, d: Path) -> tuple[Path, list[str]]:
    """A bad data file of ``kind`` and extra --set overrides."""
    if kind == "truncated parquet":
        good = _parquet(d / "good.parquet").read_bytes()
        (d / "bad.parquet").write_bytes(good[: len(good) // 2])
        return d / "bad.parquet", []
    if kind == "parquet with a torn footer":
        good = _parquet(d / "good.parquet").read_bytes()
        (d / "bad.parquet").write_bytes(good[:-3])
        return d / "bad.parquet", []
    if kind == "corrupt parquet pages":
        good = bytearray(_parquet(d / "good.parquet").read_bytes())
        good[4:68] = b"\xff" * 64
        (d / "bad.parquet").write_bytes(bytes(good))
        return d / "bad.parquet", []
    if kind == "not parquet at all":
        (d / "bad.parquet").write_bytes(b"text,label\nhello,positive\n")
        return d / "bad.parquet", []
    if kind == "ragged csv":
        (d / "bad.csv").write_text("text,label\ngood,positive\nbad,negative,extra\n")
        return d / "bad.csv", []
    if kind == "truncated csv (open quote)":
        (d / "bad.csv").write_text('text,label\ngood,positive\n"cut off in the midd')
        return d / "bad.csv", []
    if kind == "latin-1 csv":
        (d / "bad.csv").write_bytes("text,label\ncaf\xe9 au lait,positive\nfine,negative\n".encode("latin-1"))
        return d / "bad.csv", []
    if kind == "utf-16 csv":
        (d / "bad.csv").write_bytes("text,label\nhi,positive\nho,negative\n".encode("utf-16"))
        return d / "bad.csv", []
    if kind == "invalid utf-8 jsonl":
        (d / "bad.jsonl").write_bytes(b'{"text": "ok", "label": 0}\n{"text": "\xff\xfe broken", "label": 1}\n')
        return d / "bad.jsonl", []
    if kind == "binary garbage csv":
        (d / "bad.csv").write_bytes(bytes(range(256)) * 8)
        return d / "bad.csv", []
    if kind == "empty file":
        (d / "bad.csv").write_bytes(b"")
        return d / "bad.csv", []
    if kind == "header only":
        (d / "bad.csv").write_text("text,label\n")
        return d / "bad.csv", []
    if kind == "empty text":
        return _csv(d / "bad.csv", texts=["fine", "", "also fine"], labels=["positive", "negative", "positive"]), []
    if kind == "whitespace text":
        return _csv(d / "bad.csv", texts=["fine", "   ", "also"], labels=["positive", "negative", "positive"]), []
    if kind == "label outside label set":
        return _csv(d / "bad.csv", texts=["a", "b", "c"], labels=["positive", "neutral", "negative"]), []
    if kind == "label index out of range":
        return _csv(d / "bad.csv", texts=["a", "b", "c"], labels=[0, 1, 5]), []
    if kind == "fractional label":
        return _csv(d / "bad.csv", texts=["a", "b", "c"], labels=[0, 1, 0.5]), []
    if kind == "missing label":
        (d / "bad.csv").write_text("text,label\na,positive\nb,\nc,negative\n")
        return d / "bad.csv", []
    if kind == "duplicate ids":
        return _csv(d / "bad.csv", texts=["a", "b", "c", "d"], labels=LABELS[:4], doc_id=[10, 11, 12, 11]), \
            ["data.id_column=doc_id"]
    if kind == "non-integer id":
        return _csv(d / "bad.csv", texts=["a", "b"], labels=LABELS[:2], doc_id=["x1", "x2"]), ["data.id_column=doc_id"]
    if kind == "missing id column":
        return _csv(d / "bad.csv"), ["data.id_column=doc_id"]
    if kind == "duplicate column names":
        (d / "bad.csv").write_text("text,text,label\na,b,positive\nc,d,negative\n")
        return d / "bad.csv", []
    if kind == "missing file":
        return d / "nope.csv", []
    if kind == "unsupported suffix":
        (d / "bad.xlsx").write_bytes(b"PK\x03\x04")
        return d / "bad.xlsx", []
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind,needles",
    [
        ("truncated parquet", ["data.train", "bad.parquet", "Parquet"]),
        ("parquet with a torn footer", ["bad.parquet", "Parquet"]),
        ("corrupt parquet pages", ["bad.parquet", "Parquet"]),
        ("not parquet at all", ["bad.parquet", "Parquet"]),
        ("ragged csv", ["bad.csv", "cannot parse as CSV", "Expected 2 columns"]),
        ("truncated csv (open quote)", ["bad.csv", "CSV"]),
        ("latin-1 csv", ["bad.csv", "not valid UTF-8", "line 2", "data.encoding"]),
        ("utf-16 csv", ["bad.csv", "UTF-16", "data.encoding: utf-16"]),
        ("invalid utf-8 jsonl", ["bad.jsonl", "not valid UTF-8", "line 2"]),
        ("binary garbage csv", ["bad.csv", "UTF-8"]),
        ("empty file", ["bad.csv", "empty"]),
        ("header only", ["bad.csv", "no examples"]),
        ("empty text", ["bad.csv", "row 1", "text column 'text' is empty"]),
        ("whitespace text", ["bad.csv", "row 1", "is empty"]),
        ("label outside label set", ["bad.csv", "row 1", "'neutral'", "data.label_names"]),
        ("label index out of range", ["bad.csv", "row 2", "5", "out of range"]),
        ("fractional label", ["bad.csv", "row 2", "0.5", "not a whole number"]),
        ("missing label", ["bad.csv", "row 1", "is empty"]),
        ("duplicate ids", ["data.id_column", "bad.csv", "duplicate id 11", "rows 1 and 3"]),
        ("non-integer id", ["data.id_column", "bad.csv", "row 0", "'x1'", "not an integer"]),
        ("missing id column", ["data.id_column", "'doc_id' not found"]),
        ("duplicate column names", ["bad.csv", "duplicate column names ['text']"]),
        ("missing file", ["data.train", "nope.csv", "not found"]),
        ("unsupported suffix", ["bad.xlsx", "unsupported file type"]),
    ],
)
def test_bad_data_file(tmp_path, capsys, kind, needles):
    path, extra = _make_data(kind, tmp_path)
    out = tmp_path / "out"
    _fails(capsys, ["run", *_args(path, out, *extra)], *needles)
    assert not out.exists(), f"{kind}: output directory was created"


def test_bad_test_file_names_data_test(tmp_path, capsys):
    out = tmp_path / "out"
    bad = _make_data("ragged csv", tmp_path)[0]
    _fails(capsys, ["kernel", *_args(_csv(tmp_path / "train.csv"), out, f"data.test={bad}")], "data.test", "bad.csv")
    assert not out.exists()


def test_encodings_load_when_declared(tmp_path):
    """data.encoding reads a latin-1 or UTF-16 file exactly; a UTF-8 byte-order mark is fine without it."""
    texts = ["caf\xe9 au lait", "na\xefve cr\xe8me", "d\xe9j\xe0 vu"]
    for enc in ("latin-1", "utf-16"):
        path = tmp_path / f"{enc}.csv"
        path.write_bytes(pd.DataFrame({"text": texts, "label": [0, 1, 0]}).to_csv(index=False).encode(enc))
        s = load_splits(DataConfig(train=str(path), label_names=("negative", "positive"), encoding=enc))
        assert sorted(s.train.texts + s.test.texts) == sorted(texts)
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + "text,label\nd\xe9j\xe0 vu,0\nok,1\n".encode())
    s = load_splits(DataConfig(train=str(bom), label_names=("negative", "positive")))
    assert sorted(s.train.texts + s.test.texts) == ["d\xe9j\xe0 vu", "ok"]


def test_numeric_looking_texts_stay_text(tmp_path):
    path = tmp_path / "n.csv"
    path.write_text("text,label\n123,positive\n4.50,negative\nNA,positive\n")
    s = load_splits(DataConfig(train=str(path), label_names=("negative", "positive")))
    assert sorted(s.train.texts + s.test.texts) == ["123", "4.50", "NA"]


def test_duplicates_are_kept_and_logged(tmp_path, caplog):
    """Repeated rows are separate training points (ids = row numbers); a warning counts them."""
    texts = ["same text"] * 3 + ["other", "more", "again"]
    labels = ["positive", "positive", "negative", "negative", "positive", "negative"]
    with caplog.at_level(logging.WARNING, logger="freeshap_ray.data.splits"):
        path = _csv(tmp_path / "d.csv", texts, labels)
        s = load_splits(DataConfig(train=str(path), label_names=("negative", "positive"), test_fraction=0.2))
    ids = np.concatenate([s.train.ids, s.test.ids])
    assert sorted(ids.tolist()) == list(range(6))
    assert "repeat an earlier one" in caplog.text or "also occur in the training data" in caplog.text


def test_id_column_values_become_ids(tmp_path):
    path = _csv(tmp_path / "d.csv", texts=TEXTS, labels=LABELS, doc_id=[100 + 7 * i for i in range(len(TEXTS))])
    s = load_splits(DataConfig(train=str(path), label_names=("negative", "positive"), id_column="doc_id"))
    for ex in (s.train, s.test):
        for text, i in zip(ex.texts, ex.ids):
            assert TEXTS.index(text) * 7 + 100 == i


def test_in_memory_table_index_is_ignored():
    """A pandas index (even with duplicates) is not an id: ids are row positions."""
    df = pd.DataFrame({"text": TEXTS[:4], "label": LABELS[:4]}, index=[5, 5, 7, 7])
    s = load_splits(DataConfig(label_names=("negative", "positive")), train=df)
    assert sorted(np.concatenate([s.train.ids, s.test.ids]).tolist()) == [0, 1, 2, 3]


# ----------------------------------------------------------------------------------------------
# Model directories


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return resolve_model_path("tiny:llama", cache_dir=str(tmp_path_factory.mktemp("tiny-cache")))


def _model_dir(kind: str, base: Path, d: Path) -> Path:
    m = d / "model"
    if kind == "missing dir":
        return d / "no-such-model"
    if kind == "not a model dir":
        m.mkdir()
        (m / "weights.txt").write_text("x")
        return m
    if kind == "non-gguf file":
        (d / "model.bin").write_bytes(b"\x00" * 64)
        return d / "model.bin"
    if kind == "fake gguf":
        (d / "model.gguf").write_bytes(b"not really a gguf file")
        return d / "model.gguf"
    shutil.copytree(base, m)
    if kind == "bad config.json":
        (m / "config.json").write_text("{not json")
    elif kind == "no weights":
        (m / "model.safetensors").unlink()
    elif kind == "truncated safetensors":
        data = (m / "model.safetensors").read_bytes()
        (m / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif kind == "weights of another config":
        cfg = json.loads((m / "config.json").read_text())
        (m / "config.json").write_text(json.dumps({**cfg, "vocab_size": 20}))
    elif kind == "no tokenizer":
        for f in m.iterdir():
            if f.name.startswith("tokenizer"):
                f.unlink()
    elif kind == "tokenizer of another model":
        from transformers import LlamaConfig, LlamaForCausalLM

        shutil.rmtree(m)
        torch.manual_seed(0)
        small = LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1)
        LlamaForCausalLM(small).save_pretrained(m)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(base / f, m / f)
    elif kind == "custom code (auto_map)":
        sentinel = d / "EXECUTED"
        code = f"open({str(sentinel)!r}, 'w').write('remote code ran')\n"
        (m / "modeling_evil.py").write_text(code)
        (m / "configuration_evil.py").write_text(code)
        cfg = json.loads((m / "config.json").read_text())
        cfg["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                           "AutoModelForCausalLM": "modeling_evil.EvilLM"}
        (m / "config.json").write_text(json.dumps(cfg))
    elif kind == "custom tokenizer code":
        tc = json.loads((m / "tokenizer_config.json").read_text())
        tc["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
        (m / "tokenizer_config.json").write_text(json.dumps(tc))
    elif kind == "pickle weights only":
        from safetensors.torch import load_file

        torch.save(load_file(str(m / "model.safetensors")), m / "pytorch_model.bin")
        (m / "model.safetensors").unlink()
    else:
        raise AssertionError(kind)
    return m


@pytest.mark.parametrize(
    "kind,extra,needles",
    [
        ("missing dir", [], ["model.path", "no-such-model", "not found"]),
        ("not a model dir", [], ["model.path", "no config.json"]),
        ("non-gguf file", [], ["model.path", "model.bin", "not a .gguf file"]),
        ("fake gguf", [], ["model.path", "model.gguf", "GGUF magic"]),
        ("bad config.json", [], ["model.path", "config.json", "JSON"]),
        ("no weights", [], ["model.path", "no weights file"]),
        ("truncated safetensors", [], ["model.path", "model.safetensors", "SafetensorError"]),
        ("weights of another config", [], ["model.path", "do not match its config.json", "[141, 32]", "[20, 32]"]),
        ("no tokenizer", [], ["model.path", "tokenizer", "none found"]),
        ("tokenizer of another model", [], ["model.path", "tokenizer.json", "141 tokens", "20 rows"]),
        ("custom code (auto_map)", [], ["model.path", "config.json", "custom code", "model.trust_remote_code: true"]),
        ("custom tokenizer code", [], ["tokenizer_config.json", "custom code", "model.trust_remote_code"]),
        ("pickle weights only", [], ["model.path", "pytorch_model.bin", "pickle", "model.allow_pickle: true"]),
    ],
)
def test_bad_model_dir(tmp_path, capsys, tiny_dir, kind, extra, needles):
    path = _model_dir(kind, tiny_dir, tmp_path)
    out = tmp_path / "out"
    _fails(capsys, ["run", *_args(_csv(tmp_path / "train.csv"), out, *extra, f"model.path={path}")], *needles)
    assert not out.exists(), f"{kind}: output directory was created"
    assert not (tmp_path / "EXECUTED").exists(), "remote code was executed"


def test_flags_allow_what_they_name(tmp_path, tiny_dir):
    """allow_pickle loads a pickle-only directory; trust_remote_code lifts the auto_map refusal."""
    pickled = _model_dir("pickle weights only", tiny_dir, tmp_path / "p")
    with pytest.raises(ModelError, match="allow_pickle"):
        load_lm(pickled)
    ref = load_lm(tiny_dir).model.lm_head.weight
    assert torch.equal(load_lm(pickled, allow_pickle=True).model.lm_head.weight, ref)
    custom = _model_dir("custom code (auto_map)", tiny_dir, tmp_path / "c")
    with pytest.raises(ModelError, match="trust_remote_code"):
        check_model_dir(custom)
    assert check_model_dir(custom, trust_remote_code=True) is True  # checked, not executed
    assert not (tmp_path / "c" / "EXECUTED").exists()
    cfg = load_config(None, ["model.allow_pickle=true", "model.trust_remote_code=true"])
    assert cfg.model.allow_pickle and cfg.model.trust_remote_code
    assert not load_config(None).model.allow_pickle and not load_config(None).model.trust_remote_code
    from freeshap_ray.config import reagent_config_from_dict

    rc = reagent_config_from_dict({"prompts": {"path": "p.txt"}})
    assert not rc.model.allow_pickle and not rc.model.trust_remote_code
    assert reagent_config_from_dict({"prompts": {"path": "p.txt"}, "model": {"allow_pickle": True}}).model.allow_pickle


@pytest.mark.parametrize(
    "extra,needles",
    [
        (["model.max_length=1000"], ["model.max_length", "256", "max_position_embeddings"]),
        (["model.max_length=4", "model.template=the movie was {text} and the review sentiment was"],
         ["model.max_length", "template"]),
        (["model.path=tiny:gpt9"], ["model.path", "tiny:gpt9"]),
        (["model.path=package:not_a_model_package"], ["model.path", "not_a_model_package"]),
    ],
)
def test_model_settings_checked_before_ray(tmp_path, capsys, extra, needles):
    out = tmp_path / "out"
    _fails(capsys, ["kernel", *_args(_csv(tmp_path / "train.csv"), out, *extra)], *needles)
    assert not out.exists()


def test_long_text_truncated_from_the_end_template_kept(tiny_dir):
    """Texts longer than model.max_length lose their END; the template (and read position) stay."""
    cfg = ModelConfig(path="tiny:llama", template="{text} sentiment :", label_words=("bad", "good"), max_length=16)
    clf = load_classifier(tiny_dir, cfg)
    long = " ".join(["good", "movie"] * 500)
    b = clf.encode([long, "dull"])
    ids = b.input_ids[0][b.attention_mask[0].bool()].tolist()
    assert len(ids) == 16
    tail = clf.tokenizer(" sentiment :", add_special_tokens=False)["input_ids"]
    assert ids[-len(tail):] == tail  # template suffix kept, the last position is read
    assert clf.tokenizer.decode(ids[1:-len(tail)]).split() == ["good", "movie"] * 6 + ["good"]  # the text's start
    assert int(b.read_pos[0]) == 15


# ----------------------------------------------------------------------------------------------
# Supplied kernels: the Python API and the shapley stage reading OUT/kernel


@pytest.mark.parametrize(
    "case,needle",
    [
        ("nan", "k_train: 1 non-finite"),
        ("inf test", "k_test_train: 1 non-finite"),
        ("asymmetric", "k_train: not symmetric"),
        ("not square", "k_train: expected a non-empty square"),
        ("test columns", "k_test_train: expected shape (m, 6)"),
        ("3-d", "k_train: expected 2 dims"),
        ("labels", "y_train: expected shape (6,)"),
    ],
)
def test_api_rejects_bad_kernels(case, needle):
    import freeshap_ray

    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 4))
    k, kt = a @ a.T, rng.normal(size=(3, 6))
    y, yt = np.array([0, 1, 0, 1, 0, 1]), np.array([0, 1, 1])
    if case == "nan":
        k[2, 3] = np.nan
    elif case == "inf test":
        kt[1, 1] = np.inf
    elif case == "asymmetric":
        k[0, 5] += 1.0
    elif case == "not square":
        k = k[:, :5]
    elif case == "test columns":
        kt = kt[:, :4]
    elif case == "3-d":
        k = k[None]
    elif case == "labels":
        y = y[:4]
    with pytest.raises(KernelError) as err:
        freeshap_ray.shapley(k, kt, y, yt, n_permutations=2)
    assert needle in str(err.value)


def _write_kernel(out: Path, tamper: str | None = None) -> None:
    """A small valid first-logit kernel output, written with the project's writers (no Ray)."""
    from freeshap_ray.io import KernelStore, Layout, write_examples, write_kernel_tile

    layout = Layout.of(out)
    rng = np.random.default_rng(1)
    a = rng.normal(size=(6, 5))
    k, kt = a @ a.T, rng.normal(size=(3, 5)) @ a.T
    write_examples(layout, "train", TEXTS[:6], np.array([0, 1, 0, 1, 0, 1]), np.arange(6), ("negative", "positive"))
    write_examples(layout, "test", TEXTS[6:9], np.array([1, 0, 1]), np.arange(6, 9), ("negative", "positive"))
    tiles = {"train_train": [], "test_train": []}
    for r0, c0 in ((0, 0), (3, 0), (3, 3)):
        block = k[r0:r0 + 3, c0:c0 + 3].copy()
        if tamper == "nan" and (r0, c0) == (3, 0):
            block[1, 1] = np.nan
        if tamper == "asymmetric" and (r0, c0) == (3, 3):
            block[0, 2] += 5.0
        if tamper == "wide" and (r0, c0) == (3, 3):
            block = np.hstack([block, block])
        name = f"tile-r{r0:06d}-c{c0:06d}"
        write_kernel_tile(layout, "train_train", name, r0, c0, block)
        tiles["train_train"].append(name)
    for c0 in (0, 3):
        block = kt[:, c0:c0 + 3].copy()
        if tamper == "inf" and c0 == 3:
            block[2, 0] = np.inf
        name = f"tile-r000000-c{c0:06d}"
        write_kernel_tile(layout, "test_train", name, 0, c0, block)
        tiles["test_train"].append(name)
    KernelStore(layout).finish({"kind": "first_logit", "n_train": 6, "n_test": 3, "n_classes": 2, "tiles": tiles})
    if tamper == "missing tile":
        layout.kernel_tile("test_train", "tile-r000000-c000003").unlink()
    if tamper == "corrupt tile":
        path = layout.kernel_tile("train_train", "tile-r000003-c000000")
        path.write_bytes(path.read_bytes()[:40])
    if tamper == "corrupt manifest":
        layout.kernel_manifest.write_text('{"kind": "first_logit", "n_tr')


@pytest.mark.parametrize(
    "tamper,needles",
    [
        ("nan", ["train_train/tile-r000003-c000000.parquet", "1 non-finite"]),
        ("inf", ["test_train/tile-r000000-c000003.parquet", "non-finite"]),
        ("asymmetric", ["train_train/tile-r000003-c000003.parquet", "not symmetric"]),
        ("wide", ["train_train/tile-r000003-c000003.parquet", "does not fit"]),
        ("missing tile", ["test_train/tile-r000000-c000003.parquet", "missing or unreadable"]),
        ("corrupt tile", ["train_train/tile-r000003-c000000.parquet", "unreadable"]),
        ("corrupt manifest", ["kernel/manifest.json", "unreadable or incomplete"]),
    ],
)
def test_shapley_stage_rejects_bad_stored_kernel(tmp_path, capsys, tamper, needles):
    out = tmp_path / "out"
    _write_kernel(out, tamper)
    before = _snapshot(out)
    _fails(capsys, ["shapley", *_args("unused.csv", out)], *needles)
    assert _snapshot(out) == before and not (out / "values.parquet").exists()


def test_stored_kernel_untampered_loads(tmp_path):
    from freeshap_ray import load_kernel

    _write_kernel(tmp_path / "out")
    k = load_kernel(tmp_path / "out")["train_train"]
    np.testing.assert_allclose(k, k.T)


def test_output_path_is_a_file(tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("not a directory")
    _fails(capsys, ["run", *_args(_csv(tmp_path / "train.csv"), out)], "output", "not a directory")
    assert out.read_text() == "not a directory"


# ----------------------------------------------------------------------------------------------
# A finished run on Ray: long texts are truncated, finished outputs are never overwritten


@pytest.fixture(scope="module")
def finished_run(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-run")
    texts = TEXTS + [" ".join(["a wonderful film"] * 400), TEXTS[0]]  # far past max_length; a repeated row
    labels = LABELS + ["positive", "positive"]
    csv = _csv(root / "train.csv", texts, labels)
    out = root / "out"
    assert main(["run", *_args(csv, out, "model.max_length=24")]) == 0
    return csv, out, texts


def test_run_with_long_and_repeated_texts(finished_run):
    _, out, texts = finished_run
    stored = pq.read_table(out / "train.parquet").column("text").to_pylist()
    stored += pq.read_table(out / "test.parquet").column("text").to_pylist()
    assert sorted(stored) == sorted(texts)  # texts are stored whole; only the model input is truncated
    values = pq.read_table(out / "values.parquet").to_pandas()
    assert np.isfinite(values["value"]).all()


@pytest.mark.parametrize(
    "command,extra,needles",
    [
        ("run", ["shapley.n_permutations=3"], ["values.parquet", "--overwrite"]),
        ("run", ["model.template={text} review :"], ["values.parquet", "--overwrite"]),
        ("kernel", ["kernel.block_size=2"], ["values.parquet", "--overwrite"]),
        ("shapley", ["shapley.seed=9"], ["values.parquet", "--overwrite"]),
        ("run", ["data.label_names=[negative, neutral]"], ["output", "values.parquet"]),
    ],
)
def test_finished_outputs_are_not_overwritten(finished_run, capsys, command, extra, needles):
    csv, out, _ = finished_run
    before = _snapshot(out)
    _fails(capsys, [command, *_args(csv, out, "model.max_length=24", *extra)], *needles)
    assert _snapshot(out) == before


def test_bad_input_leaves_finished_run_unchanged(finished_run, tmp_path, capsys):
    """Even with --overwrite, input that fails validation replaces nothing."""
    csv, out, _ = finished_run
    before = _snapshot(out)
    bad = _make_data("truncated parquet", tmp_path)[0]
    _fails(capsys, ["run", *_args(bad, out, "model.max_length=24"), "--overwrite"], "bad.parquet")
    _fails(capsys, ["run", *_args(csv, out, "model.path=/no/such/model"), "--overwrite"], "model.path")
    _fails(capsys, ["run", *_args(csv, out, "model.max_length=9999"), "--overwrite"], "model.max_length")
    assert _snapshot(out) == before
