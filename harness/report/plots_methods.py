"""Plots of what a method did, from its record alone (``method.stats``, ``method.describe``):
nothing here imports method code or recomputes a method's budgets.

* ``kv_per_layer__<model>__<task>.png``: per layer, the fraction of the tokens it held that
  each run's cache method kept after prefill (mean over the run's requests, from the
  recorded ``tokens_kept`` / ``tokens_before``): a uniform method is flat, PyramidKV and
  SpindleKV are pyramids, and the layers a method left alone (Gemma-3's sliding-window
  layers, unless ``compress_sliding``) are marked at 1;
* ``kvlatent__<model>__<task>.png``: KV-Latent's reduced head dim d (``describe.d_qk`` /
  ``d_vo``) against perplexity (or the task score when no perplexity was recorded) and
  output fidelity (token F1, and the reference-answer NLL increase where measured), one
  line per variant; trained runs solid, untrained ones dashed with hollow markers.

Each returns None (no plot) when the (model, task) has no such runs.
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from harness.report.plot_common import (
    FULL_METHOD,
    dodge,
    is_bounded,
    method_colors,
    metric_words,
    run_labels,
    set_fraction_axis,
    trained_suffix,
)

MARKERS = "osD^v<>ph"
LINESTYLES = ("-", "--", "-.", ":")
METHOD_TITLES = {
    "kv_per_layer": "KV cache kept per layer",
    "kvlatent": "KV-Latent head dim vs quality",
}


def layer_stats(stats: Any) -> tuple[list[Any], list[Any]] | None:
    """(tokens_before, tokens_kept) per layer from a record's ``method.stats`` (a composed
    method's: the first member that has them), or None."""
    if not isinstance(stats, dict):
        return None
    if isinstance(stats.get("tokens_kept"), list) and isinstance(stats.get("tokens_before"), list):
        return stats["tokens_before"], stats["tokens_kept"]
    for value in stats.values():
        found = layer_stats(value)
        if found is not None:
            return found
    return None


def layer_fractions(stats: Any) -> list[float | None] | None:
    """Per layer, kept / before (None for a layer the method left alone), or None."""
    found = layer_stats(stats)
    if found is None:
        return None
    return [
        k / b if isinstance(b, int | float) and isinstance(k, int | float) and b else None
        for b, k in zip(*found, strict=True)
    ]


def plot_kv_per_layer(group: pd.DataFrame) -> Figure | None:
    """Fraction of its tokens each layer kept, one line per cache-method run."""
    fractions = [layer_fractions(json.loads(text)) for text in group["stats_json"]]
    shown = [(i, f) for i, f in enumerate(fractions) if f]
    if not shown:
        return None
    model, task = group["model"].iloc[0], group["task"].iloc[0]
    labels = run_labels(group)
    colors = method_colors(list(group["method"].unique()))
    fig = Figure(figsize=(10, 4.8), layout="constrained")
    ax = fig.add_subplot()
    alone_labelled = False
    for rank, (i, layers) in enumerate(shown):
        # runs that kept the same fractions (every uniform method at one ratio) would hide
        # each other: each run is shifted a little along x and has its own marker and dashes
        shift = dodge(rank, len(shown), 0.12)
        xs = [x + shift for x, f in enumerate(layers) if f is not None]
        ys = [f for f in layers if f is not None]
        mean = sum(ys) / len(ys)
        method = group["method"].iloc[i]
        ax.plot(
            xs,
            ys,
            marker=MARKERS[rank % len(MARKERS)],
            ms=5,
            linestyle=LINESTYLES[rank % len(LINESTYLES)],
            color=colors[method],
            alpha=0.85,
            label=f"{labels[i]} (mean over compressed layers {mean:.2f})",
        )
        alone = [x for x, f in enumerate(layers) if f is None]
        if alone:
            ax.scatter(
                alone,
                [1.0] * len(alone),
                marker="x",
                color="gray",
                label=None if alone_labelled else "left alone (e.g. sliding-window layer)",
            )
            alone_labelled = True
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer (0 = shallowest)")
    ax.set_ylabel("fraction of its tokens the layer kept")
    set_fraction_axis(ax)
    fig.suptitle(f"{model} · {task}: KV cache kept per layer after prefill (mean over requests)")
    ax.grid(True, alpha=0.3)
    ax.legend(title="run", fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return fig


def plot_kvlatent(group: pd.DataFrame) -> Figure | None:
    """Reduced head dim against perplexity (or score, with its 95 % interval) and fidelity,
    one line per method, RoPE mode (when the runs use several) and trained or not."""
    rows = group[group["d_qk"].notna() | group["d_vo"].notna()].copy()
    if rows.empty:
        return None
    model, task = group["model"].iloc[0], group["task"].iloc[0]
    rows["d"] = rows[["d_qk", "d_vo"]].min(axis=1)
    rope = rows["describe_json"].map(lambda text: described_rope(json.loads(text)))
    several = rope.nunique(dropna=True) > 1
    rows["series"] = [
        (f"{m} ({r} RoPE)" if several and r else m) + trained_suffix(row)
        for m, r, row in zip(rows["method"], rope, rows.itertuples(), strict=True)
    ]
    quality = "perplexity" if rows["perplexity"].notna().any() else "score"
    metric = rows["metric"].dropna().iloc[0] if rows["metric"].notna().any() else "score"
    panels = [
        (
            quality,
            "perplexity (lower is better)"
            if quality == "perplexity"
            else metric_words(task, metric),
            quality == "score" and is_bounded(metric),
        ),
        ("token_f1", "token F1 of the outputs vs the full cache's", True),
    ]
    if rows["nll_increase"].notna().any():
        panels.append(("nll_increase", "reference-answer NLL increase (nats/token)", False))
    fig = Figure(figsize=(4.6 * len(panels) + 2.5, 4.5), layout="constrained")
    axes = fig.subplots(1, len(panels))
    full = group[group["method"] == FULL_METHOD]
    for ax, (column, ylabel, bounded) in zip(axes, panels, strict=True):
        for name, series in rows.groupby("series", sort=True):
            series = series.sort_values("d")
            untrained = name.endswith(" untrained")
            lo, hi = f"{column}_lo", f"{column}_hi"
            yerr = None
            if lo in series and series[lo].notna().any():
                yerr = [
                    (series[column] - series[lo]).clip(lower=0).fillna(0).tolist(),
                    (series[hi] - series[column]).clip(lower=0).fillna(0).tolist(),
                ]
            ax.errorbar(
                series["d"],
                series[column],
                yerr=yerr,
                marker="o",
                capsize=3,
                linestyle="--" if untrained else "-",
                markerfacecolor="white" if untrained else None,
                label=name,
            )
        if column == quality and full[column].notna().any():
            ax.axhline(full[column].dropna().iloc[-1], color="gray", ls="--", label="full cache")
        if bounded:
            set_fraction_axis(ax)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("reduced head dim d (channels per head)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, title="variant", fontsize=8, loc="outside right upper")
    fig.suptitle(f"{model} · {task}: KV-Latent head dim vs {quality} and fidelity")
    return fig


def described_rope(describe: Any) -> str | None:
    """The RoPE mode a record's ``method.describe`` names (a composed method's first)."""
    if not isinstance(describe, dict):
        return None
    if isinstance(describe.get("rope"), str):
        return describe["rope"]
    return next((r for v in describe.values() if (r := described_rope(v))), None)


METHOD_PLOTS = {"kv_per_layer": plot_kv_per_layer, "kvlatent": plot_kvlatent}
