"""The report's plots, one PNG per (model, task) and kind, from the table ``load_records`` builds.

* ``score_vs_kv_ratio__<model>__<task>.png``: the task score against the measured fraction
  of the KV cache kept, one series per method (the accuracy / memory trade-off);
* ``latency__<model>__<task>.png``: mean prefill time and decode throughput per run;
* ``memory__<model>__<task>.png``: KV bytes stored vs a full cache, and peak memory, per run.

Figures are built with :class:`matplotlib.figure.Figure` (rendered by Agg on save), so
nothing here touches pyplot's global state or the backend a notebook has chosen.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch

MB = 2**20
FULL_METHOD = "full"


def _slug(text: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", str(text)).strip("-") or "x"


def _colors(methods: list[str]) -> dict[str, Any]:
    """One colour per method, the same in every figure of a report."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(methods) <= 10 else "tab20"]
    return {m: cmap(i % cmap.N) for i, m in enumerate(sorted(methods))}


def run_labels(group: pd.DataFrame) -> list[str]:
    """``"streamingllm r=0.2"`` / ``"streamingllm budget=256"`` per row; rows that would
    share a label get their full parameter string instead."""
    labels = []
    for row in group.itertuples():
        if not math.isnan(row.budget):
            labels.append(f"{row.method} budget={row.budget:g}")
        elif not math.isnan(row.ratio) and row.method != FULL_METHOD:
            labels.append(f"{row.method} r={row.ratio:g}")
        else:
            labels.append(str(row.method))
    for i, row in enumerate(group.itertuples()):
        if labels.count(labels[i]) > 1 and row.method_params:
            labels[i] = f"{row.method} ({row.method_params})"
    for i, label in enumerate(list(labels)):
        if labels.count(label) > 1:
            labels[i] = f"{label} #{labels[:i].count(label) + 1}"
    return labels


def _annotate(ax: Any, bars: Any, values: list[float], ys: list[float]) -> None:
    """Each bar's value at its end; "n/a" at zero where the run recorded none."""
    ax.bar_label(
        bars, labels=["" if math.isnan(v) else f"{v:.3g}" for v in values], padding=3, fontsize=8
    )
    for y, v in zip(ys, values, strict=True):
        if math.isnan(v):
            ax.text(0, y, " n/a", va="center", ha="left", fontsize=8, color="gray")


def _no_data(ax: Any, what: str) -> None:
    ax.text(
        0.5,
        0.5,
        f"no {what} recorded",
        ha="center",
        va="center",
        transform=ax.transAxes,
        color="gray",
    )


def plot_score_vs_kv_ratio(group: pd.DataFrame, colors: dict[str, Any]) -> Figure:
    """Score against measured KV ratio, one line (sorted by ratio) per method."""
    model, task = group["model"].iloc[0], group["task"].iloc[0]
    metric = group["metric"].dropna().iloc[0] if group["metric"].notna().any() else "score"
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    plotted = group.dropna(subset=["kv_ratio", "score"])
    for method, rows in plotted.groupby("method", sort=True):
        rows = rows.sort_values("kv_ratio")
        full = method == FULL_METHOD
        ax.plot(
            rows["kv_ratio"],
            rows["score"],
            marker="*" if full else "o",
            markersize=14 if full else 7,
            linestyle="-" if len(rows) > 1 else "none",
            color=colors[method],
            label=method,
        )
    full_scores = group.loc[group["method"] == FULL_METHOD, "score"].dropna()
    if len(full_scores):
        ax.axhline(
            full_scores.iloc[-1],
            color="gray",
            linestyle="--",
            linewidth=1,
            label="full-cache score",
        )
    if plotted.empty:
        _no_data(ax, "score with a measured KV ratio")
    labels = run_labels(group)
    missing = [
        lab for lab, idx in zip(labels, group.index, strict=True) if idx not in plotted.index
    ]
    if missing:
        ax.annotate(
            f"not shown (no score or KV ratio): {', '.join(missing)}",
            (0, 0),
            xytext=(4, 4),
            xycoords="axes fraction",
            textcoords="offset points",
            fontsize=8,
            color="gray",
        )
    ax.set_xlim(0, 1.05)
    ax.set_xlabel("KV cache kept (stored / full-cache bytes after prefill, measured)")
    ax.set_ylabel(f"{metric} (task score)")
    ax.set_title(f"{model} · {task}: {metric} vs KV cache kept")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(title="method", loc="best")
    return fig


def _barh(
    ax: Any, labels: list[str], values: list[float], colors: list[Any], xlabel: str, what: str
) -> None:
    bars = ax.barh(labels, values, color=colors)
    _annotate(ax, bars, values, list(range(len(values))))
    ax.set_xlabel(xlabel)
    ax.margins(x=0.15)
    ax.grid(True, axis="x", alpha=0.3)
    if all(math.isnan(v) for v in values):
        _no_data(ax, what)


def _height(n: int) -> float:
    return 1.8 + 0.45 * n


def _method_legend(
    fig: Figure, group: pd.DataFrame, colors: dict[str, Any], extra: list[Patch] | None = None
) -> None:
    methods = sorted(group["method"].unique())
    handles = [Patch(color=colors[m], label=m) for m in methods] + (extra or [])
    fig.legend(
        handles=handles, title="method", loc="outside lower center", ncols=min(len(handles), 5)
    )


def plot_latency(group: pd.DataFrame, colors: dict[str, Any]) -> Figure:
    """Mean prefill time per request and decode throughput, one bar per run."""
    model, task = group["model"].iloc[0], group["task"].iloc[0]
    labels = run_labels(group)
    bar_colors = [colors[m] for m in group["method"]]
    fig = Figure(figsize=(11, _height(len(group))), layout="constrained")
    left, right = fig.subplots(1, 2, sharey=True)
    _barh(
        left,
        labels,
        group["prefill_ms"].tolist(),
        bar_colors,
        "prefill time per request, mean (ms)",
        "prefill time",
    )
    _barh(
        right,
        labels,
        group["decode_tok_s"].tolist(),
        bar_colors,
        "decode throughput (tokens/s)",
        "decode throughput",
    )
    left.invert_yaxis()  # shared y axis: the first run on top
    left.set_title("prefill (lower is better)")
    right.set_title("decode (higher is better)")
    fig.suptitle(f"{model} · {task}: latency per run")
    _method_legend(fig, group, colors)
    return fig


def plot_memory(group: pd.DataFrame, colors: dict[str, Any]) -> Figure:
    """KV cache stored vs a full cache (mean per request, after prefill), and peak memory."""
    model, task = group["model"].iloc[0], group["task"].iloc[0]
    labels = run_labels(group)
    fig = Figure(figsize=(11, _height(len(group))), layout="constrained")
    left, right = fig.subplots(1, 2, sharey=True)
    y = list(range(len(group)))
    stored = (group["kv_bytes_stored"] / MB).tolist()
    full = (group["kv_bytes_full"] / MB).tolist()
    h = 0.4
    y_full, y_stored = [i - h / 2 for i in y], [i + h / 2 for i in y]
    bars_full = left.barh(y_full, full, height=h, color="lightgray", edgecolor="gray")
    bars_stored = left.barh(y_stored, stored, height=h, color=[colors[m] for m in group["method"]])
    _annotate(left, bars_full, full, y_full)
    _annotate(left, bars_stored, stored, y_stored)
    left.set_yticks(y, labels)
    left.invert_yaxis()
    left.margins(x=0.15)
    left.grid(True, axis="x", alpha=0.3)
    left.set_xlabel("KV cache per request after prefill, mean (MB)")
    left.set_title("KV cache: stored (method colour) vs full cache (grey)")
    if all(math.isnan(v) for v in stored + full):
        _no_data(left, "KV bytes")
    peak = group["peak_mem_mb"].tolist()
    bars = right.barh(y, peak, color=[colors[m] for m in group["method"]])
    _annotate(right, bars, peak, y)
    right.margins(x=0.15)
    right.grid(True, axis="x", alpha=0.3)
    right.set_xlabel("peak memory over the run (MB)")
    right.set_title("peak memory")
    if all(math.isnan(v) for v in peak):
        _no_data(right, "peak memory")
    fig.suptitle(f"{model} · {task}: memory per run")
    _method_legend(
        fig,
        group,
        colors,
        [Patch(facecolor="lightgray", edgecolor="gray", label="full cache (KV)")],
    )
    return fig


PLOTS = {
    "score_vs_kv_ratio": plot_score_vs_kv_ratio,
    "latency": plot_latency,
    "memory": plot_memory,
}


def write_plots(table: pd.DataFrame, out_dir: Path) -> dict[str, Path]:
    """Every plot for every (model, task) in ``table`` as PNG files in ``out_dir``;
    returns ``{file stem: path}``."""
    paths: dict[str, Path] = {}
    if table.empty:
        return paths
    colors = _colors(list(table["method"].unique()))
    for (model, task), group in table.groupby(["model", "task"], sort=True):
        group = group.reset_index(drop=True)
        for kind, plot in PLOTS.items():
            stem = f"{kind}__{_slug(model)}__{_slug(task)}"
            fig = plot(group, colors)
            paths[stem] = Path(out_dir) / f"{stem}.png"
            fig.savefig(paths[stem], dpi=120)
    return paths
