"""Helpers shared by the report's plot modules: one colour per method, run labels and metric
words (:mod:`harness.report.labels`), the "no data" note, whiskers, and the layout checks the
tests run on every figure (:func:`layout_problems`)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from harness.report.labels import (
    metric_name,
    metric_words,
    run_label,
    run_labels,
    sliding_suffix,
    trained_suffix,
)
from harness.report.stats import UNIT, metric_range

__all__ = [
    "FULL_METHOD",
    "MB",
    "errors",
    "is_bounded",
    "method_colors",
    "metric_name",
    "metric_words",
    "n_text",
    "no_data",
    "run_label",
    "run_labels",
    "sliding_suffix",
    "trained_suffix",
]

MB = 2**20
FULL_METHOD = "full"


def method_colors(methods: list[str]) -> dict[str, Any]:
    """One colour per method, the same in every figure of a report."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(methods) <= 10 else "tab20"]
    return {m: cmap(i % cmap.N) for i, m in enumerate(sorted(methods))}


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
