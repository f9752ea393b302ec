"""Shell commands quoted in the docs as argv lists, so tests run or check exactly what the docs say."""

from __future__ import annotations

import re
import shlex
from pathlib import Path


def doc_command(path: str | Path, start: str) -> list[str]:
    """argv of the first command in ``path`` that begins with ``start`` (or ``DIR/start``): Markdown or
    ``#``-comment lines, backslash continuations joined, a trailing ``# comment`` dropped, quotes removed,
    nothing expanded."""
    lines = [ln.strip().lstrip("#").strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()]
    pattern = re.compile(r"(\S*/)?" + re.escape(start) + r"(\s|$)")
    for i, line in enumerate(lines):
        if not pattern.match(line):
            continue
        cmd = line
        while cmd.endswith("\\"):
            i += 1
            cmd = cmd[:-1] + " " + lines[i]
        return shlex.split(cmd, comments=True)
    raise AssertionError(f"{path}: no command starting with {start!r}")
