"""Reference-answer likelihood plots: the paired per-token NLL increase vs the full cache
(``nll_increase`` with its 95 % interval) against the KV cache kept, and, for prompt methods,
the NLL increase (or the score where no NLL was recorded) against the prompt kept."""

from __future__ import annotations

from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from harness.report.plot_common import (
    FULL_METHOD,
    errors,
    n_text,
    plot_vs_kv_ratio,
    series,
    wrapped,
)

NLL_WORDS = "NLL increase per token of the reference answer vs the full cache (lower is better)"


def has_nll(group: pd.DataFrame) -> bool:
    """Whether any run of ``group`` has a paired NLL increase."""
    return "nll_increase" in group and group["nll_increase"].notna().any()


def plot_nll_vs_kv_ratio(group: pd.DataFrame, colors: dict[str, Any]) -> Figure | None:
    """The NLL increase against the measured KV ratio, one line per method; None without NLL."""

    if not has_nll(group):
        return None
    return plot_vs_kv_ratio(
        group, colors, "nll_increase", wrapped(NLL_WORDS, 50), "NLL increase", False
    )


def _prompt_runs(group: pd.DataFrame) -> pd.DataFrame:
    """Runs of prompt methods (a requested ``prompt_kept``) and the full cache, with the measured
    fraction of the prompt kept (``prompt_ratio``)."""
    if "prompt_ratio" not in group or "prompt_kept" not in group:
        return group.iloc[0:0]
    prompt = group["prompt_kept"].notna() | (group["method"] == FULL_METHOD)
    return group[prompt & group["prompt_ratio"].notna()]


def plot_vs_prompt_kept(group: pd.DataFrame, colors: dict[str, Any]) -> Figure | None:
    """The NLL increase (the score where no run recorded NLL) against the measured prompt
    kept, one line per prompt method, 95 % interval bars; None without a prompt method."""
    runs = _prompt_runs(group)
    if runs.empty or not (runs["method"] != FULL_METHOD).any():
        return None
    column, words = ("nll_increase", NLL_WORDS) if has_nll(runs) else ("score", "score")
    if column == "score":
        words = "score (higher is better)"
    runs = runs.dropna(subset=[column])
    if runs.empty:
        return None
    model, task = group["model"].iloc[0], group["task"].iloc[0]
    fig = Figure(figsize=(8.5, 4.8), layout="constrained")
    ax = fig.add_subplot()
    lo, hi = f"{column}_lo", f"{column}_hi"
    for name, rows in series(runs):
        rows = rows.sort_values("prompt_ratio")
        full = rows["method"].iloc[0] == FULL_METHOD
        ax.errorbar(
            rows["prompt_ratio"],
            rows[column],
            yerr=errors(rows[column], rows[lo], rows[hi]) if lo in rows else None,
            marker="*" if full else "o",
            markersize=14 if full else 7,
            linestyle="-" if len(rows) > 1 else "none",
            color=colors[rows["method"].iloc[0]],
            capsize=3,
            label=name,
        )
    ax.set_xlim(0, 1.05)
    ax.set_xlabel("prompt kept (measured fraction of the prompt's tokens)")
    ax.set_ylabel(wrapped(words, 50))
    fig.suptitle(f"{model} · {task}: {column.replace('_', ' ')} vs prompt kept")
    ax.set_title(f"bars: 95 % interval; {n_text(runs)}", fontsize=8, color="dimgray")
    ax.grid(True, alpha=0.3)
    ax.legend(title="method", fontsize=8)
    return fig


NLL_PLOTS = {
    "nll_vs_kv_ratio": plot_nll_vs_kv_ratio,
    "vs_prompt_kept": plot_vs_prompt_kept,
}
NLL_TITLES = {
    "nll_vs_kv_ratio": "reference-answer NLL increase vs KV cache kept",
    "vs_prompt_kept": "NLL increase (or score) vs prompt kept, prompt methods",
}
