"""The ``kvbench-report`` command: every finished record under a folder, in one table.

    kvbench-report results/                  # writes results/report/{report.csv,.parquet,.md,*.png}
                                             # and results/report/index.html (one page)
    kvbench-report results/ --out /tmp/rep

One row per run (model x method x task): the task's score, the KV bytes actually stored
against what a full cache holds, prefill and decode speed, peak memory, provenance, and
fidelity against the full-cache run of the same model, task and slice (``reference``,
``score_delta``, ``exact_match``, ``token_f1``, ``nll_increase``; see
:mod:`harness.report.fidelity`). A record that cannot be read is listed and skipped, never fatal.
``report.md`` holds the summary (the terminal's compact one, then every column of it; see
:mod:`harness.report.summary`), the best score of each method at each measured KV ratio,
and embeds the plots (:mod:`harness.report.plots`, :mod:`harness.report.plots_context`,
:mod:`harness.report.plots_methods`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from harness import record_schema
from harness.records import find_records, read_record
from harness.report import fidelity, html_page, plots_ruler
from harness.report.consistency import code_warnings, pairing_warnings
from harness.report.labels import label_runs
from harness.report.leaderboard import leaderboard, write_leaderboard
from harness.report.summary import (
    DETAIL_COLUMNS,
    STATISTICS_NOTE,
    details_markdown,
    details_table,
    summary_markdown,
)
from harness.report.tables import (
    PERCENTILE_COLUMNS,
    best_by_kv_ratio,
    check,
    distinguishing_params,
    format_params,
    markdown,
    request_percentiles,
    request_rows,
    run_row,
)

__all__ = [
    "Report",
    "best_by_kv_ratio",
    "details_markdown",
    "distinguishing_params",
    "format_params",
    "load_records",
    "load_report",
    "main",
    "summary_markdown",
    "write_report",
]

COLUMNS = [
    "run_id",
    "model",
    "method",
    "label",
    "kinds",
    "method_params",
    "ratio",
    "budget",
    "prompt_kept",
    "d_qk",
    "d_vo",
    "trained",
    "task",
    "metric",
    "metric_name",
    "score",
    "score_lo",
    "score_hi",
    "score_n",
    "score_ci",
    "task_settings",
    *fidelity.FIDELITY_COLUMNS,
    "perplexity",
    "n_samples",
    "limit",
    "kv_bytes_stored",
    "kv_bytes_full",
    "kv_ratio_requested",
    "kv_bytes_allocated",
    "kv_ratio",
    "kv_ratio_reachable",
    "kv_ratio_final",
    "prompt_tokens",
    "prompt_ratio",
    "truncated_ratio",
    "prefill_ms",
    "decode_tok_s",
    "peak_mem_mb",
    "peak_rise_mb",
    "peak_mem_kind",
    *[f"{c}_p{q}" for c in PERCENTILE_COLUMNS for q in (50, 95)],
    "num_layers",
    "wall_s",
    "device",
    "dtype",
    "git_commit",
    "method_code",
    "harness_code",
    "data_hash",
    "finished_at",
    "params_json",
    "describe_json",
    "stats_json",
    "path",
]
LEADERBOARD_CSV = "leaderboard.csv"
SORT_BY = ["model", "task", "method", "ratio", "prompt_kept", "d_qk", "d_vo"]
HIDDEN_IN_MARKDOWN = ("path", "params_json", "describe_json", "stats_json", "task_settings")


@dataclass
class Report:
    """Everything the report shows: ``runs`` (one row per run, :data:`COLUMNS`),
    ``requests`` (one row per measured request) and ``skipped`` ``(path, reason)`` pairs."""

    runs: pd.DataFrame
    requests: pd.DataFrame
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    found: int = 0
    warnings: list[str] = field(default_factory=list)
    # per run (by path): the per-sample values the leaderboard pairs runs on
    inputs: dict[str, fidelity.FidelityInputs] = field(default_factory=dict)


def load_report(root: Path) -> Report:
    """Read every finished record under ``root``; skip (and list) the ones that cannot be
    reported: unreadable JSON, another schema_version, missing keys, malformed fields."""
    rows, requests, skipped, inputs = [], [], [], {}
    paths = find_records(Path(root))
    kept: dict[str, list[Path]] = {}  # run id -> its record files, the one reported first
    for path in sorted(paths, key=lambda p: (len(p.parts), p)):  # a copy deeper down loses
        try:
            record = read_record(path)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            skipped.append((path, f"unreadable: {exc}"))
            continue
        reason = check(record) or record_schema.problem(record, path.parent.name)
        if reason is None and record["run_id"] in kept:
            kept[record["run_id"]].append(path)
            continue
        if reason is None:
            try:
                row = run_row(record, str(path))
                runs_requests = request_rows(record, row)
                row |= request_percentiles(runs_requests)
                summary = fidelity.summarize(record)
            except (TypeError, KeyError, AttributeError, ValueError) as exc:
                reason = f"malformed: {exc!r}"
        if reason is not None:
            skipped.append((path, reason))
            continue
        rows.append(row)
        requests.extend(runs_requests)
        inputs[str(path)] = summary
        kept[record["run_id"]] = [path]
    base = [c for c in COLUMNS if c not in fidelity.FIDELITY_COLUMNS]
    table = fidelity.add_fidelity(pd.DataFrame(rows, columns=base), inputs)
    table = table[COLUMNS].sort_values(SORT_BY, na_position="last", kind="stable")
    table["label"] = label_runs(table)
    warnings = code_warnings(table) + pairing_warnings(table) + _duplicate_warnings(kept)
    return Report(
        table.reset_index(drop=True), pd.DataFrame(requests), skipped, len(paths), warnings, inputs
    )


def _duplicate_warnings(kept: dict[str, list[Path]]) -> list[str]:
    """One warning per run id found in more than one folder: the first is reported."""
    return [
        f"run {run_id} is recorded {len(found)} times: reported {found[0]}, skipped the "
        f"copies {', '.join(str(p) for p in found[1:])}"
        for run_id, found in kept.items()
        if len(found) > 1
    ]


def load_records(root: Path) -> tuple[pd.DataFrame, list[tuple[Path, str]]]:
    """One row per finished run under ``root`` and the ``(path, reason)`` of every record
    skipped (see :func:`load_report`)."""
    report = load_report(root)
    return report.runs, report.skipped


def _plots_markdown(plots: dict[str, Path]) -> str:
    """The plots as ``![title](file.png)`` images, one section per (model, task)."""
    from harness.report.plots import PLOT_TITLES

    sections: dict[str, list[str]] = {}
    for stem, path in plots.items():
        kind, _, where = stem.partition("__")
        heading = where.replace("__", " · ") or "all runs"
        title = PLOT_TITLES.get(kind, kind)
        sections.setdefault(heading, []).append(f"![{title} ({heading})]({path.name})")
    return "\n\n".join(
        f"### {heading}\n\n" + "\n\n".join(images) for heading, images in sections.items()
    )


def report_markdown(
    table: pd.DataFrame, plots: dict[str, Path], skipped: list[tuple[Path, str]]
) -> str:
    """``report.md``: summary, best score per KV ratio, embedded plots, skipped records and
    every column."""
    warnings = code_warnings(table) + pairing_warnings(table)
    parts = [
        "# kvbench report",
        f"{len(table)} run(s), {len(skipped)} record(s) skipped, {len(warnings)} warning(s).",
        STATISTICS_NOTE,
    ]
    if warnings:
        parts += ["## Warnings", "\n".join(f"- {w}" for w in warnings)]
    parts += [
        "## Summary",
        summary_markdown(table),
        "## Details",
        details_markdown(table),
        "## Best score per method at each measured KV ratio",
        markdown(best_by_kv_ratio(table)),
    ]
    if plots:
        parts += ["## Plots", _plots_markdown(plots)]
    if skipped:
        parts += ["## Skipped records", "\n".join(f"- `{p}`: {why}" for p, why in skipped)]
    shown = [c for c in table.columns if c not in HIDDEN_IN_MARKDOWN]
    parts += ["## All columns", markdown(table, shown)]
    return "\n\n".join(parts) + "\n"


def write_report(
    table: pd.DataFrame,
    out_dir: Path,
    requests: pd.DataFrame | None = None,
    skipped: list[tuple[Path, str]] | None = None,
    inputs: dict[str, fidelity.FidelityInputs] | None = None,
) -> dict[str, Path]:
    """Write ``report.csv``, ``report.parquet``, ``summary_by_kv_ratio.csv``, ``report.md``,
    the plots, ``leaderboard.csv``/``.md`` (from ``inputs``, :attr:`Report.inputs`, where a
    run has a full-cache reference) and ``index.html`` (all of it on one page) into
    ``out_dir``; returns ``{kind: path}`` (plots keyed by file stem)."""
    from harness.report.plots import write_plots

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {kind: out_dir / f"report.{kind}" for kind in ("csv", "parquet", "md")}
    table.to_csv(paths["csv"], index=False)
    table.to_parquet(paths["parquet"], index=False)
    paths["by_kv_ratio"] = out_dir / "summary_by_kv_ratio.csv"
    best_by_kv_ratio(table).to_csv(paths["by_kv_ratio"], index=False)
    plots = write_plots(table, out_dir, requests)
    ruler_path, ruler_table = plots_ruler.write_summary(table, out_dir)
    text = report_markdown(table, plots, skipped or [])
    if ruler_path is not None:
        paths["ruler_summary"] = ruler_path
        text += "\n## RULER: share of samples passed per run and length\n\n"
        text += markdown(ruler_table) + "\n"
    paths["md"].write_text(text)
    (out_dir / LEADERBOARD_CSV).unlink(missing_ok=True)  # never a stale one on the page
    if inputs:
        paths |= write_leaderboard(leaderboard(table, inputs), out_dir)
    paths["html"] = html_page.write_html(out_dir, _page(table, plots, ruler_table, skipped or []))
    paths.update(plots)
    return paths


def _page(
    table: pd.DataFrame,
    plots: dict[str, Path],
    ruler: pd.DataFrame,
    skipped: list[tuple[Path, str]],
) -> html_page.Content:
    """What ``index.html`` shows: the same tables and plots as ``report.md``."""
    tables = {"RULER: share of samples passed per run and length": ruler} if len(ruler) else {}
    shown = [c for c in table.columns if c not in HIDDEN_IN_MARKDOWN]
    return html_page.Content(
        summary=details_table(table),
        columns=DETAIL_COLUMNS,
        plots=plots,
        overview={"Best score per method at each measured KV ratio": best_by_kv_ratio(table)},
        tables=tables,
        all_columns=table[["path", *shown]].rename(columns={"path": html_page.RECORD_COLUMN}),
        notes=[STATISTICS_NOTE],
        warnings=code_warnings(table) + pairing_warnings(table),
        skipped=skipped,
    )


def _explain_empty(root: Path, report: Report) -> str:
    if report.found:
        return (
            f"kvbench-report: none of the {report.found} record(s) under {root} could be "
            "reported (reasons above)"
        )
    files = (p for p in root.rglob("*") if p.is_file() and p.parent.name != "report")
    others = sum(1 for _ in itertools.islice(files, 1000))
    what = (
        f"it holds {others}{'+' if others == 1000 else ''} other file(s), "
        if others
        else "it is empty, "
    )
    return (
        f"kvbench-report: no finished record (<run>/record.json) under {root}: {what}"
        "not a kvbench results folder? Runs write <results_dir>/<model>__<task>__<method>__<hash>/"
        "record.json"
    )


def main(argv: list[str] | None = None) -> int:
    """``kvbench-report DIR [--out OUT]``: 0 when at least one run is reported, 1 otherwise."""
    parser = argparse.ArgumentParser(
        prog="kvbench-report",
        description="Read every finished kvbench record under DIR into one table; write "
        "CSV, parquet, markdown, PNG plots and one HTML page (index.html).",
    )
    parser.add_argument("dir", type=Path, help="results folder (searched recursively)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (DIR/report)")
    args = parser.parse_args(argv)
    if not args.dir.is_dir():
        print(f"kvbench-report: {args.dir} is not a directory", file=sys.stderr)
        return 1
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        print(
            f"kvbench-report: --out {args.out} is a file, not a folder: pass a folder for the "
            "report's files",
            file=sys.stderr,
        )
        return 1
    report = load_report(args.dir)
    for path, reason in report.skipped:
        print(f"kvbench-report: skipped {path}: {reason}", file=sys.stderr)
    for warning in report.warnings:
        print(f"kvbench-report: warning: {warning}", file=sys.stderr)
    if report.runs.empty:
        print(_explain_empty(args.dir, report), file=sys.stderr)
        return 1
    out = args.out or args.dir / "report"
    try:
        paths = write_report(report.runs, out, report.requests, report.skipped, report.inputs)
    except OSError as exc:  # a full disk, a folder that cannot be written
        print(f"kvbench-report: cannot write the report into {out}: {exc}", file=sys.stderr)
        return 1
    print(summary_markdown(report.runs))
    print(f"\n{len(report.runs)} run(s), {len(report.skipped)} skipped")
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
