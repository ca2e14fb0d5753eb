"""Latency and memory against context length, per request (``requests`` of
:func:`harness.report.load_report`): one PNG per (model, task),
``context__<model>__<task>.png``, with up to three panels sharing the x axis (the original
prompt's length in tokens, before prompt methods): prefill time, decode throughput and the
peak memory of the request, named by what was measured (a panel no run recorded is left
out).

Each request is a point. Requests of one run at about the same length (RULER's samples of
one target length; within :data:`CLUSTER_SPREAD` of the shortest) form a cluster, and each
run's line joins its clusters' medians, in order of length: it never zigzags through the
points of one length, nor joins points that are not the same run's.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

CONTEXT_TITLES = {"context": "latency and memory vs context length"}
PANELS = (
    ("prefill_ms", "prefill time (ms)", "prefill time"),
    ("decode_tok_s", "decode throughput (tokens/s)", "decode throughput"),
    ("peak_mem_mb", "peak memory (MB)", "peak memory"),
)
MARKERS = "os^vD<>ph*"
# each run its own dashes too: runs that measured alike (two methods' peaks at one ratio)
# stay visible on top of each other
LINESTYLES = ("-", "--", "-.", ":")
CLUSTER_SPREAD = 0.1  # lengths within 10 % of a cluster's shortest belong to it


def clusters(lengths: pd.Series) -> pd.Series:
    """A cluster number per request (same index as ``lengths``): sorted by length, a new
    cluster starts past :data:`CLUSTER_SPREAD` above the current one's shortest."""
    out = pd.Series(0, index=lengths.index, dtype=int)
    start, number = None, -1
    for index, length in lengths.sort_values().items():
        if start is None or length > start * (1 + CLUSTER_SPREAD):
            start, number = length, number + 1
        out[index] = number
    return out


def cluster_medians(rows: pd.DataFrame, column: str) -> pd.DataFrame:
    """Per cluster of ``rows`` (one run), the median length and the median ``column``."""
    values = rows[["prompt_tokens_original", column]].dropna()
    if values.empty:
        return values
    grouped = values.groupby(clusters(values["prompt_tokens_original"]))
    return grouped.median().sort_values("prompt_tokens_original")


def plot_context(
    requests: pd.DataFrame,
    colors: dict[str, Any],
    labels: dict[str, str],
    peak_words: str = "peak memory",
) -> Figure:
    """The panels of :data:`PANELS` that have values, against ``prompt_tokens_original``;
    ``peak_words`` names what the peak memory measured."""
    model, task = requests["model"].iloc[0], requests["task"].iloc[0]
    panels = [p for p in PANELS if p[0] in requests and requests[p[0]].notna().any()]
    panels = panels or list(PANELS[:1])
    fig = Figure(figsize=(4.4 * len(panels) + 0.6, 4.8), layout="constrained")
    axes = fig.subplots(1, len(panels), sharex=True, squeeze=False)[0]
    runs = sorted(requests["run_id"].unique(), key=lambda r: labels.get(r, r))
    handles = []
    for i, run in enumerate(runs):
        rows = requests[requests["run_id"] == run]
        method = rows["method"].iloc[0]
        style = {"color": colors.get(method), "marker": MARKERS[i % len(MARKERS)]}
        dashes = LINESTYLES[i % len(LINESTYLES)]
        for ax, (column, _, _) in zip(axes, panels, strict=True):
            ax.plot(
                rows["prompt_tokens_original"], rows[column], ls="none", ms=4, alpha=0.45, **style
            )
            medians = cluster_medians(rows, column)
            ax.plot(medians["prompt_tokens_original"], medians[column], ms=7, ls=dashes, **style)
        handles.append(Line2D([], [], label=labels.get(run, run), ms=7, ls=dashes, **style))
    for ax, (column, ylabel, what) in zip(axes, panels, strict=True):
        if column == "peak_mem_mb":
            ylabel, what = f"{peak_words} (MB)", "peak memory"
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(what)
        ax.grid(True, alpha=0.3)
    fig.suptitle(
        f"{model} · {task}: latency and memory per request vs context length\n"
        "(context length: prompt tokens before prompt methods; small points: requests; "
        "line: each run's median at each length)"
    )
    fig.legend(handles=handles, title="run", loc="outside lower center", ncols=min(len(handles), 4))
    return fig


def has_context(requests: pd.DataFrame) -> bool:
    """Whether ``requests`` (one model and task) has anything to plot against length."""
    return not requests.empty and requests["prompt_tokens_original"].notna().any()
