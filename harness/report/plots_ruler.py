"""RULER in the report: which needles each method still finds, read from the records' samples.

Every RULER sample in a record carries its target length, the needle's requested depth (or
its measured depth where lm-eval places needles at random), where the needle sat in tokens,
and lm-eval's score (``passed``: every expected value found). From those:

* ``ruler_heatmap__<model>__<task>.png``: one panel per run, needle depth (rows) x length
  (columns), each cell the share of its samples passed, with ``k/n`` written in it (only the
  samples with a needle: none for ``cwe`` and ``fwe``, whose runs get no heatmap);
* ``ruler_accuracy__<model>__<task>.png``: one panel per length, the share passed against
  the KV cache kept at that length (measured from the samples' own requests), one line per
  method, with 95 % Wilson intervals (:func:`harness.report.stats.wilson`, the same rule as
  the main table's);
* ``ruler_summary.csv`` (and a table in ``report.md``): per run and length, n, passed and
  its interval, mid-depth (0.3-0.7) and edge passes (NaN without needles), measured KV ratio.

Only records are read (``runs["path"]``); nothing from ``methods``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from harness.records import read_record
from harness.report.plot_common import (
    DODGE,
    FULL_METHOD,
    dodge,
    method_colors,
    run_labels,
    series_names,
    set_fraction_axis,
)
from harness.report.stats import wilson
from harness.report.summary import TERMINAL_WIDTH, compact_table
from harness.report.tables import fmt, fmt_interval

RULER_TITLES = {
    "ruler_heatmap": "RULER: needles found by depth and length",
    "ruler_accuracy": "RULER: samples passed vs KV cache kept, per length",
}
DEPTH_BINS = 5  # measured depths (random placement) are shown in fifths: 0.1, 0.3, ..., 0.9
MID_DEPTHS = (0.3, 0.7)


def depth_bin(depth: Any, needle_depth: Any) -> float:
    """The heatmap row of a sample: its requested depth, else the centre of the fifth of
    the prompt its needle sat in; NaN without either."""
    if isinstance(depth, int | float) and not isinstance(depth, bool):
        return float(depth)
    if isinstance(needle_depth, int | float) and not isinstance(needle_depth, bool):
        fifth = min(int(float(needle_depth) * DEPTH_BINS), DEPTH_BINS - 1)
        return round((fifth + 0.5) / DEPTH_BINS, 2)
    return math.nan


def sample_rows(record: dict[str, Any], label: str = "") -> list[dict[str, Any]]:
    """One row per RULER sample of ``record`` (none for other tasks)."""
    rows = []
    for sample in record.get("samples") or []:
        doc = sample.get("doc") or {}
        metrics = sample.get("metrics") or {}
        if "max_length" not in doc or "score" not in metrics:
            continue
        requests = sample.get("requests") or []
        rows.append(
            {
                "run_id": record["run_id"],
                "model": record["model"]["name"],
                "task": record["task"]["name"],
                "method": record["method"]["name"],
                "label": label,
                "lm_eval_task": sample.get("task"),
                "length": int(doc["max_length"]),
                "depth": depth_bin(doc.get("depth"), doc.get("needle_depth")),
                "needle_position": doc.get("needle_position"),
                "score": float(metrics["score"]),
                "passed": float(metrics.get("passed", float(metrics["score"] == 1.0))),
                "kv_bytes": sum(r.get("kv_bytes_prefill") or 0 for r in requests),
                "kv_full_bytes": sum(r.get("kv_full_bytes_prefill") or 0 for r in requests),
            }
        )
    return rows


def sample_table(runs: pd.DataFrame) -> pd.DataFrame:
    """The RULER samples of every run in ``runs`` (read from the records at ``runs.path``),
    labelled as the other plots label runs."""
    rows: list[dict[str, Any]] = []
    for (_, _), group in runs.groupby(["model", "task"], sort=True):
        names = series_names(group)
        for path, label, line in zip(group["path"], run_labels(group), names, strict=True):
            rows += [{**row, "series": line} for row in sample_rows(read_record(Path(path)), label)]
    return pd.DataFrame(rows)


def heatmap_cells(samples: pd.DataFrame) -> tuple[list[float], list[int], np.ndarray, np.ndarray]:
    """(depths, lengths, share passed [depth, length], samples [depth, length]) of one run."""
    depths = sorted(samples["depth"].dropna().unique())
    lengths = sorted(samples["length"].unique())
    share = np.full((len(depths), len(lengths)), np.nan)
    count = np.zeros((len(depths), len(lengths)), dtype=int)
    for (depth, length), cell in samples.groupby(["depth", "length"]):
        i, j = depths.index(depth), lengths.index(length)
        share[i, j], count[i, j] = cell["passed"].mean(), len(cell)
    return depths, lengths, share, count


def summary(samples: pd.DataFrame) -> pd.DataFrame:
    """Per run and length (and ``all``): n, share passed with its 95 % interval, the shares
    at mid depths (0.3-0.7) and at the edges, lm-eval's mean score, measured KV ratio."""
    rows = []
    if samples.empty:
        return pd.DataFrame(rows)
    for (model, task, label), run in samples.groupby(["model", "task", "label"], sort=True):
        line = run["series"].iloc[0] if "series" in run else run["method"].iloc[0]
        for length, part in [*run.groupby("length"), ("all", run)]:
            low, high = wilson(part["passed"].mean(), len(part))
            mid = part[part["depth"].between(*MID_DEPTHS)]
            edge = part[part["depth"].notna() & ~part["depth"].between(*MID_DEPTHS)]
            rows.append(
                {
                    "model": model,
                    "task": task,
                    "run": label,
                    "method": run["method"].iloc[0],
                    "series": line,
                    "length": length,
                    "n": len(part),
                    "passed": part["passed"].mean(),
                    "passed_low": low,
                    "passed_high": high,
                    "passed_mid_depth": mid["passed"].mean() if len(mid) else math.nan,
                    "passed_edges": edge["passed"].mean() if len(edge) else math.nan,
                    "score": part["score"].mean(),
                    "kv_ratio": _kv_ratio(part),
                }
            )
    return pd.DataFrame(rows)


def _kv_ratio(part: pd.DataFrame) -> float:
    full = part["kv_full_bytes"].sum()
    return float(part["kv_bytes"].sum() / full) if full else math.nan


def plot_heatmaps(group: pd.DataFrame) -> Figure | None:
    """Needle heatmaps of every run of one (model, task), a panel each; None when no sample
    has a needle (cwe, fwe), whose share passed per length is in the accuracy plot."""
    samples = sample_table(group)
    if samples.empty or samples["depth"].isna().all():
        return None
    samples = samples[samples["depth"].notna()]
    model, task = group["model"].iloc[0], group["task"].iloc[0]
    runs = list(samples.groupby("label", sort=False))
    runs.sort(key=lambda item: (item[1]["method"].iloc[0] != FULL_METHOD, -_kv_ratio(item[1])))
    cols = min(len(runs), 4)
    rows = math.ceil(len(runs) / cols)
    fig = Figure(figsize=(3.3 * cols + 1.2, 2.9 * rows + 0.8), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    image = None
    for ax, (label, run) in zip(axes.flat, runs, strict=False):
        depths, lengths, share, count = heatmap_cells(run)
        image = ax.imshow(share, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if count[i, j]:
                    passed = round(share[i, j] * count[i, j])
                    dark = not 0.2 <= share[i, j] <= 0.8
                    ax.text(
                        j,
                        i,
                        f"{passed}/{count[i, j]}",
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if dark else "black",
                    )
        ax.set_xticks(range(len(lengths)), [f"{n:,}" for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(
            f"{label}\nKV kept {_kv_ratio(run):.2f}, passed {run['passed'].mean():.0%}", fontsize=9
        )
    for ax in list(axes.flat)[len(runs) :]:
        ax.set_visible(False)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="share of samples passed")
    fig.suptitle(f"{model} · {task}: needle found, by depth and length")
    return fig


def plot_accuracy_vs_kv(group: pd.DataFrame) -> Figure | None:
    """Share passed against measured KV kept, one panel per length, one line per method."""
    table = summary(sample_table(group))
    if table.empty:
        return None
    table = table[table["length"] != "all"]
    model, task = group["model"].iloc[0], group["task"].iloc[0]
    lengths = sorted(table["length"].unique())
    fig = Figure(figsize=(4.2 * len(lengths) + 1.5, 4), layout="constrained")
    axes = fig.subplots(1, len(lengths), squeeze=False, sharey=True)[0]
    colors = method_colors(list(table["method"].unique()))
    lines = sorted(table["series"].unique())
    for ax, length in zip(axes, lengths, strict=True):
        for name, rows in table[table["length"] == length].groupby("series", sort=True):
            rows = rows.sort_values("kv_ratio")
            method = rows["method"].iloc[0]
            full = method == FULL_METHOD
            # series at one ratio side by side (±DODGE), so that neither hides the other
            shift = dodge(lines.index(name), len(lines))
            ax.errorbar(
                rows["kv_ratio"] + shift,
                rows["passed"],
                yerr=[rows["passed"] - rows["passed_low"], rows["passed_high"] - rows["passed"]],
                marker="*" if full else "o",
                markersize=12 if full else 6,
                capsize=3,
                color=colors[method],
                label=name,
            )
        counts = table.loc[table["length"] == length, "n"]
        n = f"{counts.min()}" if counts.min() == counts.max() else f"{counts.min()}-{counts.max()}"
        ax.set_title(f"{length:,} tokens (n = {n} per run)")
        ax.set_xlabel("KV cache kept (measured fraction)")
        ax.set_xlim(0, 1.05)
        set_fraction_axis(ax)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("share of samples passed (95 % Wilson interval)")
    entries: dict[str, Any] = {}  # every series, also one missing at the last length
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    axes[-1].legend(
        list(entries.values()),
        list(entries),
        title="method",
        fontsize=8,
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
    )
    fig.suptitle(
        f"{model} · {task}: samples passed vs KV cache kept\n"
        f"(methods at one ratio drawn up to ±{DODGE:g} apart)"
    )
    return fig


RULER_PLOTS = {"ruler_heatmap": plot_heatmaps, "ruler_accuracy": plot_accuracy_vs_kv}


def terminal_markdown(table: pd.DataFrame) -> str:
    """The :func:`summary` table (``ruler_summary.csv``) for the terminal: per model and task,
    one row per run and length with the share passed and its interval (the same Wilson
    interval as every table), at most :data:`harness.report.summary.TERMINAL_WIDTH` wide."""
    parts = []
    for (model, task), rows in table.groupby(["model", "task"], sort=False):
        passed = zip(rows["passed"], rows["passed_low"], rows["passed_high"], strict=True)
        cells = {
            "run": [str(v) for v in rows["run"]],
            "length": [str(v) for v in rows["length"]],
            "n": [str(v) for v in rows["n"]],
            "passed [95% CI]": [fmt_interval(p, lo, hi, 3) for p, lo, hi in passed],
            "mid depths": [fmt(float(v), 3) for v in rows["passed_mid_depth"]],
            "KV kept": [fmt(float(v), 2) for v in rows["kv_ratio"]],
        }
        text, left_out = compact_table(cells, TERMINAL_WIDTH)
        note = f" ({', '.join(left_out)}: in ruler_summary.csv)" if left_out else ""
        parts.append(f"{model} · {task} · share of samples passed{note}\n\n{text}")
    return "\n\n".join(parts)


def write_summary(runs: pd.DataFrame, out_dir: Path) -> tuple[Path | None, pd.DataFrame]:
    """``ruler_summary.csv`` over every RULER run in ``runs`` (None when there is none)."""
    table = summary(sample_table(runs)) if not runs.empty else pd.DataFrame()
    if table.empty:
        return None, table
    path = Path(out_dir) / "ruler_summary.csv"
    table.to_csv(path, index=False)
    return path, table
