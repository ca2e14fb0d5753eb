"""Latency and memory against context length, per request (``requests`` of
:func:`harness.report.load_report`): one PNG per (model, task),
``context__<model>__<task>.png``, with three panels sharing the x axis (the original prompt's
length in tokens, before prompt methods): prefill time, decode throughput and the memory the
request added over the process's memory just before it (the absolute peak is dominated by
the weights).
One line per run, coloured by method, points sorted by length."""

from __future__ import annotations

from typing import Any

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from harness.report.plot_common import no_data

CONTEXT_TITLES = {"context": "latency and memory vs context length"}
PANELS = (
    ("prefill_ms", "prefill time (ms)", "prefill time"),
    ("decode_tok_s", "decode throughput (tokens/s)", "decode throughput"),
    ("peak_rise_mb", "memory added by the request: peak − before (MB)", "memory rise"),
)
MARKERS = "os^vD<>ph*"


def plot_context(requests: pd.DataFrame, colors: dict[str, Any], labels: dict[str, str]) -> Figure:
    """The three panels of :data:`PANELS` against ``prompt_tokens_original``."""
    model, task = requests["model"].iloc[0], requests["task"].iloc[0]
    fig = Figure(figsize=(13, 4.5), layout="constrained")
    axes = fig.subplots(1, len(PANELS), sharex=True)
    runs = sorted(requests["run_id"].unique(), key=lambda r: labels.get(r, r))
    handles = []
    for i, run in enumerate(runs):
        rows = requests[requests["run_id"] == run].sort_values("prompt_tokens_original")
        method = rows["method"].iloc[0]
        style = {"color": colors.get(method), "marker": MARKERS[i % len(MARKERS)], "ms": 5}
        for ax, (column, _, _) in zip(axes, PANELS, strict=True):
            ax.plot(rows["prompt_tokens_original"], rows[column], "-", alpha=0.8, **style)
        handles.append(Line2D([], [], label=labels.get(run, run), **style))
    for ax, (column, ylabel, what) in zip(axes, PANELS, strict=True):
        ax.set_xlabel("context length (prompt tokens before prompt methods)")
        ax.set_ylabel(ylabel)
        ax.set_title(what)
        ax.grid(True, alpha=0.3)
        if requests[column].isna().all():
            no_data(ax, what)
    fig.suptitle(f"{model} · {task}: latency and memory per request vs context length")
    fig.legend(handles=handles, title="run", loc="outside lower center", ncols=min(len(handles), 4))
    return fig


def has_context(requests: pd.DataFrame) -> bool:
    """Whether ``requests`` (one model and task) has anything to plot against length."""
    return not requests.empty and requests["prompt_tokens_original"].notna().any()
