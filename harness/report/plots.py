"""The report's plots, one PNG per (model, task) and kind, from the table ``load_report`` builds.

* ``score_vs_kv_ratio__<model>__<task>.png``: the task score against the measured fraction
  of the KV cache kept, one line per method, with the runs' Pareto front (the accuracy /
  memory trade-off);
* ``fidelity_vs_kv_ratio__<model>__<task>.png``: the same for the token F1 of the outputs
  against the full-cache run's (:mod:`harness.report.fidelity`);
* ``latency__<model>__<task>.png``: mean prefill time and decode throughput per run;
* ``memory__<model>__<task>.png``: KV bytes stored vs a full cache, and peak memory, per run;
* per request, against context length: :mod:`harness.report.plots_context`;
* SpindleKV's per-layer budgets and KV-Latent's head dim: :mod:`harness.report.plots_methods`;
* RULER's needle heatmaps and needles found vs KV kept: :mod:`harness.report.plots_ruler`.

Figures are built with :class:`matplotlib.figure.Figure` (rendered by Agg on save), so
nothing here touches pyplot's global state or the backend a notebook has chosen.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from harness.records import slug
from harness.report.plot_common import FULL_METHOD, MB, method_colors, no_data, run_labels
from harness.report.plots_context import CONTEXT_TITLES, has_context, plot_context
from harness.report.plots_methods import METHOD_PLOTS, METHOD_TITLES
from harness.report.plots_ruler import RULER_PLOTS, RULER_TITLES

log = logging.getLogger("kvbench")


def _annotate(ax: Any, bars: Any, values: list[float], ys: list[float]) -> None:
    """Each bar's value at its end; "n/a" at zero where the run recorded none."""
    ax.bar_label(
        bars, labels=["" if math.isnan(v) else f"{v:.3g}" for v in values], padding=3, fontsize=8
    )
    for y, v in zip(ys, values, strict=True):
        if math.isnan(v):
            ax.text(0, y, " n/a", va="center", ha="left", fontsize=8, color="gray")


def pareto_front(points: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """The runs no other run beats on both axes (less KV kept and a higher ``y``), by ``x``."""
    front, best = [], -math.inf
    for _, row in points.sort_values([x, y], ascending=[True, False]).iterrows():
        if row[y] > best:
            front.append(row)
            best = row[y]
    return pd.DataFrame(front)


def plot_vs_kv_ratio(
    group: pd.DataFrame, colors: dict[str, Any], column: str, ylabel: str, what: str
) -> Figure:
    """``column`` against the measured KV ratio, one line (sorted by ratio) per method, the
    Pareto front of all runs dotted, the full-cache value dashed."""
    model, task = group["model"].iloc[0], group["task"].iloc[0]
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    plotted = group.dropna(subset=["kv_ratio", column])
    for method, rows in plotted.groupby("method", sort=True):
        rows = rows.sort_values("kv_ratio")
        full = method == FULL_METHOD
        ax.plot(
            rows["kv_ratio"],
            rows[column],
            marker="*" if full else "o",
            markersize=14 if full else 7,
            linestyle="-" if len(rows) > 1 else "none",
            color=colors[method],
            label=method,
        )
    if len(plotted) > 1:
        front = pareto_front(plotted, "kv_ratio", column)
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
    if len(full_values):
        ax.axhline(
            full_values.iloc[-1], color="gray", linestyle="--", linewidth=1, label="full cache"
        )
    if plotted.empty:
        no_data(ax, f"{what} with a measured KV ratio")
    labels = run_labels(group)
    missing = [
        lab for lab, idx in zip(labels, group.index, strict=True) if idx not in plotted.index
    ]
    if missing and not plotted.empty:
        ax.annotate(
            f"not shown (no {what} or KV ratio): {', '.join(missing)}",
            (0, 0),
            xytext=(4, 4),
            xycoords="axes fraction",
            textcoords="offset points",
            fontsize=8,
            color="gray",
        )
    ax.set_xlim(0, 1.05)
    ax.set_xlabel("KV cache kept (stored / full-cache bytes after prefill, measured)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{model} · {task}: {what} vs KV cache kept")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(title="method", loc="best", fontsize=8)
    return fig


def plot_score_vs_kv_ratio(group: pd.DataFrame, colors: dict[str, Any]) -> Figure:
    """Task score against the measured KV ratio (the accuracy / memory trade-off)."""
    metric = group["metric"].dropna().iloc[0] if group["metric"].notna().any() else "score"
    return plot_vs_kv_ratio(group, colors, "score", f"{metric} (task score)", str(metric))


def plot_fidelity_vs_kv_ratio(group: pd.DataFrame, colors: dict[str, Any]) -> Figure:
    """Token F1 of each run's outputs against the full-cache run's, vs the measured KV ratio."""
    return plot_vs_kv_ratio(
        group, colors, "token_f1", "token F1 vs full-cache outputs (0-1)", "output fidelity"
    )


def _barh(
    ax: Any, labels: list[str], values: list[float], colors: list[Any], xlabel: str, what: str
) -> None:
    bars = ax.barh(labels, values, color=colors)
    _annotate(ax, bars, values, list(range(len(values))))
    ax.set_xlabel(xlabel)
    ax.margins(x=0.15)
    ax.grid(True, axis="x", alpha=0.3)
    if all(math.isnan(v) for v in values):
        no_data(ax, what)


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
        no_data(left, "KV bytes")
    peak = group["peak_mem_mb"].tolist()
    bars = right.barh(y, peak, color=[colors[m] for m in group["method"]])
    _annotate(right, bars, peak, y)
    right.margins(x=0.15)
    right.grid(True, axis="x", alpha=0.3)
    right.set_xlabel("peak memory over the run (MB)")
    right.set_title("peak memory")
    if all(math.isnan(v) for v in peak):
        no_data(right, "peak memory")
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
    "fidelity_vs_kv_ratio": plot_fidelity_vs_kv_ratio,
    "latency": plot_latency,
    "memory": plot_memory,
}
PLOT_TITLES = {
    "score_vs_kv_ratio": "score vs KV cache kept",
    "fidelity_vs_kv_ratio": "output fidelity (token F1) vs KV cache kept",
    "latency": "latency per run",
    "memory": "memory per run",
    **CONTEXT_TITLES,
    **METHOD_TITLES,
    **RULER_TITLES,
}


def write_plots(
    table: pd.DataFrame, out_dir: Path, requests: pd.DataFrame | None = None
) -> dict[str, Path]:
    """Every plot as PNG files in ``out_dir``: :data:`PLOTS` per (model, task), latency and
    memory vs context length from ``requests``, and the method-specific plots; returns
    ``{file stem: path}``. A plot that fails is logged and left out, never fatal."""
    paths: dict[str, Path] = {}
    if table.empty:
        return paths
    colors = method_colors(list(table["method"].unique()))

    def save(stem: str, make: Callable[[], Any]) -> None:
        try:
            fig = make()
            if fig is not None:
                fig.savefig(Path(out_dir) / f"{stem}.png", dpi=110)
                paths[stem] = Path(out_dir) / f"{stem}.png"
        except Exception as exc:  # one odd record must not cost the whole report
            log.warning("report: plot %s left out: %r", stem, exc)

    for (model, task), group in table.groupby(["model", "task"], sort=True):
        group = group.reset_index(drop=True)
        where = f"{slug(model)}__{slug(task)}"
        for kind, plot in PLOTS.items():
            save(f"{kind}__{where}", partial(plot, group, colors))
        if requests is not None and not requests.empty:
            mine = requests[(requests["model"] == model) & (requests["task"] == task)]
            if has_context(mine):
                labels = dict(zip(group["run_id"], run_labels(group), strict=True))
                save(f"context__{where}", partial(plot_context, mine, colors, labels))
        for kind, plot in {**METHOD_PLOTS, **RULER_PLOTS}.items():
            save(f"{kind}__{where}", partial(plot, group))
    return paths
