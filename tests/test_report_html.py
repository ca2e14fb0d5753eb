"""report/index.html: the whole report on one page that needs no network, read as text and,
where Chromium is installed, rendered headless (screenshot and the DOM after its scripts)."""

from __future__ import annotations

import base64
import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from harness.records import SCHEMA_VERSION
from harness.report import load_report, write_report
from harness.report.html_page import sort_value
from harness.report.summary import DETAIL_COLUMNS, details_table
from harness.report.tables import fmt
from tests.test_report import MODEL, TASK, dump, make_record
from tests.test_ruler import fake_record

WINDOW = (1400, 2000)


@pytest.fixture
def report_dir(tmp_path: Path) -> Path:
    """A report over four gsm8k runs (one without a KV ratio), a record it skips and two
    RULER runs."""
    root = tmp_path / "results"
    dump(root, make_record("full_run", "full", {"ratio": 1.0}, 0.5, 1.0, ["1", "2"]), "full_run")
    for run_id, ratio, score, kv in (("s02", 0.2, 0.25, 0.21), ("s04", 0.4, 0.5, 0.41)):
        params = {"ratio": ratio, "sinks": 4, "note": "<i>x</i> & y"}
        dump(root, make_record(run_id, "streamingllm", params, score, kv, ["1", "3"]), run_id)
    dump(root, make_record("nokv", "snapkv", {"ratio": 0.3}, 0.0, None, ["9", "9"]), "nokv")
    dump(root, "{not json", "corrupt")
    for method, outcome, kv in (("full", 1, 1.0), ("streamingllm", 0, 0.2)):
        record = fake_record(method, {(1024, 0.1): [outcome] * 2, (1024, 0.5): [1, 0]}, kv)
        record |= {
            "schema_version": SCHEMA_VERSION,
            "score": {"metric": "score,none", "value": float(outcome)},
            "measurements": {"kv_ratio": kv},
            "model": {"name": MODEL},
            "run_id": f"ruler_{method}",  # a record's run id is its folder's name
        }
        dump(root, record, f"ruler_{method}")
    return root


def build(root: Path) -> tuple[Path, dict[str, Path]]:
    report = load_report(root)
    paths = write_report(report.runs, root / "report", report.requests, report.skipped)
    return paths["html"], paths


def test_the_page_holds_every_section_record_and_plot(report_dir: Path) -> None:
    page, paths = build(report_dir)
    assert page == report_dir / "report" / "index.html"
    text = page.read_text()
    headings = re.findall(r"<h2>(.*?)</h2>", text)
    assert headings == [
        "Summary",
        f"{MODEL} · {TASK}",
        f"{MODEL} · ruler_niah_single_1",
        "RULER: share of samples passed per run and length",
        "Skipped records",
        "All columns",
    ]
    assert "Best score per method at each measured KV ratio" in text
    assert "corrupt" in text and "How to read the numbers" in text
    runs = load_report(report_dir).runs
    for record in runs["path"]:
        href = os.path.relpath(record, page.parent)
        assert text.count(f'href="{href}"') == 2  # its task's table and the all-columns one
        assert (page.parent / href).resolve() == Path(record).resolve()
    plots = {stem: path for stem, path in paths.items() if path.suffix == ".png"}
    assert f"ruler_heatmap__{MODEL}__ruler_niah_single_1" in plots
    for stem, path in plots.items():
        data = base64.b64encode(path.read_bytes()).decode()
        assert f'<figure id="{stem}"><img src="data:image/png;base64,{data}"' in text
    # every cell of the summary (scores with their intervals), escaped, in its task's table
    summary = details_table(runs)
    for column in [
        c for c in DETAIL_COLUMNS if c in summary.columns and c not in ("model", "task")
    ]:
        for value in summary[column]:
            assert f">{html.escape(fmt(value))}</td>" in text, (column, value)
    assert text.count("<table") == text.count('<table class="sortable">') == 5
    assert "<script>" in text and "sortTable" in text  # inline: no script file to fetch
    assert "http://" not in text and "https://" not in text
    assert not re.search(r'src="(?!data:)', text)  # every image inline
    assert "&lt;i&gt;x&lt;/i&gt; &amp; y" in text and "<i>x</i>" not in text  # escaped


def test_the_leaderboard_shows_when_the_report_writes_one(report_dir: Path) -> None:
    page, _ = build(report_dir)  # no per-sample inputs given: no leaderboard
    assert "Leaderboard" not in page.read_text()
    (page.parent / "leaderboard.csv").write_text("rank,run\n1,stale\n")
    page, _ = build(report_dir)
    assert "Leaderboard" not in page.read_text()  # a stale file is not shown
    report = load_report(report_dir)
    paths = write_report(
        report.runs, report_dir / "report", report.requests, report.skipped, report.inputs
    )
    text = paths["html"].read_text()
    assert re.findall(r"<h2>(.*?)</h2>", text)[1] == "Leaderboard"
    assert "stale" not in text and "<td>full</td>" in text


def test_cells_sort_by_their_number_or_their_interval_estimate() -> None:
    assert sort_value(0.25) == 0.25 and sort_value(3) == 3.0
    assert sort_value("0.5 [0.206, 0.794]") == 0.5 and sort_value("-0.25 [n/a]") == -0.25
    assert sort_value(float("nan")) is None and sort_value(True) is None
    assert sort_value("ratio=0.2") is None and sort_value("(reference)") is None


# what the page's own script did, read back from the DOM: the images decoded, where the rows of
# the gsm8k table and its first plot lie, and the rows' order after clicking a header (twice)
PROBE = """<script>
window.addEventListener("load", () => {
  const table = document.querySelector("#task-FIRST table.sortable");
  const img = document.querySelector("#score_vs_kv_ratio__FIRST img");
  const box = (el) => {
    const r = el.getBoundingClientRect();
    return [r.left + el.clientLeft, r.top + el.clientTop, el.clientWidth, el.clientHeight];
  };
  const header = Array.from(table.tHead.rows[0].cells).find((c) => c.textContent === "kv_ratio");
  const column = () => Array.from(table.tBodies[0].rows, (r) => r.cells[header.cellIndex].textContent);
  const probe = {images: document.images.length, image: box(img),
    rows: Array.from(table.rows, box),
    decoded: Array.from(document.images).filter((i) => i.complete && i.naturalWidth > 0).length,
    natural: [img.naturalWidth, img.naturalHeight], before: column()};
  header.click();
  probe.ascending = column();
  header.click();
  probe.descending = column();
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify(probe);
  document.body.appendChild(out);
});
</script></body>"""


def chromium(tmp_path: Path, *args: str) -> str:
    """Run headless Chromium with a fresh profile; its stdout."""
    profile = tmp_path / f"profile{len(list(tmp_path.glob('profile*')))}"
    profile.mkdir()
    command = [
        "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        *args,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium installed")
def test_chromium_renders_the_table_and_the_plots(report_dir: Path, tmp_path: Path) -> None:
    page, paths = build(report_dir)
    probe_page = page.with_name("probe.html")
    probe = PROBE.replace("FIRST", f"{MODEL}__{TASK}")
    probe_page.write_text(page.read_text().replace("</body>", probe))
    dom = chromium(tmp_path, "--dump-dom", probe_page.as_uri())
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom)
    assert found, "the page's scripts did not run to the end"
    probe = json.loads(html.unescape(found.group(1)))
    assert probe["images"] == probe["decoded"] == sum(p.suffix == ".png" for p in paths.values())
    # sorted by the measured KV ratio, numerically, the run without one last both ways
    assert probe["before"] == ["1", "–", "0.21", "0.41"]
    assert probe["ascending"] == ["0.21", "0.41", "1", "–"]
    assert probe["descending"] == ["1", "0.41", "0.21", "–"]

    shot = tmp_path / "shot.png"
    chromium(tmp_path, f"--screenshot={shot}", page.as_uri())
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (WINDOW[1], WINDOW[0])
    # the first task's table: text drawn in its header and in every row (dark grey, not
    # the links' blue)
    for i, (left, top, width, height) in enumerate(probe["rows"]):
        assert top + height < WINDOW[1], f"row {i} of the table is not in the screenshot"
        row = pixels[round(top) : round(top + height), round(left) : round(left + width)]
        dark = (row.mean(axis=2) < 0.2).mean()
        assert 0.005 < dark < 0.4, f"no text where row {i} of the table is ({dark:.3f} dark)"
    # the first plot is drawn at its own size: its pixels on screen are the PNG's
    left, top, width, height = (round(v) for v in probe["image"])
    assert [width, height] == probe["natural"] and top + 200 < WINDOW[1], probe
    rows = min(height, WINDOW[1] - top)
    shown = pixels[top : top + rows, left : left + width]
    png = matplotlib.image.imread(paths[f"score_vs_kv_ratio__{MODEL}__{TASK}"])[:rows, :, :3]
    assert np.abs(shown - png).mean() < 0.01, "the screenshot does not show the plot"
    assert png.std() > 0.1  # and the plot is not a blank image
