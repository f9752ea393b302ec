"""New texts to explain, from a file: ``.txt`` (one text per line) or any table :func:`load_table` reads."""

from __future__ import annotations

import codecs
from pathlib import Path

from ..errors import DataError
from .tables import load_table

__all__ = ["load_texts"]


def _read_lines(path: Path, field: str, encoding: str | None) -> list[str]:
    raw = path.read_bytes()
    codec = encoding or "utf-8"
    if codec.replace("_", "-").lower() in ("utf-8", "utf8") and raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    try:
        text = raw.decode(codec)
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"{field}: {str(path)!r} is not valid {codec} (line {line}: {err.reason}); re-save it as "
                        "UTF-8") from err
    return [t for t in text.splitlines() if t.strip()]


def load_texts(path: str | Path, *, text_column: str = "text", encoding: str | None = None,
               field: str = "--texts") -> list[str]:
    """The texts in ``path``: a ``.txt`` file holds one text per line (blank lines skipped); a CSV / TSV /
    JSONL / Parquet file (or a saved ``datasets`` directory) holds them in ``text_column``.

    Raises:
        DataError: a missing, unreadable or badly encoded file, a missing column, or an empty / null text
            (naming the file and the row), or no text at all.
    """
    p = Path(path).expanduser()
    if p.suffix.lower() == ".txt":
        if not p.is_file():
            raise DataError(f"{field}: {str(p)!r} not found")
        texts = _read_lines(p, field, encoding)
    else:
        table = load_table(p, field=field, encoding=encoding, text_column=text_column)
        if text_column not in table.column_names:
            raise DataError(f"{field}: {str(p)!r} has no column {text_column!r} (columns: {table.column_names}); "
                            "give --text-column")
        texts = table.column(text_column).to_pylist()
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise DataError(f"{field}: {str(p)!r} row {i}: empty or missing text in column {text_column!r}")
    if not texts:
        raise DataError(f"{field}: {str(p)!r} holds no texts")
    return texts
