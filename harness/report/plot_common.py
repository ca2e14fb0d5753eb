"""Helpers shared by the report's plot modules: one colour per method, run labels and metric
words (:mod:`harness.report.labels`), the "no data" note, whiskers, and the layout checks the
tests run on every figure (:func:`layout_problems`)."""

from __future__ import annotations

import json
import math
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from harness.report.labels import (
    differing,
    metric_name,
    metric_words,
    run_label,
    run_labels,
    setting_words,
    sliding_suffix,
    trained_suffix,
)
from harness.report.stats import UNIT, metric_range

__all__ = [
    "DODGE",
    "FRACTION_LIMITS",
    "FULL_METHOD",
    "MB",
    "dodge",
    "errors",
    "is_bounded",
    "method_colors",
    "metric_name",
    "metric_words",
    "n_text",
    "no_data",
    "run_label",
    "run_labels",
    "series",
    "series_names",
    "set_fraction_axis",
    "sliding_suffix",
    "trained_suffix",
    "wrapped",
]

MB = 2**20
FULL_METHOD = "full"
# a fraction's axis: [0, 1] with room for the markers drawn at 0 and 1 (a star at 1.0 half
# cut off by the axes' edge reads as a different value)
FRACTION_LIMITS = (-0.05, 1.05)
DODGE = 0.01  # horizontal spread of the methods' points at one KV ratio


def method_colors(methods: list[str]) -> dict[str, Any]:
    """One colour per method, the same in every figure of a report."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(methods) <= 10 else "tab20"]
    return {m: cmap(i % cmap.N) for i, m in enumerate(sorted(methods))}


def series_names(rows: pd.DataFrame) -> pd.Series:
    """Per run, the line it is drawn on in a plot against the KV ratio: one line per method
    and task settings (runs over other lengths, samples or slices are never joined), named by
    the method, with the settings that tell its lines apart where it has several (``"full [3
    per length]"``, as its runs' labels say)."""
    out = pd.Series("", index=rows.index, dtype=object)
    settings = rows["task_settings"] if "task_settings" in rows else pd.Series("", rows.index)
    for method, part in rows.groupby("method", sort=True):
        groups = list(part.groupby(settings[part.index], sort=False))
        parsed = [json.loads(text) if text else {} for text, _ in groups]
        keys = differing(parsed)
        for values, (_, members) in zip(parsed, groups, strict=True):
            words = setting_words(values, keys) if len(groups) > 1 else ""
            out[members.index] = f"{method} [{words}]" if words else str(method)
    return out


def series(rows: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """``rows`` split into the lines of :func:`series_names`, in method order."""
    names = series_names(rows)
    order = rows.assign(_series=names).sort_values(["method", "_series"], kind="stable")
    return [(name, rows.loc[part.index]) for name, part in order.groupby("_series", sort=False)]


def no_data(ax: Any, what: str) -> None:
    """A grey "no ... recorded" in the middle of ``ax``."""
    ax.text(
        0.5,
        0.5,
        f"no {what} recorded",
        ha="center",
        va="center",
        transform=ax.transAxes,
        color="gray",
    )


def wrapped(text: str, width: int) -> str:
    """``text`` broken into lines of at most ``width`` characters (a subtitle that fits its
    figure instead of running past its edge)."""
    import textwrap

    return "\n".join(textwrap.fill(line, width) for line in text.split("\n"))


def dodge(rank: int, count: int, spread: float = DODGE) -> float:
    """The offset of the ``rank``-th of ``count`` series drawn side by side: evenly spaced in
    [-spread, spread] (0 for a single series), so that series at one x stay visible."""
    return spread * (2 * rank / (count - 1) - 1) if count > 1 else 0.0


def set_fraction_axis(ax: Any, axis: str = "y") -> None:
    """Draw ``axis`` of ``ax`` on [0, 1] with ticks 0, 0.2, ..., 1 and room at both ends."""
    ticks = [i / 5 for i in range(6)]
    if axis == "y":
        ax.set_ylim(*FRACTION_LIMITS)
        ax.set_yticks(ticks)
    else:
        ax.set_xlim(*FRACTION_LIMITS)
        ax.set_xticks(ticks)


def is_bounded(metric: str | None) -> bool:
    """Whether the metric is a fraction in [0, 1] (:func:`harness.report.stats.metric_range`)."""
    return metric_range(metric) == UNIT


def errors(values: pd.Series, lo: pd.Series, hi: pd.Series) -> list[list[float]]:
    """matplotlib's ``yerr``/``xerr`` (distances below and above) from an interval; 0 where
    the interval is unknown (no whisker rather than a wrong one)."""
    below = (values - lo).clip(lower=0).fillna(0.0)
    above = (hi - values).clip(lower=0).fillna(0.0)
    return [below.tolist(), above.tolist()]


def n_text(group: pd.DataFrame, column: str = "score_n") -> str:
    """``"n = 2 samples per run"`` or ``"n = 2-5 samples per run"``."""
    values = group[column].dropna() if column in group else pd.Series(dtype=float)
    if values.empty:
        values = group["n_samples"].dropna() if "n_samples" in group else values
    if values.empty:
        return "n unknown"
    lo, hi = int(values.min()), int(values.max())
    return f"n = {lo} samples per run" if lo == hi else f"n = {lo}-{hi} samples per run"


def _outside_legend(ax: Any, title: str) -> None:
    """The legend to the right of the axes, never over the data."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(title=title, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)


def plot_vs_kv_ratio(
    group: pd.DataFrame,
    colors: dict[str, Any],
    column: str,
    ylabel: str,
    what: str,
    bounded: bool = True,
) -> Figure:
    """``column`` against the measured KV ratio with its 95 % interval (``<column>_lo`` /
    ``_hi`` where the table has them), one line (sorted by ratio) per method, the Pareto
    front of all runs dotted, the full-cache value dashed; n in the subtitle. A fraction is
    drawn on [0, 1] with room for the markers at its ends."""
    model, task = group["model"].iloc[0], group["task"].iloc[0]
    fig = Figure(figsize=(8.5, 4.8), layout="constrained")
    ax = fig.add_subplot()
    plotted = group.dropna(subset=["kv_ratio", column])
    lo, hi = f"{column}_lo", f"{column}_hi"
    lines = series(plotted)
    for rank, (name, rows) in enumerate(lines):
        rows = rows.sort_values("kv_ratio")
        method = rows["method"].iloc[0]
        full = method == FULL_METHOD
        yerr = errors(rows[column], rows[lo], rows[hi]) if lo in rows else None
        # series measured at the same ratio are drawn side by side (at most ±DODGE apart)
        # so that their intervals stay apart
        ax.errorbar(
            rows["kv_ratio"] + dodge(rank, len(lines)),
            rows[column],
            yerr=yerr,
            marker="*" if full else "o",
            markersize=14 if full else 7,
            linestyle="-" if len(rows) > 1 else "none",
            color=colors[method],
            capsize=3,
            label=name,
        )
    front = pareto_front(plotted, "kv_ratio", column) if len(plotted) > 1 else plotted
    if len(front) > 1:
        ax.step(
            front["kv_ratio"],
            front[column],
            where="post",
            color="black",
            linestyle=":",
            linewidth=1,
            label="Pareto front",
        )
    full_values = group.loc[group["method"] == FULL_METHOD, column].dropna()
    if len(full_values) and len(plotted) > 1:
        ax.axhline(
            full_values.iloc[-1], color="gray", linestyle="--", linewidth=1, label="full cache"
        )
    if plotted.empty:
        no_data(ax, f"{what} with a measured KV ratio")
    labels = run_labels(group)
    missing = [
        lab for lab, idx in zip(labels, group.index, strict=True) if idx not in plotted.index
    ]
    notes = [
        f"bars: 95 % interval (Wilson for pass/fail, bootstrap otherwise); {n_text(group)}; "
        f"methods at one ratio drawn up to ±{DODGE:g} apart"
    ]
    if missing and not plotted.empty:
        notes.append(f"not shown (no {what} or KV ratio): {', '.join(missing)}")
    ax.set_xlim(0, 1.05)
    if bounded:
        set_fraction_axis(ax)
    ax.set_xlabel("KV cache kept (measured fraction of the full cache's bytes after prefill)")
    ax.set_ylabel(ylabel)
    fig.suptitle(f"{model} · {task}: {what} vs KV cache kept")
    ax.set_title(wrapped("\n".join(notes), 95), fontsize=8, color="dimgray")
    ax.grid(True, alpha=0.3)
    _outside_legend(ax, "method")
    return fig


def pareto_front(points: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """The runs no other run beats on both axes (less KV kept and a higher ``y``), by ``x``."""
    front, best = [], -math.inf
    for _, row in points.sort_values([x, y], ascending=[True, False]).iterrows():
        if row[y] > best:
            front.append(row)
            best = row[y]
    return pd.DataFrame(front)
