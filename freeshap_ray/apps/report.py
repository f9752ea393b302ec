"""``freeshap-ray report OUT_DIR``: one self-contained HTML page about a run.

Sections (each only when its inputs exist): run metadata (``manifest.json``), value distribution per
class, wrong-label detection curves (``clean`` with noise injection), removal / selection curves
with baselines, sign robustness, suspected wrong labels, conflicting duplicates (``data.dedupe``: same text,
different labels), most harmful and most helpful examples, and explanations of new texts (``explain``: per text
the prediction and its most helpful / harmful training examples with bars; a training label that the
surrogate fitted on all other examples contradicts is flagged as a suspect label).

Figures are matplotlib PNGs embedded as base64 ``data:`` URIs in ``<img>`` elements with stable ids
(``fig-values``, ``fig-detection``, ``fig-curves``, ``fig-sign``); tables have ids ``tbl-*``. The page
loads nothing from outside. A small inline script marks ``<body>`` with ``data-figures-loaded`` (the
number of figures the browser decoded) and ``data-figures-ok`` once the page has loaded, so a headless
browser can check that every figure rendered. Only the value vector (and a few per-point numeric
columns) is read whole; example texts are fetched for the listed rows only.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from ..data.dedupe import conflict_groups
from ..errors import OutputError
from ..io import Layout, read_duplicates
from ..io.apps_store import read_curves, read_detection, read_summary
from ..io.atomic import atomic_path
from ..io.explanations import read_explanations

__all__ = ["FIGURE_IDS", "build_report", "write_report"]

FIGURE_IDS = ("fig-values", "fig-detection", "fig-curves", "fig-sign", "fig-stability")

_METHOD_LABELS = {"freeshap": "FreeShap", "random": "random", "loo": "leave-one-out", "influence": "kernel influence",
                  "tracin": "TracIn (init)", "loo_margin": "LOO margin"}
_METHOD_COLORS = {"freeshap": "C0", "loo": "C1", "influence": "C2", "tracin": "C3", "loo_margin": "C4",
                  "random": "grey"}
_CURVE_TITLES = {"remove_high": "remove highest-valued first", "remove_low": "remove lowest-valued first",
                 "keep_top": "keep top-valued (selection)"}

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2rem auto;max-width:1100px;color:#222;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.25rem;border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
.sub{color:#666;margin-top:0}figure{margin:1rem 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:.9rem}table{border-collapse:collapse;font-size:.9rem;margin:.5rem 0;width:100%}
th,td{border:1px solid #ddd;padding:.3rem .5rem;text-align:left;vertical-align:top}th{background:#f5f5f5}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}.neg{color:#b00020}.pos{color:#0a6b2d}
.note{background:#fafafa;border-left:3px solid #ccc;padding:.4rem .8rem;color:#555}
table.meta td:first-child{width:16rem;color:#555}
.expl{margin:1rem 0 1.6rem}
.expl blockquote{margin:.4rem 0;padding:.4rem .8rem;background:#f7f7f7;border-left:3px solid #888}
td.barcell{width:9rem}.bar{display:inline-block;height:.8em;vertical-align:middle;background:#0a6b2d}
.bar.neg{background:#b00020}tr.suspect td{background:#fff3cd}.badge{font-size:.75rem;background:#b00020;color:#fff;
border-radius:3px;padding:0 .3rem;margin-left:.3rem;white-space:nowrap}
"""

_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('figure img[id^="fig-"]');
  var ok = 0;
  imgs.forEach(function (im) { if (im.complete && im.naturalWidth > 0) { ok += 1; im.setAttribute('data-rendered', 'true'); } });
  document.body.setAttribute('data-figures-loaded', String(ok));
  document.body.setAttribute('data-figures-ok', String(ok === imgs.length && imgs.length > 0));
});
"""


# --------------------------------------------------------------------------------------------------
# Data access (bounded memory)


class _Run:
    def __init__(self, out_dir: Path):
        self.root = Path(out_dir)
        self.layout = Layout.of(self.root)
        if not self.root.is_dir():
            raise OutputError(f"{self.root}: not a directory (give the `output` directory of a run)")
        if not self.layout.values.is_file():
            raise OutputError(f"{self.layout.values}: missing; run `freeshap-ray run CONFIG` before `report`")
        try:
            schema = pq.read_schema(self.layout.values)
        except Exception as err:  # noqa: BLE001
            raise OutputError(f"{self.layout.values}: not a readable Parquet file ({err})") from err
        need = ["index", "label", "label_name", "value", "stderr"]
        missing = [c for c in need if c not in schema.names]
        if missing:
            raise OutputError(f"{self.layout.values}: missing columns {missing}")
        cols = need[:2] + need[3:] + (["sign_agreement"] if "sign_agreement" in schema.names else [])
        t = pq.read_table(self.layout.values, columns=cols)
        self.values = t.column("value").to_numpy().astype(np.float64)
        self.stderr = t.column("stderr").to_numpy().astype(np.float64)
        self.labels = t.column("label").to_numpy().astype(np.int64)
        self.sign = t.column("sign_agreement").to_numpy().astype(np.float64) if "sign_agreement" in cols else None
        self.manifest: dict[str, Any] = {}
        if self.layout.manifest.is_file():
            try:
                self.manifest = json.loads(self.layout.manifest.read_text())
            except json.JSONDecodeError as err:
                raise OutputError(f"{self.layout.manifest}: not valid JSON ({err})") from err
        names = self.manifest.get("config", {}).get("data", {}).get("label_names")
        if not names:  # fall back to the names stored with the values
            pairs = pq.read_table(self.layout.values, columns=["label", "label_name"]).group_by(["label", "label_name"]).aggregate([])
            lab = dict(zip(pairs.column("label").to_pylist(), pairs.column("label_name").to_pylist()))
            names = [lab.get(i, str(i)) for i in range(int(self.labels.max()) + 1)]
        self.label_names = list(names)
        self.summary = read_summary(self.root)

    @property
    def n(self) -> int:
        return int(self.values.size)

    @property
    def n_test(self) -> int | str:
        path = self.layout.examples("test")
        return pq.ParquetFile(path).metadata.num_rows if path.is_file() else "?"

    def rows(self, indices: np.ndarray) -> list[dict[str, Any]]:
        """values.parquet rows (text included) of ``indices``, in that order."""
        if len(indices) == 0:
            return []
        ds = pads.dataset(str(self.layout.values), format="parquet")
        return ds.take(pa.array(np.asarray(indices, dtype=np.int64)),
                       columns=["index", "text", "label_name", "value", "stderr"]).to_pylist()

    def predicted_names(self, indices: np.ndarray) -> dict[int, str | None]:
        """LOO-predicted label names of ``indices`` from suspects.parquet (empty if absent)."""
        if not self.layout.suspects.is_file() or len(indices) == 0:
            return {}
        ds = pads.dataset(str(self.layout.suspects), format="parquet")
        want = pa.array(np.asarray(indices, dtype=np.int64))
        t = ds.to_table(columns=["index", "predicted_label_name"], filter=pc.field("index").isin(want))
        return dict(zip(t.column("index").to_pylist(), t.column("predicted_label_name").to_pylist()))

    def suspected_mislabels(self, k: int) -> tuple[list[dict[str, Any]], int]:
        """First ``k`` suspects whose LOO prediction disagrees with the label (streamed), and their total."""
        if not self.layout.suspects.is_file():
            return [], 0
        pf = pq.ParquetFile(self.layout.suspects)
        out: list[dict[str, Any]] = []
        total = 0
        for batch in pf.iter_batches(batch_size=8192, columns=["rank", "index", "text", "label_name",
                                                             "predicted_label", "label", "predicted_label_name",
                                                             "value", "stderr", "loo_margin"]):
            pred, lab = batch.column("predicted_label"), batch.column("label")
            if pred.null_count == len(pred):
                return [], 0
            mask = pc.fill_null(pc.not_equal(pred, lab), False)
            total += int(pc.sum(mask).as_py() or 0)
            if len(out) < k:
                out += batch.filter(mask).slice(0, k - len(out)).to_pylist()
        return out, total


# --------------------------------------------------------------------------------------------------
# Figures


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _fig_values(run: _Run) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.6))
    v = run.values
    lo, hi = float(v.min()), float(v.max())
    bins = np.linspace(lo, hi if hi > lo else lo + 1e-9, 41)
    for c, name in enumerate(run.label_names):
        sel = v[run.labels == c]
        if sel.size:
            ax.hist(sel, bins=bins, histtype="stepfilled", alpha=0.45, label=f"{name} (n={sel.size}, mean {sel.mean():+.2e})")
    ax.axvline(0.0, color="k", lw=0.8, ls="--")
    ax.set_xlabel("Shapley value (test-utility units)")
    ax.set_ylabel("training points")
    ax.legend(fontsize=8)
    ax.set_title("Value distribution per class")
    return _png(fig)


def _fig_detection(det: pa.Table, summary: dict[str, Any]) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.2, 4.6))
    methods = summary.get("noise", {}).get("methods", {})
    method_col = det.column("method").to_numpy(zero_copy_only=False)
    x_all, y_all = det.column("fraction_inspected").to_numpy(), det.column("fraction_found").to_numpy()
    for m in dict.fromkeys(method_col):
        sel = method_col == m
        auc = methods.get(m, {}).get("auc")
        lab = _METHOD_LABELS.get(m, m) + (f" (AUC {auc:.3f})" if auc is not None else "")
        ax.plot(x_all[sel], y_all[sel], lw=2.2 if m == "freeshap" else 1.3, ls=":" if m == "random" else "-", label=lab,
                color=_METHOD_COLORS.get(m))
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="expected for random")
    frac = summary.get("noise", {}).get("inspect_fraction")
    if frac:
        ax.axvline(frac, color="k", lw=0.6, ls=":")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("fraction of training data inspected (lowest score first)")
    ax.set_ylabel("fraction of flipped labels found")
    ax.set_title("Wrong-label detection")
    ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


def _fig_curves(curves: pa.Table) -> str:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.9), sharey=True)
    method = curves.column("method").to_numpy(zero_copy_only=False)
    curve = curves.column("curve").to_numpy(zero_copy_only=False)
    evaluator = curves.column("evaluator").to_numpy(zero_copy_only=False)
    frac, acc = curves.column("fraction").to_numpy(), curves.column("accuracy").to_numpy()
    std = curves.column("accuracy_std").to_numpy()
    for ax, name in zip(axes, ("remove_high", "remove_low", "keep_top")):
        for m in dict.fromkeys(method):
            sel = (method == m) & (curve == name) & (evaluator == "finetune")
            if sel.any():
                o = np.argsort(frac[sel])
                ax.plot(frac[sel][o], acc[sel][o], ls="-.", marker="s", ms=4, lw=1.4,
                        color=_METHOD_COLORS.get(m, "k"), label=f"{_METHOD_LABELS.get(m, m)}, fine-tuned")
        for m in dict.fromkeys(method):
            sel = (method == m) & (curve == name) & (evaluator == "kernel")
            if not sel.any():
                continue
            o = np.argsort(frac[sel])
            x, y, s = frac[sel][o], acc[sel][o], std[sel][o]
            if m == "random":
                ax.plot(x, y, color="grey", ls="--", lw=1.2, label="random")
                ax.fill_between(x, y - s, y + s, color="grey", alpha=0.2)
            else:
                ax.plot(x, y, lw=2.2 if m == "freeshap" else 1.2, marker="o" if m == "freeshap" else None, ms=3,
                        label=_METHOD_LABELS.get(m, m), color=_METHOD_COLORS.get(m))
        ax.set_title(_CURVE_TITLES[name], fontsize=10)
        ax.set_xlabel("fraction kept" if name == "keep_top" else "fraction removed")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (kernel surrogate)")
    axes[0].legend(fontsize=8)
    return _png(fig)


def _fig_sign(run: _Run) -> str:
    plt = _plt()
    has_sign = run.sign is not None and np.isfinite(run.sign).any()
    fig, axes = plt.subplots(1, 2 if has_sign else 1, figsize=(11 if has_sign else 6, 3.8))
    axes = np.atleast_1d(axes)
    ax = axes[0]
    se = np.where(np.isfinite(run.stderr), run.stderr, np.nan)
    sig = np.abs(run.values) > 2 * np.nan_to_num(se, nan=np.inf)
    ax.scatter(run.values[~sig], se[~sig], s=6, alpha=0.5, color="grey", label="|value| ≤ 2·stderr")
    ax.scatter(run.values[sig], se[sig], s=6, alpha=0.7, color="C3", label="|value| > 2·stderr")
    ax.set_xlabel("value")
    ax.set_ylabel("standard error")
    ax.set_title(f"Sign significance: {sig.mean():.0%} of points", fontsize=10)
    ax.legend(fontsize=8)
    if has_sign:
        s = run.sign[np.isfinite(run.sign)]
        axes[1].hist(s, bins=np.linspace(0, 1, 21), color="C0", alpha=0.8)
        axes[1].set_xlabel("sign agreement across random half-splits of the permutations")
        axes[1].set_ylabel("training points")
        axes[1].set_title(f"Sign robustness: mean agreement {s.mean():.3f}", fontsize=10)
    return _png(fig)


def _fig_stability(info: dict[str, Any]) -> str:
    """Split-half Spearman of the values against the CPU seconds spent (the convergence trace of the run)."""
    plt = _plt()
    trace = np.asarray(info.get("stability_trace") or [], dtype=np.float64).reshape(-1, 3)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    if trace.size:
        ax.plot(trace[:, 0], trace[:, 2], marker="o", ms=3, color="C0")
    target = (info.get("convergence_target") if info.get("stop_reason", "").startswith("converged: split-half")
              else None)
    if target:
        ax.axhline(target, color="grey", ls="--", lw=1, label=f"target {target:g}")
        ax.legend(fontsize=8)
    ax.set_xlabel("CPU seconds of the sampling tasks (this run)")
    ax.set_ylabel("split-half Spearman of the values")
    ax.set_ylim(-0.05, 1.02)
    rho = info.get("stability_spearman")
    ax.set_title(f"Convergence: split-half Spearman {rho:.3f} after {info.get('n_samples', '?')} samples"
                 if isinstance(rho, float) and np.isfinite(rho) else "Convergence", fontsize=10)
    return _png(fig)


# --------------------------------------------------------------------------------------------------
# HTML


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(x: Any, fmt: str = "{:+.4g}", signed: bool = True) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return '<td class="num">–</td>'
    cls = ""
    if signed and isinstance(x, (int, float)):
        cls = " neg" if x < 0 else (" pos" if x > 0 else "")
    return f'<td class="num{cls}">{_e(fmt.format(x))}</td>'


def _figure(fig_id: str, b64: str, caption: str) -> str:
    return (f'<figure><img id="{fig_id}" alt="{_e(caption)}" src="data:image/png;base64,{b64}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _examples_table(tbl_id: str, rows: list[dict[str, Any]], preds: dict[int, Any], max_chars: int = 400) -> str:
    head = "<tr><th>#</th><th>index</th><th>label</th><th>LOO prediction</th><th>value</th><th>stderr</th><th>text</th></tr>"
    body = []
    for k, r in enumerate(rows, 1):
        text = r["text"] if len(r["text"]) <= max_chars else r["text"][: max_chars - 1] + "…"
        pred = preds.get(r["index"])
        body.append(f"<tr><td class='num'>{k}</td><td class='num'>{r['index']}</td><td>{_e(r['label_name'])}</td>"
                    f"<td>{_e(pred) if pred is not None else '–'}</td>{_num(r['value'])}{_num(r['stderr'], '{:.2g}', False)}"
                    f"<td>{_e(text)}</td></tr>")
    return f'<table id="{tbl_id}">{head}{"".join(body)}</table>'


def _meta_rows(run: _Run) -> list[tuple[str, str]]:
    m = run.manifest
    cfg = m.get("config", {})
    stages = m.get("stages", {})
    k, s = stages.get("kernel", {}), stages.get("shapley", {})
    data, model, sh = cfg.get("data", {}), cfg.get("model", {}), cfg.get("shapley", {})
    rows = [
        ("output directory", str(run.root.resolve())),
        ("data", f"{data.get('train')} (test: {data.get('test') or 'held out, fraction ' + str(data.get('test_fraction'))})"),
        ("training / test points", f"{run.n} / {run.n_test}"),
        ("classes", ", ".join(run.label_names)),
        ("model", f"{model.get('path')} · params {model.get('params')} · template {model.get('template')!r} · "
                  f"label words {model.get('label_words')}"),
        ("kernel", f"{k.get('kind', cfg.get('kernel', {}).get('kind'))}, {k.get('n_params', '?'):,} parameters"
                   if isinstance(k.get("n_params"), int) else str(cfg.get("kernel", {}).get("kind", "?"))),
        ("Shapley", f"utility {sh.get('utility')}, {s.get('n_permutations', sh.get('n_permutations'))} permutations, "
                    f"truncation tol {sh.get('truncation_tol')}, λ {sh.get('lam')}, divisor {sh.get('kernel_divisor')}"),
    ]
    if "v_full" in s:
        rows.append(("v(N) / v(∅)", f"{s['v_full']:.4f} / {s.get('v_empty', float('nan')):.4f}"))
    secs = []
    if isinstance(k.get("seconds"), dict) and "total" in k["seconds"]:
        secs.append(f"kernel {k['seconds']['total']:.1f} s")
    if isinstance(s.get("seconds"), (int, float)):
        secs.append(f"Shapley {s['seconds']:.1f} s")
    if run.summary and "seconds" in run.summary:
        secs.append(f"clean {run.summary['seconds'].get('total', 0):.1f} s")
    if secs:
        rows.append(("timings", ", ".join(secs)))
    for stage in ("kernel", "shapley"):
        if stage in stages:
            rows.append((f"{stage} finished", str(stages[stage].get("finished_at", "?"))))
    v = m.get("versions", {})
    if v:
        rows.append(("versions", ", ".join(f"{a} {b}" for a, b in v.items())))
    rows.append(("report generated", time.strftime("%Y-%m-%d %H:%M:%S")))
    return rows


def _conflicts_section(run: _Run, max_rows: int) -> str:
    """Groups of duplicates with different labels (``duplicates.parquet``); empty if there are none."""
    dups = read_duplicates(run.layout, conflicts_only=True)
    groups = conflict_groups(dups.to_pylist()) if dups is not None else []
    if not groups:
        return ""
    mode = run.manifest.get("stages", {}).get("kernel", {}).get("duplicates", {}).get("mode")
    shown = groups[:max_rows]
    head = "<tr><th>#</th><th>kept text</th><th>rows (split:id)</th><th>labels</th></tr>"
    body = "".join(
        f"<tr><td class='num'>{k}</td><td>{_e(g['text'][:400])}</td>"
        f"<td>{_e(', '.join(f'{sp}:{i}' for sp, i in zip(g['splits'], g['ids'])))}</td>"
        f"<td>{_e(', '.join(g['labels']))}</td></tr>" for k, g in enumerate(shown, 1))
    more = f" (the first {len(shown)} shown)" if len(shown) < len(groups) else ""
    key = f"data.dedupe: {_e(mode)}" if mode else "data.dedupe"
    return (f"<h2 id='sec-conflicts'>Conflicting duplicates</h2><p>{len(groups)} groups of texts are equal under "
            f"<code>{key}</code> but carry different labels{more}; the first row of each group "
            f"(and its label) was kept, the others were dropped (<code>duplicates.parquet</code>).</p>"
            f"<table id='tbl-conflicts'>{head}{body}</table>")


MAX_EXPLAINED_TEXTS = 20  # texts shown in the report (all are in explanations.parquet)


def _explanation_rows(run: _Run, k: int) -> pa.Table | None:
    """The rows of ``explanations.parquet`` the report shows: each text's k most helpful and k most harmful."""
    if not run.layout.explanations.is_file():
        return None
    read_explanations(run.layout)  # checks the schema (an error names the file)
    n = run.n
    cols = ["text_id", "text", "utility", "label_name", "predicted_label_name", "prediction", "u_full", "u_empty",
            "index", "train_label", "train_label_name", "train_loo_label", "value", "stderr", "rank"]
    keep = (pc.field("rank") <= k) | (pc.field("rank") > n - k)
    return pq.read_table(run.layout.explanations, columns=cols, filters=keep)


def _explanations_section(run: _Run, k: int) -> str:
    """Per explained text: the prediction, then its most helpful and harmful training examples with bars."""
    rows = _explanation_rows(run, k)
    if rows is None or not rows.num_rows:
        return ""
    texts_by_index = {r["index"]: r["text"] for r in run.rows(np.unique(rows.column("index").to_numpy()))}
    ids = list(dict.fromkeys(rows.column("text_id").to_pylist()))
    shown = ids[:MAX_EXPLAINED_TEXTS]
    more = f"; the first {len(shown)} shown" if len(shown) < len(ids) else ""
    parts = [f"<h2 id='sec-explanations'>Explanations</h2><p>{len(ids)} new texts explained "
             f"(<code>freeshap-ray explain</code>){more}. "
             "Each text is a one-point test set: a training example's value is its Shapley value for the surrogate's "
             "probability (or margin) of the explained class on that text, ± its standard error; the values sum to "
             "U(N) − U(∅) (within the truncation tolerance · |U(N)| when permutations are truncated). "
             "Bars are scaled to each text's largest |value|. <span class='badge'>suspect label</span> "
             "marks a training example whose label the surrogate fitted on all other examples contradicts "
             "(leave-one-out prediction ≠ label).</p>"]
    table = rows.to_pylist()
    for tid in shown:
        mine = [r for r in table if r["text_id"] == tid]
        first = mine[0]
        probs = " · ".join(f"{_e(nm)} {p:.3f}" for nm, p in zip(run.label_names, first["prediction"]))
        scale = max(abs(r["value"]) for r in mine) or 1.0
        body = []
        for effect, sel in (("helpful", sorted((r for r in mine if r["value"] > 0), key=lambda r: -r["value"])[:k]),
                            ("harmful", sorted((r for r in mine if r["value"] < 0), key=lambda r: r["value"])[:k])):
            for rank, r in enumerate(sel, 1):
                suspect = r["train_label"] != r["train_loo_label"]
                loo = r["train_loo_label"]
                other = run.label_names[loo] if 0 <= loo < len(run.label_names) else "?"
                badge = (f"<span class='badge' title='the other examples say {_e(other)}'>suspect label</span>"
                         if suspect else "")
                width = 100.0 * abs(r["value"]) / scale
                text = texts_by_index.get(r["index"], "")
                body.append(
                    f"<tr class='{effect}{' suspect' if suspect else ''}'><td>{effect}</td><td class='num'>{rank}</td>"
                    f"{_num(r['value'])}{_num(r['stderr'], '{:.2g}', False)}<td class='barcell'><span class='bar"
                    f"{' neg' if r['value'] < 0 else ''}' style='width:{width:.1f}%'></span></td>"
                    f"<td class='num'>{r['index']}</td><td>{_e(r['train_label_name'])}{badge}</td>"
                    f"<td>{_e(text[:400])}</td></tr>")
        head = ("<tr><th>effect</th><th>#</th><th>value</th><th>stderr</th><th></th><th>index</th><th>label</th>"
                "<th>training text</th></tr>")
        parts.append(
            f"<div class='expl' id='expl-{tid}'><h3>Text {tid}</h3><blockquote>{_e(first['text'][:1000])}</blockquote>"
            f"<p>Prediction: {probs} → <b>{_e(first['predicted_label_name'])}</b>; explaining "
            f"{_e(first['utility'])}({_e(first['label_name'])}): U(N) = {first['u_full']:.4f}, "
            f"U(∅) = {first['u_empty']:.4f}.</p><table id='tbl-explain-{tid}'>{head}{''.join(body)}</table></div>")
    return "\n".join(parts)


def build_report(out_dir: str | Path, *, top_k: int = 10) -> str:
    """The report HTML of the run in ``out_dir`` (a string; see :func:`write_report`)."""
    if top_k < 1:
        raise ValueError(f"top_k: must be >= 1, got {top_k}")
    run = _Run(Path(out_dir))
    parts: list[str] = []
    figs: list[str] = []
    summ = run.summary or {}

    parts.append("<h2 id='sec-metadata'>Run</h2><table class='meta' id='tbl-metadata'>"
                 + "".join(f"<tr><td>{_e(a)}</td><td>{_e(b)}</td></tr>" for a, b in _meta_rows(run)) + "</table>")

    parts.append("<h2 id='sec-values'>Value distribution per class</h2>")
    parts.append(_figure("fig-values", _fig_values(run), "Histogram of FreeShap values by given label; points left of 0 "
                         "lower the test utility of the kernel surrogate on average."))
    figs.append("fig-values")

    # detection
    parts.append("<h2 id='sec-detection'>Wrong-label detection</h2>")
    noise = summ.get("noise")
    if noise and run.layout.detection.is_file():
        det = read_detection(run.layout.detection)
        parts.append(f"<p>{noise['n_flipped']} of {run.n} training labels ({noise['fraction']:.0%}, seed {noise['seed']}) were "
                     "flipped; values and baselines were recomputed on the noisy labels with the same kernel, and points "
                     "were inspected from the lowest score up.</p>")
        parts.append(_figure("fig-detection", _fig_detection(det, summ), "Fraction of flipped labels found vs fraction "
                             "of the training set inspected."))
        figs.append("fig-detection")
        f = noise["inspect_fraction"]
        key = f"recall_at_{f:g}"
        rows = "".join(f"<tr><td>{_e(_METHOD_LABELS.get(m, m))}</td>{_num(d['auc'], '{:.3f}', False)}{_num(d[key], '{:.3f}', False)}</tr>"
                       for m, d in noise["methods"].items())
        parts.append(f"<table id='tbl-detection'><tr><th>method</th><th>AUC</th><th>recall at {f:.0%} inspected</th></tr>"
                     f"{rows}</table>")
        rec = noise.get("loo_prediction_recovers_original")
        if rec is not None:
            parts.append(f"<p>For {rec:.0%} of the flipped points the leave-one-out surrogate prediction is the original label.</p>")
    else:
        parts.append("<p class='note'>No noise evaluation in this run: <code>freeshap-ray clean CONFIG --set "
                     "clean.noise_fraction=0.1</code> adds it.</p>")

    # curves
    parts.append("<h2 id='sec-curves'>Data removal and selection</h2>")
    if run.layout.curves.is_file():
        parts.append(_figure("fig-curves", _fig_curves(read_curves(run.layout.curves)),
                             "Test accuracy of the kernel surrogate refitted on the remaining points. A good valuation "
                             "drops fastest when removing high values, rises when removing low values, and its top-k "
                             "selections beat random ones (grey: random order, mean ± std)."))
        figs.append("fig-curves")
    else:
        parts.append("<p class='note'>No curves yet: run <code>freeshap-ray clean CONFIG</code>.</p>")

    # sign robustness
    parts.append("<h2 id='sec-sign'>Sign robustness</h2>")
    parts.append(_figure("fig-sign", _fig_sign(run), "Left: value vs Monte-Carlo standard error. Right (when recorded): "
                         "per-point fraction of random half-splits of the permutations whose two estimates agree in sign."))
    figs.append("fig-sign")

    # convergence
    shapley_info = {**run.manifest.get("stages", {}).get("shapley", {}),
                    "convergence_target": run.manifest.get("config", {}).get("shapley", {}).get("convergence_target")}
    parts.append("<h2 id='sec-stability'>Convergence</h2>")
    stop = _e(shapley_info.get("stop_reason", "?"))
    est = _e(shapley_info.get("estimator", run.manifest.get("config", {}).get("shapley", {}).get("estimator", "tmc")))
    parts.append(_figure("fig-stability", _fig_stability(shapley_info),
                         f"Estimator {est}; stopped on {stop}. Each point: the Spearman correlation between the values "
                         "of two independent halves of the samples so far (1 = the ranking no longer depends on the "
                         "sampling), against the sampling tasks' CPU seconds."))
    figs.append("fig-stability")

    # suspected wrong labels
    parts.append("<h2 id='sec-suspects'>Suspected wrong labels</h2>")
    sus, total = run.suspected_mislabels(top_k)
    if sus:
        rank_by = (run.summary or {}).get("rank_by") or {}
        how = (f" Ranked by {_e(_METHOD_LABELS.get(rank_by.get('method'), rank_by.get('method')))} "
               f"({_e(rank_by.get('why', ''))})." if rank_by else "")
        parts.append(f"<p>{total} training points have a leave-one-out surrogate prediction that disagrees with their "
                     f"label; the {len(sus)} most suspicious (lowest score) of them.{how}</p>")
        head = ("<tr><th>rank</th><th>index</th><th>label</th><th>LOO prediction</th><th>value</th><th>LOO margin</th>"
                "<th>text</th></tr>")
        body = "".join(
            f"<tr><td class='num'>{r['rank']}</td><td class='num'>{r['index']}</td><td>{_e(r['label_name'])}</td>"
            f"<td>{_e(r['predicted_label_name'])}</td>{_num(r['value'])}{_num(r['loo_margin'], '{:+.3g}')}"
            f"<td>{_e(r['text'][:400])}</td></tr>" for r in sus)
        parts.append(f"<table id='tbl-suspects'>{head}{body}</table>")
    else:
        parts.append("<p class='note'>No suspects table with predictions: run <code>freeshap-ray clean CONFIG</code>.</p>")

    conflicts = _conflicts_section(run, max_rows=5 * top_k)
    if conflicts:
        parts.append(conflicts)

    # helpful / harmful
    order = np.argsort(run.values, kind="stable")
    k = min(top_k, run.n)
    harmful, helpful = order[:k], order[::-1][:k]
    preds = run.predicted_names(np.concatenate([harmful, helpful]))
    parts.append("<h2 id='sec-harmful'>Most harmful training examples</h2>")
    parts.append(_examples_table("tbl-harmful", run.rows(harmful), preds))
    parts.append("<h2 id='sec-helpful'>Most helpful training examples</h2>")
    parts.append(_examples_table("tbl-helpful", run.rows(helpful), preds))

    explained = _explanations_section(run, top_k)
    if explained:
        parts.append(explained)

    title = f"FreeShap report — {run.root.name}"
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>{_e(title)}</title>"
            f"<style>{_CSS}</style></head>\n"
            f"<body data-figures-expected='{len(figs)}' data-figure-ids='{' '.join(figs)}'>"
            f"<h1>{_e(title)}</h1><p class='sub'>{run.n} training examples valued with fine-tuning-free Shapley "
            "values (kernel regression on the empirical NTK).</p>\n"
            + "\n".join(parts) + f"\n<script>{_SCRIPT}</script></body></html>\n")


def write_report(out_dir: str | Path, path: str | Path | None = None, *, top_k: int = 10) -> Path:
    """Write the report of ``out_dir`` to ``path`` (default ``OUT_DIR/report.html``) atomically."""
    text = build_report(out_dir, top_k=top_k)
    target = Path(path) if path is not None else Layout.of(out_dir).report
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return target
