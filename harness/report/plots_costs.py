"""What each run cost, one bar per run: the bar is the median request (p50), the whisker
reaches the 95th percentile (p95), so a reader sees both the typical and the bad request.

* ``latency__<model>__<task>.png``: prefill time per request and decode time per generated
  token;
* ``memory__<model>__<task>.png``: the KV cache per request after prefill (stored, in the
  method's colour, against the full cache in grey) and the peak memory of a request, named by
  what was measured: on CUDA the allocator's peak (weights, KV cache, activations), on the
  CPU the weights plus the KV cache's allocated bytes (the resident set does not show a KV
  cache: older CPU records, which hold it, say so). Without a recorded peak the panel is
  left out, not drawn empty.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from harness.report.plot_common import no_data, run_labels, wrapped

WHISKERS = "bar: median request (p50); whisker: p95"


def _height(n: int) -> float:
    return 2.2 + 0.45 * n


def _column(group: pd.DataFrame, name: str) -> list[float]:
    return group[name].tolist() if name in group else [math.nan] * len(group)


def bars(
    ax: Any,
    y: list[float],
    p50: list[float],
    p95: list[float],
    colors: list[Any],
    height: float = 0.8,
    notes: list[str] | None = None,
    **style: Any,
) -> None:
    """Horizontal bars at ``p50`` with a whisker up to ``p95``, the p50 value (and the
    ``notes``) written at the whisker's end ("n/a" where the run recorded none)."""
    whisker = [
        max(0.0, b - a) if not (math.isnan(a) or math.isnan(b)) else 0.0
        for a, b in zip(p50, p95, strict=True)
    ]
    heights = [0.0 if math.isnan(v) else v for v in p50]
    ax.barh(
        y,
        heights,
        height=height,
        color=colors,
        xerr=[[0.0] * len(y), whisker],
        capsize=3,
        error_kw={"elinewidth": 1},
        **style,
    )
    for i, (yi, value, w) in enumerate(zip(y, p50, whisker, strict=True)):
        text = (
            " n/a" if math.isnan(value) else f" {value:,.0f}" if value >= 100 else f" {value:.3g}"
        )
        text += f" {notes[i]}" if notes and notes[i] else ""
        ax.text(
            0 if math.isnan(value) else value + w,
            yi,
            text,
            va="center",
            fontsize=8,
            color="gray" if math.isnan(value) else "black",
        )


def _finish(ax: Any, xlabel: str, title: str, values: list[float], what: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.margins(x=0.2)
    ax.grid(True, axis="x", alpha=0.3)
    if all(math.isnan(v) for v in values):
        no_data(ax, what)


def _legend(fig: Figure, group: pd.DataFrame, colors: dict[str, Any], extra=()) -> None:
    handles = [Patch(color=colors[m], label=m) for m in sorted(group["method"].unique())]
    handles += list(extra)
    fig.legend(
        handles=handles, title="method", loc="outside lower center", ncols=min(len(handles), 5)
    )


def plot_latency(group: pd.DataFrame, colors: dict[str, Any]) -> Figure:
    """Prefill time per request and decode time per generated token, p50 bars, p95 whiskers."""
    model, task = group["model"].iloc[0], group["task"].iloc[0]
    y = list(range(len(group)))
    bar_colors = [colors[m] for m in group["method"]]
    fig = Figure(figsize=(11, _height(len(group))), layout="constrained")
    left, right = fig.subplots(1, 2, sharey=True)
    for ax, name, xlabel, title in (
        (left, "prefill_ms", "prefill time per request (ms)", "prefill (lower is better)"),
        (
            right,
            "decode_ms_tok",
            "decode time per generated token (ms)",
            "decode (lower is better)",
        ),
    ):
        p50, p95 = _column(group, f"{name}_p50"), _column(group, f"{name}_p95")
        bars(ax, y, p50, p95, bar_colors)
        _finish(ax, xlabel, title, p50, title.split()[0] + " time")
    left.set_yticks(y, run_labels(group))
    left.invert_yaxis()  # shared y axis: the first run on top
    fig.suptitle(f"{model} · {task}: latency per run ({WHISKERS})")
    _legend(fig, group, colors)
    return fig


def plot_memory(group: pd.DataFrame, colors: dict[str, Any]) -> Figure:
    """KV cache per request (stored vs full) and, where the runs recorded it, the peak memory
    of a request, named by what was measured (:func:`peak_words`)."""
    model, task = group["model"].iloc[0], group["task"].iloc[0]
    y = list(range(len(group)))
    h = 0.4
    peak50, peak95 = _column(group, "peak_mem_mb_p50"), _column(group, "peak_mem_mb_p95")
    has_peak = not all(math.isnan(v) for v in peak50)
    fig = Figure(figsize=(11 if has_peak else 7, _height(len(group))), layout="constrained")
    axes = fig.subplots(1, 2 if has_peak else 1, sharey=True, squeeze=False)[0]
    left = axes[0]
    stored50, stored95 = _column(group, "kv_mb_p50"), _column(group, "kv_mb_p95")
    full50, full95 = _column(group, "kv_full_mb_p50"), _column(group, "kv_full_mb_p95")
    bars(
        left,
        [i - h / 2 for i in y],
        full50,
        full95,
        ["lightgray"] * len(y),
        height=h,
        edgecolor="gray",
    )
    bars(
        left,
        [i + h / 2 for i in y],
        stored50,
        stored95,
        [colors[m] for m in group["method"]],
        height=h,
    )
    _finish(
        left,
        "KV cache per request after prefill (MB)",
        "KV cache: stored (colour) vs full (grey)",
        stored50 + full50,
        "KV bytes",
    )
    if has_peak:
        right = axes[1]
        bars(right, y, peak50, peak95, [colors[m] for m in group["method"]])
        xlabel = wrapped(f"{peak_words(group)} (MB)", 60)
        _finish(right, xlabel, "peak memory per request", peak50, "peak")
    left.set_yticks(y, run_labels(group))
    left.invert_yaxis()
    fig.suptitle(f"{model} · {task}: memory per run ({WHISKERS})")
    _legend(
        fig,
        group,
        colors,
        [Patch(facecolor="lightgray", edgecolor="gray", label="full cache (KV)")],
    )
    return fig


def peak_words(group: pd.DataFrame) -> str:
    """What the runs' peak memory measured (``peak_mem_kind``: weights + KV cache allocated on
    the CPU, the allocator's peak on CUDA), the kinds joined when the runs differ."""
    kinds = group["peak_mem_kind"].dropna().unique() if "peak_mem_kind" in group else []
    return " / ".join(str(k) for k in kinds) or "peak memory"


COST_PLOTS = {"latency": plot_latency, "memory": plot_memory}
COST_TITLES = {"latency": "latency per run", "memory": "memory per run"}
