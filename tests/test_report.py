"""`report`: a self-contained HTML page, checked in a real headless Chromium (figures decoded by the browser)."""

from __future__ import annotations

import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from freeshap_ray.apps import FIGURE_IDS, build_report, write_report
from freeshap_ray.cli import main
from freeshap_ray.config import config_from_dict

from .test_apps_clean import NAMES, built_run, job_dict, write_synthetic_run

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome", "headless_shell")


def find_browser() -> str | None:
    """``$FREESHAP_CHROMIUM`` or the first Chromium/Chrome on PATH."""
    env = os.environ.get("FREESHAP_CHROMIUM")
    if env and Path(env).is_file():
        return env
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def headless(browser: str, profile: Path, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--virtual-time-budget=10000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


class _Dom(HTMLParser):
    def __init__(self):
        super().__init__()
        self.body: dict[str, str | None] = {}
        self.imgs: dict[str, dict[str, str | None]] = {}
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"])
        if tag == "body":
            self.body = a
        if tag == "img" and a.get("id"):
            self.imgs[a["id"]] = a


EXPLAINED = ["<script>alert('x')</script> a great flight", "the food was cold"]


def write_synthetic_explanations(out) -> None:
    """``explanations.parquet`` for two texts over the run's training set, as ``explain`` writes it: in text 0 the
    most helpful example (index 0) carries a suspect label (its leave-one-out prediction differs)."""
    import pyarrow.parquet as pq

    from freeshap_ray.io import Layout
    from freeshap_ray.io.explanations import explanations_table, write_explanations

    train = pq.read_table(out / "train.parquet")
    n = train.num_rows
    labels = train.column("label").to_numpy()
    loo = labels.copy()
    loo[0] = 1 - loo[0]
    rng = np.random.default_rng(0)
    tables = []
    for tid, text in enumerate(EXPLAINED):
        v = rng.normal(0, 0.01, n)
        if tid == 0:
            v[0] = 0.5
        rank = np.empty(n, dtype=np.int64)
        rank[np.argsort(-v, kind="stable")] = np.arange(1, n + 1)
        tables.append(explanations_table({
            "text_id": np.full(n, tid), "text": [text] * n, "settings": ["{}"] * n, "utility": ["prob"] * n,
            "label": np.full(n, tid), "label_name": [NAMES[tid]] * n, "predicted_label": np.full(n, tid),
            "predicted_label_name": [NAMES[tid]] * n, "prediction": np.tile([[0.3, 0.7], [0.6, 0.4]][tid], (n, 1)),
            "u_full": np.full(n, 0.7), "u_empty": np.full(n, 0.5), "index": np.arange(n), "id": np.arange(n) + 1000,
            "train_label": labels, "train_label_name": [NAMES[c] for c in labels], "train_loo_label": loo,
            "kernel": np.ones(n), "value": v, "stderr": np.full(n, 0.001), "count": np.full(n, 50), "rank": rank}))
    import pyarrow as pa

    write_explanations(Layout.of(out), pa.concat_tables(tables))


@pytest.fixture(scope="module")
def report(ray_local, tmp_path_factory):
    b = built_run(tmp_path_factory)
    write_synthetic_explanations(b["out"])
    assert main(["report", str(b["out"]), "--top-k", "5"]) == 0
    return b, b["out"] / "report.html"


def test_report_is_self_contained_with_every_section(report):
    _b, path = report
    text = path.read_text(encoding="utf-8")
    dom = _Dom()
    dom.feed(text)
    assert set(FIGURE_IDS) <= set(dom.imgs)
    for fid in FIGURE_IDS:
        assert dom.imgs[fid]["src"].startswith("data:image/png;base64,") and len(dom.imgs[fid]["src"]) > 5000
    for tid in ("tbl-metadata", "tbl-detection", "tbl-harmful", "tbl-helpful", "sec-conflicts", "tbl-conflicts"):
        assert tid in dom.ids
    conflicts = text[text.index("id='sec-conflicts'"):text.index("id='sec-harmful'")]
    assert "2 groups" in conflicts and "train:1000, train:5000, test:7" in conflicts and "train:1001" not in conflicts
    assert "http://" not in text and "https://" not in text and "<link" not in text  # nothing external
    # example texts are escaped, never interpreted
    assert "<b>&amp;" not in text and "&lt;b&gt;&amp;amp;" in text
    assert dom.body["data-figures-expected"] == str(len(FIGURE_IDS))


def test_report_explanations_section(report):
    _b, path = report
    text = path.read_text(encoding="utf-8")
    dom = _Dom()
    dom.feed(text)
    assert {"sec-explanations", "expl-0", "expl-1", "tbl-explain-0", "tbl-explain-1"} <= dom.ids
    sec = text[text.index("id='sec-explanations'"):]
    assert "<script>alert" not in text and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in sec  # escaped
    t0 = sec[sec.index("id='tbl-explain-0'"):sec.index("id='expl-1'")]
    assert t0.count("<tr class='helpful") == 5 and t0.count("<tr class='harmful") == 5  # --top-k 5 per side
    first = t0[t0.index("<tr class='helpful"):]
    first = first[:first.index("</tr>")]
    assert "suspect" in first and "width:100.0%" in first and "+0.5" in first  # the top row: largest bar, flagged
    assert "train point 0 &lt;b&gt;&amp;amp;" in first  # its training text, escaped
    assert sec.count("class='badge'") == 2  # the legend and the one suspect row
    assert "positive 0.700" in sec and "→ <b>positive</b>" in sec


def test_report_renders_in_headless_chromium(report, tmp_path):
    browser = find_browser()
    if browser is None:
        pytest.skip("no Chromium/Chrome on PATH (Debian: apt-get install chromium; `bash scripts/bootstrap.sh test` "
                    "installs it when run as root); set FREESHAP_CHROMIUM to a browser binary")
    _b, path = report
    url = path.resolve().as_uri()
    res = headless(browser, tmp_path / "profile", "--dump-dom", url)
    assert res.returncode == 0, res.stderr[-2000:]
    dom = _Dom()
    dom.feed(res.stdout)
    assert dom.body.get("data-figures-ok") == "true", (dom.body, res.stderr[-2000:])
    assert dom.body.get("data-figures-loaded") == str(len(FIGURE_IDS))
    assert "tbl-conflicts" in dom.ids and "tbl-explain-0" in dom.ids
    for fid in FIGURE_IDS:
        assert dom.imgs[fid].get("data-rendered") == "true", fid
    shot = tmp_path / "shot.png"
    res = headless(browser, tmp_path / "profile2", "--window-size=1200,2400", f"--screenshot={shot}", url)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    import matplotlib.image

    img = matplotlib.image.imread(shot)
    assert img.shape[0] >= 2000 and img.shape[1] >= 1000
    assert np.std(img[..., :3]) > 0.05  # not a blank page
    if os.environ.get("FREESHAP_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["FREESHAP_KEEP_SCREENSHOT"])


def test_report_of_a_run_without_clean_has_values_and_sign_only(ray_local, tmp_path):
    from freeshap_ray.pipeline import run_shapley_stage

    out = tmp_path / "plain"
    write_synthetic_run(out, n=30, m=10)
    run_shapley_stage(config_from_dict(job_dict(out)), progress=False)
    text = build_report(out, top_k=3)
    assert 'id="fig-values"' in text and 'id="fig-sign"' in text and 'id="fig-stability"' in text
    assert 'id="fig-detection"' not in text and 'id="fig-curves"' not in text
    assert "freeshap-ray clean CONFIG" in text and "data-figures-expected='3'" in text
    assert "sec-conflicts" not in text  # no duplicates.parquet
    assert "sec-explanations" not in text  # no explanations.parquet
    custom = write_report(out, tmp_path / "elsewhere" / "r.html", top_k=2)
    assert custom.is_file() and not (out / "report.html").exists()
    assert main(["report", str(out), "--top-k", "0"]) == 2
    assert main(["report", str(tmp_path / "missing")]) == 2
