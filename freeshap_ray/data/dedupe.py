"""``data.dedupe``: repeated training texts and test texts that also occur in the training data.

Texts are compared by a key: the text itself (``exact``) or its normalised form (``normalized``: every
URL — ``http://…``, ``https://…``, ``www.…`` not inside a word, up to the next whitespace — replaced by
one placeholder, then case-folded, whitespace runs collapsed to one space, leading/trailing whitespace
removed). Of the texts sharing a key the first (in source order) is kept; the others are dropped and
recorded with the row they repeat. A group whose texts carry different labels is a *conflicting
duplicate*: the first occurrence and its label are kept, the whole group is recorded. Pure functions.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["MODES", "URL_TOKEN", "Duplicates", "conflict_groups", "dedupe_keys", "first_occurrences",
           "normalize_text", "occurrences_in"]

MODES = ("none", "exact", "normalized")
URL_TOKEN = "<url>"
_URL = re.compile(r"(?:https?://|\bwww\.)\S+", re.IGNORECASE)
_SPACE = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Case-, whitespace- and URL-insensitive form of ``text`` (the ``normalized`` key)."""
    return _SPACE.sub(" ", _URL.sub(f" {URL_TOKEN} ", text).casefold()).strip()


def dedupe_keys(texts: Iterable[str], mode: str) -> list[str]:
    """Comparison key of each text under ``mode`` (``exact`` or ``normalized``)."""
    if mode == "exact":
        return list(texts)
    if mode == "normalized":
        return [normalize_text(t) for t in texts]
    raise ValueError(f"mode: must be 'exact' or 'normalized', got {mode!r}")


def first_occurrences(keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep the first position of every key.

    Returns:
        ``(kept, dropped, first)``: int64 positions kept ``(k,)`` and dropped ``(d,)``, both ascending,
        and for each dropped position the kept position with the same key ``(d,)``.
    """
    seen: dict[str, int] = {}
    kept, dropped, first = [], [], []
    for pos, key in enumerate(keys):
        if key in seen:
            dropped.append(pos)
            first.append(seen[key])
        else:
            seen[key] = pos
            kept.append(pos)
    return _ints(kept), _ints(dropped), _ints(first)


def occurrences_in(keys: Sequence[str], reference: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Drop the positions of ``keys`` whose key occurs in ``reference``.

    Returns:
        ``(kept, dropped, match)``: int64 positions of ``keys`` kept ``(k,)`` and dropped ``(d,)`` and,
        for each dropped one, the first position in ``reference`` with the same key ``(d,)``.
    """
    where: dict[str, int] = {}
    for pos, key in enumerate(reference):
        where.setdefault(key, pos)
    kept, dropped, match = [], [], []
    for pos, key in enumerate(keys):
        if key in where:
            dropped.append(pos)
            match.append(where[key])
        else:
            kept.append(pos)
    return _ints(kept), _ints(dropped), _ints(match)


def _ints(xs: list[int]) -> np.ndarray:
    return np.asarray(xs, dtype=np.int64)


@dataclass(frozen=True)
class Duplicates:
    """The examples ``data.dedupe`` dropped, one entry per dropped example (``d`` of them).

    Attributes:
        mode: ``exact`` or ``normalized``.
        split: ``(d,)`` ``"train"`` (a row of ``data.train``) or ``"test"`` (a row of ``data.test``).
        reason: ``(d,)`` ``"repeat"`` (repeats an earlier training text) or ``"test_in_train"``.
        ids, texts, labels: ``(d,)`` the dropped examples (ids as in ``Examples.ids``).
        kept_ids, kept_texts, kept_labels: ``(d,)`` the kept ``data.train`` row each one repeats.
    """

    mode: str
    split: tuple[str, ...]
    reason: tuple[str, ...]
    ids: np.ndarray
    texts: tuple[str, ...]
    labels: np.ndarray
    kept_ids: np.ndarray
    kept_texts: tuple[str, ...]
    kept_labels: np.ndarray

    @classmethod
    def empty(cls, mode: str) -> Duplicates:
        """No dropped examples."""
        none = np.zeros(0, np.int64)
        return cls(mode, (), (), none, (), none, none, (), none)

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def conflict(self) -> np.ndarray:
        """``(d,)`` bool: the dropped example's label differs from the kept one's."""
        return np.asarray(self.labels) != np.asarray(self.kept_labels)

    def __add__(self, other: Duplicates) -> Duplicates:
        if other.mode != self.mode:
            raise ValueError(f"other: mode {other.mode!r} differs from {self.mode!r}")
        cat = np.concatenate
        return Duplicates(
            self.mode, self.split + other.split, self.reason + other.reason, cat([self.ids, other.ids]),
            self.texts + other.texts, cat([self.labels, other.labels]), cat([self.kept_ids, other.kept_ids]),
            self.kept_texts + other.kept_texts, cat([self.kept_labels, other.kept_labels]),
        )

    def counts(self) -> dict[str, Any]:
        """``{"mode", "train_dropped", "test_dropped", "conflicts"}``; conflicts = conflicting groups."""
        kept = np.asarray(self.kept_ids)[self.conflict]
        return {"mode": self.mode, "train_dropped": sum(r == "repeat" for r in self.reason),
                "test_dropped": sum(r == "test_in_train" for r in self.reason),
                "conflicts": int(np.unique(kept).size)}


def conflict_groups(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Groups of duplicates whose labels differ, from dropped-example records.

    Args:
        rows: one mapping per dropped example with keys ``split``, ``id``, ``label_name``, ``kept_id``,
            ``kept_text``, ``kept_label_name`` (rows of ``duplicates.parquet``).

    Returns:
        One ``{"text", "ids", "labels", "splits"}`` per kept training row whose group (itself first, then
        its dropped copies in order) holds more than one label, ordered by the kept row's id.
    """
    groups: dict[int, dict[str, Any]] = {}
    for r in rows:
        g = groups.setdefault(int(r["kept_id"]), {"text": r["kept_text"], "ids": [int(r["kept_id"])],
                                                  "labels": [r["kept_label_name"]], "splits": ["train"]})
        g["ids"].append(int(r["id"]))
        g["labels"].append(r["label_name"])
        g["splits"].append(r["split"])
    return [g for _, g in sorted(groups.items()) if len(set(g["labels"])) > 1]
