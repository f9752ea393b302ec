"""Read the prompts file of a ``reagent`` job (.txt, .jsonl/.json, .csv, .parquet)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..config import ReagentPromptsConfig
from ..errors import DataError

__all__ = ["PromptSpec", "read_prompts"]


@dataclass(frozen=True)
class PromptSpec:
    prompt_id: int
    text: str
    target: str | None = None


def _rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [{"prompt": line} for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if suffix in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8")
        if suffix == ".json":
            data = json.loads(text)
            if not isinstance(data, list):
                raise DataError(f"prompts.path: {path}: a .json file must hold a list of objects")
            return data
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataError(f"prompts.path: {path}: line {n} is not JSON: {err}") from err
        return rows
    if suffix in (".csv", ".parquet"):
        import pandas as pd

        df = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
        return df.to_dict(orient="records")
    raise DataError(f"prompts.path: {path}: unsupported file type {suffix!r} (use .txt, .jsonl, .json, .csv or .parquet)")


def read_prompts(cfg: ReagentPromptsConfig) -> list[PromptSpec]:
    """Prompts (and optional targets) named by ``prompts.*``; errors name the key and the row."""
    if not cfg.path:
        raise DataError("prompts.path: required")
    path = Path(cfg.path).expanduser()
    if not path.is_file():
        raise DataError(f"prompts.path: {str(path)!r} not found")
    rows = _rows(path)
    text_col = "prompt" if path.suffix.lower() == ".txt" else cfg.text_column
    out, seen = [], set()
    for n, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"prompts.path: row {n} is not an object")
        if text_col not in row:
            raise DataError(f"prompts.text_column: column {text_col!r} missing in row {n} of {path} (has {sorted(row)})")
        text = row[text_col]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"prompts.text_column: row {n} of {path}: empty or non-text prompt {text!r}")
        target = None
        if cfg.target_column:
            target = row.get(cfg.target_column)
            if isinstance(target, float) and target != target:  # NaN from CSV/Parquet: no target
                target = None
            if target is not None and not isinstance(target, str):
                raise DataError(f"prompts.target_column: row {n} of {path}: target {target!r} is not text")
            target = target or None  # missing or empty: generate greedily
        pid = n
        if cfg.id_column:
            if cfg.id_column not in row:
                raise DataError(f"prompts.id_column: column {cfg.id_column!r} missing in row {n} of {path}")
            try:
                pid = int(row[cfg.id_column])
            except (TypeError, ValueError) as err:
                raise DataError(f"prompts.id_column: row {n}: id {row[cfg.id_column]!r} is not an integer") from err
            if pid < 0:
                raise DataError(f"prompts.id_column: row {n}: id {pid} must be >= 0")
        if pid in seen:
            raise DataError(f"prompts.id_column: duplicate prompt id {pid} (row {n})")
        seen.add(pid)
        out.append(PromptSpec(pid, text, target))
        if cfg.max_prompts is not None and len(out) >= cfg.max_prompts:
            break
    if not out:
        raise DataError(f"prompts.path: {path} holds no prompt")
    return out
