"""Helpers shared by the report's plot modules: file-name slugs, one colour per method, run
labels, and the "no data" note."""

from __future__ import annotations

import json
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
    d_qk=32 d_vo=32 trained"`` or the method's name, from a row of the runs table."""
    method = str(row.method)
    if _is_set(getattr(row, "budget", math.nan)):
        return f"{method} budget={row.budget:g}"
    if _is_set(getattr(row, "rate", math.nan)):
        return f"{method} rate={row.rate:g}"
    d_qk, d_vo = getattr(row, "d_qk", math.nan), getattr(row, "d_vo", math.nan)
    if _is_set(d_qk) or _is_set(d_vo):
        return f"{method} d_qk={d_qk:g} d_vo={d_vo:g}{trained_suffix(row)}"
    if _is_set(getattr(row, "ratio", math.nan)) and method != FULL_METHOD:
        return f"{method} r={row.ratio:g}{sliding_suffix(row)}"
    return method


def sliding_suffix(row: Any) -> str:
    """``" +sliding"`` for a cache method that compressed sliding-window layers too."""
    try:
        params = json.loads(getattr(row, "params_json", "") or "{}")
    except ValueError:
        return ""
    return " +sliding" if isinstance(params, dict) and params.get("compress_sliding") else ""


def trained_suffix(row: Any) -> str:
    """``" trained"`` / ``" untrained"`` for a model method that says, else ``""``."""
    value = getattr(row, "trained", None)
    if value is True:
        return " trained"
    if value is False:
        return " untrained"
    return ""


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


# how a metric and a task read in an axis label ("qasper F1", "GSM8K exact match (strict)")
METRIC_WORDS = {
    "qa_f1_score": "F1",
    "rouge_score": "Rouge-L",
    "exact_match": "exact match",
    "acc": "accuracy",
    "acc_norm": "accuracy (length-normalised)",
    "f1": "F1",
    "score": "score",
}
FILTER_WORDS = {"strict-match": "strict", "flexible-extract": "flexible", "get-answer": ""}
TASK_WORDS = {
    "longbench_qasper": "qasper",
    "longbench_multi_news": "multi_news",
    "gsm8k": "GSM8K",
    "bbh": "BBH",
}
# metrics that are fractions in [0, 1] (their axes are drawn on [0, 1])
BOUNDED_METRICS = {"qa_f1_score", "rouge_score", "exact_match", "acc", "acc_norm", "f1"}


def metric_words(task: str, metric: str | None) -> str:
    """``("longbench_qasper", "qa_f1_score,none")`` -> ``"qasper F1"``; unknown names are
    shown as they are."""
    name, _, filt = str(metric or "score").partition(",")
    base, _, subtask = str(task).partition("/")
    words = f"{TASK_WORDS.get(base, base)}{'/' + subtask if subtask else ''} "
    words += METRIC_WORDS.get(name, name)
    extra = FILTER_WORDS.get(filt, filt) if filt and filt != "none" else ""
    return f"{words} ({extra})" if extra else words


def is_bounded(metric: str | None) -> bool:
    """Whether the metric is a fraction in [0, 1]."""
    return str(metric or "").partition(",")[0] in BOUNDED_METRICS


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
