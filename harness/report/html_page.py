"""``report/index.html``: the whole report as one page that needs no network.

The page holds the summary (run counts, warnings, how to read the numbers, the best score of
each method per measured KV ratio), the leaderboard when the report folder has a
``leaderboard.csv``, one section per (model, task) with its runs' table (scores with their
95 % intervals, a link to each ``record.json``) and its plots, the RULER table, the skipped
records and every column. Plots are embedded as base64 PNGs; the CSS and the few lines of
JavaScript that sort a table by the header clicked are inline. Every text is escaped.

It formats the DataFrames and PNGs that :mod:`harness.report.build` already produced, so a
column or plot added there shows here without a change.
"""

from __future__ import annotations

import base64
import html
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pandas as pd

from harness.records import slug
from harness.report.tables import fmt

PAGE = "index.html"
LEADERBOARD = "leaderboard.csv"
RECORD_COLUMN = "record"
# a summary cell "0.5 [0.206, 0.794]" sorts by its estimate
INTERVAL = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*\[")

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em 2em; color: #1a1a1a; }
h1 { margin-bottom: 0.2em; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.8em; }
nav ul { columns: 3; margin: 0.5em 0; }
code { background: #f2f2f2; padding: 0 0.2em; border-radius: 3px; }
.scroll { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 13px; }
th, td { border: 1px solid #d0d0d0; padding: 0.25em 0.5em; text-align: left;
         white-space: nowrap; }
td[data-value] { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #eef1f5; position: sticky; top: 0; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th::after { content: " \\2195"; color: #999; }
table.sortable th[aria-sort=ascending]::after { content: " \\2191"; color: #000; }
table.sortable th[aria-sort=descending]::after { content: " \\2193"; color: #000; }
tbody tr:nth-child(even) { background: #fafafa; }
figure { display: inline-block; margin: 0.8em 1em 0.8em 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #e0e0e0; }
figcaption { font-size: 12px; color: #555; }
.warning { color: #8a4b00; }
"""

# click a header: sort the rows by that column (numbers by value, blanks last), again: reverse
SCRIPT = """
function sortKey(cell) {
  if (cell.dataset.value !== undefined) return parseFloat(cell.dataset.value);
  return cell.textContent.trim();
}
function isBlank(key) {
  return key === "" || key === "\\u2013";
}
function compareKeys(x, y) {
  const nx = typeof x === "number", ny = typeof y === "number";
  if (nx && ny) return x - y;
  if (nx || ny) return nx ? -1 : 1;
  return x.localeCompare(y, undefined, {numeric: true});
}
function sortTable(table, th) {
  const column = th.cellIndex, body = table.tBodies[0];
  const ascending = th.getAttribute("aria-sort") !== "ascending";
  for (const other of table.tHead.rows[0].cells) other.removeAttribute("aria-sort");
  th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
  const sign = ascending ? 1 : -1;
  const rows = Array.from(body.rows, (row) => [sortKey(row.cells[column]), row]);
  rows.sort(([x], [y]) => {
    if (isBlank(x) || isBlank(y)) return isBlank(x) - isBlank(y);  // blanks last, both ways
    return sign * compareKeys(x, y);
  });
  for (const [, row] of rows) body.appendChild(row);
}
for (const table of document.querySelectorAll("table.sortable")) {
  for (const th of table.tHead.rows[0].cells) {
    th.title = "sort by " + th.textContent;
    th.addEventListener("click", () => sortTable(table, th));
  }
}
"""


def text(value: str) -> str:
    """Escaped ``value`` with markdown's ```code``` spans as ``<code>``."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(value))


def sort_value(value: Any) -> float | None:
    """The number a cell sorts by: the value itself, or an interval's estimate; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return None if math.isnan(value) else float(value)
    match = INTERVAL.match(value) if isinstance(value, str) else None
    return float(match.group(1)) if match else None


def record_link(path: str, out_dir: Path) -> str:
    """A link to a record, relative to the page so that the folder can move."""
    target = os.path.relpath(Path(path).resolve(), Path(out_dir).resolve())
    return f'<a href="{html.escape(quote(Path(target).as_posix()))}">record</a>'


def table_html(frame: pd.DataFrame, out_dir: Path) -> str:
    """``frame`` as a sortable table; a ``record`` column (record paths) becomes links."""
    if frame.empty:
        return "<p>(no rows)</p>"
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = []
    for values in frame.itertuples(index=False):
        cells = []
        for column, value in zip(frame.columns, values, strict=True):
            if column == RECORD_COLUMN and isinstance(value, str) and value:
                cells.append(f"<td>{record_link(value, out_dir)}</td>")
                continue
            number = sort_value(value)
            attr = f' data-value="{number!r}"' if number is not None else ""
            cells.append(f"<td{attr}>{html.escape(fmt(value))}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return (
        f'<div class="scroll"><table class="sortable"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def figure_html(stem: str, path: Path, title: str) -> str:
    """A plot embedded as a base64 PNG, captioned, with a link to its file."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    name = html.escape(quote(Path(path).name))
    return (
        f'<figure id="{html.escape(stem)}"><img src="data:image/png;base64,{data}" '
        f'alt="{html.escape(title)}"><figcaption>{html.escape(title)} · '
        f'<a href="{name}">{html.escape(Path(path).name)}</a></figcaption></figure>'
    )


def plot_title(stem: str) -> str:
    from harness.report.plots import PLOT_TITLES

    kind = stem.partition("__")[0]
    return PLOT_TITLES.get(kind, kind.replace("_", " "))


def section(anchor: str, heading: str, body: str) -> str:
    return f'<section id="{html.escape(anchor)}"><h2>{html.escape(heading)}</h2>{body}</section>'


def task_sections(
    summary: pd.DataFrame, columns: list[str], plots: dict[str, Path], out_dir: Path
) -> tuple[list[tuple[str, str, str]], dict[str, Path]]:
    """One ``(anchor, heading, body)`` per (model, task): its runs (a link to each record
    first), then its plots; returns the plots no (model, task) claimed as well."""
    left = dict(plots)
    sections = []
    shown = [c for c in columns if c in summary.columns and c not in ("model", "task")]
    for (model, task), rows in summary.groupby(["model", "task"], sort=True):
        where = f"{slug(model)}__{slug(task)}"
        frame = pd.concat([rows["path"].rename(RECORD_COLUMN), rows[shown]], axis=1)
        mine = {s: p for s, p in plots.items() if s.partition("__")[2] == where}
        figures = "".join(figure_html(s, p, plot_title(s)) for s, p in mine.items())
        for stem in mine:
            left.pop(stem, None)
        body = f"<p>{len(rows)} run(s).</p>{table_html(frame, out_dir)}{figures}"
        sections.append((f"task-{where}", f"{model} · {task}", body))
    return sections, left


def read_leaderboard(out_dir: Path) -> pd.DataFrame | None:
    """The report folder's ``leaderboard.csv``, None when there is none."""
    path = Path(out_dir) / LEADERBOARD
    return pd.read_csv(path) if path.is_file() else None


@dataclass
class Content:
    """What the page shows. ``summary``: one row per run with the display ``columns``
    (intervals as text) and ``model``, ``task``, ``path``; ``overview``: titled tables in the
    summary section; ``tables``: titled tables after the per-task sections; ``notes``:
    paragraphs (markdown code spans)."""

    summary: pd.DataFrame
    columns: list[str]
    plots: dict[str, Path]
    overview: dict[str, pd.DataFrame] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    all_columns: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def summary_body(content: Content, out_dir: Path) -> str:
    """Counts, warnings, how to read the numbers (folded) and the overview tables."""
    counts = (
        f"{len(content.summary)} run(s), {len(content.skipped)} record(s) skipped, "
        f"{len(content.warnings)} warning(s)."
    )
    parts = [f"<p>{html.escape(counts)}</p>"]
    if content.warnings:
        items = "".join(f"<li>{text(w)}</li>" for w in content.warnings)
        parts.append(f'<ul class="warning">{items}</ul>')
    if content.notes:
        notes = "".join(f"<p>{text(n)}</p>" for n in content.notes)
        parts.append(f"<details><summary>How to read the numbers</summary>{notes}</details>")
    for title, frame in content.overview.items():
        parts.append(f"<h3>{html.escape(title)}</h3>{table_html(frame, out_dir)}")
    return "".join(parts)


def sections(content: Content, out_dir: Path) -> list[tuple[str, str, str]]:
    """Every ``(anchor, heading, body)`` of the page, in order."""
    parts = [("summary", "Summary", summary_body(content, out_dir))]
    leaderboard = read_leaderboard(out_dir)
    if leaderboard is not None:
        parts.append(("leaderboard", "Leaderboard", table_html(leaderboard, out_dir)))
    per_task, others = task_sections(content.summary, content.columns, content.plots, out_dir)
    parts += per_task
    for i, (title, frame) in enumerate(content.tables.items()):
        parts.append((f"table-{i}", title, table_html(frame, out_dir)))
    if others:
        figures = "".join(figure_html(s, p, plot_title(s)) for s, p in others.items())
        parts.append(("other-plots", "Other plots", figures))
    if content.skipped:
        items = "".join(
            f"<li><code>{html.escape(str(p))}</code>: {html.escape(why)}</li>"
            for p, why in content.skipped
        )
        parts.append(("skipped", "Skipped records", f"<ul>{items}</ul>"))
    if content.all_columns is not None:
        table = table_html(content.all_columns, out_dir)
        body = f"<details><summary>show every column of every run</summary>{table}</details>"
        parts.append(("all-columns", "All columns", body))
    return parts


def page(parts: list[tuple[str, str, str]]) -> str:
    """The HTML document: title, contents, the sections, the inline style and script."""
    contents = "".join(
        f'<li><a href="#{html.escape(anchor)}">{html.escape(heading)}</a></li>'
        for anchor, heading, _ in parts
    )
    body = "".join(section(*part) for part in parts)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>kvbench report</title><style>{STYLE}</style></head><body>"
        f"<h1>kvbench report</h1><nav><ul>{contents}</ul></nav>{body}"
        f"<script>{SCRIPT}</script></body></html>\n"
    )


def write_html(out_dir: Path, content: Content) -> Path:
    """Write ``out_dir/index.html`` (see the module's docstring); returns its path."""
    path = Path(out_dir) / PAGE
    path.write_text(page(sections(content, Path(out_dir))), encoding="utf-8")
    return path
