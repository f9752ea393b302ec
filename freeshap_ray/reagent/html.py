"""Self-contained HTML heat map of token attributions (no external JS/CSS)."""

from __future__ import annotations

import html as _html

__all__ = ["heatmap_html"]

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h2{font-size:1.1em;margin:1.4em 0 .4em}
.t{margin:.35em 0;line-height:2}
.tok{padding:.15em .2em;margin:0 1px;border-radius:3px;white-space:pre;font-family:ui-monospace,monospace}
.sp{color:#888;border:1px dashed #bbb}
.tgt{outline:2px solid #1565c0;font-weight:bold}
.meta{color:#666;font-size:.85em;margin-left:.6em}
.nc{color:#b71c1c}
"""


def _rows(table):
    if hasattr(table, "to_pylist"):
        return table.to_pylist()
    if hasattr(table, "to_dict"):
        return table.to_dict(orient="records")
    return list(table)


def heatmap_html(attributions_table, *, title: str = "Token attributions", max_targets: int = 500) -> str:
    """One line per (method, prompt, target): the source tokens shaded by score (normalised by the
    target's largest score), then the target token. Accepts a pyarrow Table, a pandas DataFrame or a
    list of row dicts with the ``attributions.parquet`` columns."""
    groups: dict[tuple, list[dict]] = {}
    for r in _rows(attributions_table):
        groups.setdefault((r["method"], r["prompt_id"], r["target_pos"]), []).append(r)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{_html.escape(title)}</h1>"]
    current = None
    for n, key in enumerate(sorted(groups)):
        if n >= max_targets:
            parts.append(f"<p>… {len(groups) - max_targets} more targets not shown</p>")
            break
        method, prompt_id, target_pos = key
        rows = sorted(groups[key], key=lambda r: r["source_pos"])
        if (method, prompt_id) != current:
            current = (method, prompt_id)
            parts.append(f"<h2>{_html.escape(str(method))} · prompt {prompt_id}</h2>")
        top = max((r["score"] for r in rows), default=0.0) or 1.0
        spans = []
        for r in rows:
            tok = _html.escape(str(r["source_token"]))
            if r.get("is_special"):
                spans.append(f"<span class='tok sp' title='special'>{tok}</span>")
                continue
            a = max(0.0, min(1.0, float(r["score"]) / top))
            color = f"rgba(229,57,53,{a:.3f})"
            spans.append(f"<span class='tok' style='background:{color}' title='pos {r['source_pos']}: "
                         f"{float(r['score']):.4f}'>{tok}</span>")
        first = rows[0] if rows else {}
        tgt = _html.escape(str(first.get("target_token", "")))
        conv = "" if first.get("converged", True) else " <span class='nc'>(not converged)</span>"
        note = f" {_html.escape(first['note'])}" if first.get("note") else ""
        parts.append(f"<div class='t'>{''.join(spans)} → <span class='tok tgt'>{tgt}</span>"
                     f"<span class='meta'>target pos {target_pos}{note}</span>{conv}</div>")
    parts.append("</body></html>")
    return "\n".join(parts)
