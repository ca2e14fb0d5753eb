"""Helpers shared by the report's plot modules: file-name slugs, one colour per method, run
labels, and the "no data" note."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

MB = 2**20
FULL_METHOD = "full"


def method_colors(methods: list[str]) -> dict[str, Any]:
    """One colour per method, the same in every figure of a report."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(methods) <= 10 else "tab20"]
    return {m: cmap(i % cmap.N) for i, m in enumerate(sorted(methods))}


def _is_set(value: Any) -> bool:
    return isinstance(value, int | float) and not math.isnan(value)


def run_label(row: Any) -> str:
    """``"streamingllm r=0.2"``, ``"h2o budget=256"``, ``"dac rate=0.5"``, ``"kvlatent_kv
    d=32"`` or the method's name, from a row of the runs table."""
    method = str(row.method)
    if _is_set(getattr(row, "budget", math.nan)):
        return f"{method} budget={row.budget:g}"
    if _is_set(getattr(row, "rate", math.nan)):
        return f"{method} rate={row.rate:g}"
    d_qk, d_vo = getattr(row, "d_qk", math.nan), getattr(row, "d_vo", math.nan)
    if _is_set(d_qk) or _is_set(d_vo):
        return f"{method} d_qk={d_qk:g} d_vo={d_vo:g}"
    if _is_set(getattr(row, "ratio", math.nan)) and method != FULL_METHOD:
        return f"{method} r={row.ratio:g}"
    return method


def run_labels(group: pd.DataFrame) -> list[str]:
    """:func:`run_label` per row; rows that would share a label get their full parameter
    string instead, and a number if still equal."""
    rows = list(group.itertuples())
    labels = [run_label(row) for row in rows]
    for i, row in enumerate(rows):
        if labels.count(labels[i]) > 1 and getattr(row, "method_params", ""):
            labels[i] = f"{row.method} ({row.method_params})"
    for i, label in enumerate(list(labels)):
        if labels.count(label) > 1:
            labels[i] = f"{label} #{labels[:i].count(label) + 1}"
    return labels


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
