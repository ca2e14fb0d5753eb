"""Plots of one method's own knobs, from the runs table of :func:`harness.report.load_report`.

* ``spindlekv_budgets__<model>__<task>.png``: the fraction of the prompt each layer keeps
  under SpindleKV (and PyramidKV, dashed, when the records have it) for every ratio or
  budget in the records, computed by the methods' own budget functions for the model's
  layer count and the run's mean prompt length;
* ``kvlatent__<model>__<task>.png``: KV-Latent's reduced head dim d against perplexity (or
  the task score when no perplexity was recorded) and output fidelity (token F1, and the
  reference-answer NLL increase where measured), one line per variant.

Each returns None (no plot) when the (model, task) has no such runs.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from harness.report.plot_common import FULL_METHOD, trained_suffix

METHOD_TITLES = {
    "spindlekv_budgets": "SpindleKV per-layer KV budget",
    "kvlatent": "KV-Latent head dim vs quality",
}
PYRAMIDS = ("spindlekv", "pyramidkv")


def layer_fractions(method: str, params: dict[str, Any], seq_len: int, layers: int) -> list[float]:
    """Fraction of a ``seq_len``-token prompt each of ``layers`` layers keeps, by the method's
    own code (``kept_tokens`` for the target, ``spindle_budgets`` / ``pyramid_budgets``)."""
    if method == "spindlekv":
        from methods.cache.spindlekv import SpindleKV as cls
        from methods.cache.spindlekv import spindle_budgets as budgets
    else:
        from methods.cache.pyramidkv import PyramidKV as cls
        from methods.cache.pyramidkv import pyramid_budgets as budgets
    fields = {k: v for k, v in params.items() if k in cls.__dataclass_fields__ and k != "name"}
    m = cls(**fields)
    if m.budget is None and m.ratio == 1.0:
        return [1.0] * layers
    kept = budgets(m.kept_tokens(seq_len), seq_len, m.window + m.sinks, layers, m.beta)
    return [k / seq_len for k in kept]


def plot_spindle_budgets(group: pd.DataFrame) -> Figure | None:
    """Per-layer kept fraction for each SpindleKV / PyramidKV setting in ``group``."""
    rows = group[group["method"].isin(PYRAMIDS)].dropna(subset=["num_layers", "prompt_tokens"])
    if not (rows["method"] == "spindlekv").any():
        return None
    model, task = group["model"].iloc[0], group["task"].iloc[0]
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    seen = set()
    for row in rows.sort_values(
        ["method", "ratio", "budget"], ascending=[False, True, True]
    ).itertuples():
        params = json.loads(row.params_json)
        seq_len, layers = max(1, round(row.prompt_tokens)), int(row.num_layers)
        what = f"budget={row.budget:g}" if not math.isnan(row.budget) else f"r={row.ratio:g}"
        label = f"{row.method} {what}"
        if label in seen:
            continue
        seen.add(label)
        fractions = layer_fractions(row.method, params, seq_len, layers)
        ax.plot(
            range(layers),
            fractions,
            marker="o" if row.method == "spindlekv" else None,
            linestyle="-" if row.method == "spindlekv" else "--",
            label=f"{label} (mean {sum(fractions) / layers:.2f})",
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer (0 = shallowest)")
    ax.set_ylabel("fraction of the prompt's tokens kept")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{model} · {task}: per-layer KV budget (prompt ≈ {seq_len} tokens)")
    ax.grid(True, alpha=0.3)
    ax.legend(title="method, target", fontsize=8)
    return fig


def plot_kvlatent(group: pd.DataFrame) -> Figure | None:
    """Reduced head dim against perplexity (or score) and fidelity, one line per method (and
    RoPE mode, when the runs use several)."""
    rows = group[group["d_qk"].notna() | group["d_vo"].notna()].copy()
    if rows.empty:
        return None
    model, task = group["model"].iloc[0], group["task"].iloc[0]
    rows["d"] = rows[["d_qk", "d_vo"]].min(axis=1)
    rope = rows["params_json"].map(lambda text: json.loads(text).get("rope"))
    several = rope.nunique(dropna=True) > 1
    rows["series"] = [
        (f"{m} ({r} RoPE)" if several and r else m) + trained_suffix(row)
        for m, r, row in zip(rows["method"], rope, rows.itertuples(), strict=True)
    ]
    quality = "perplexity" if rows["perplexity"].notna().any() else "score"
    metric = rows["metric"].dropna().iloc[0] if rows["metric"].notna().any() else "score"
    panels = [(quality, "perplexity (lower is better)" if quality == "perplexity" else metric)]
    panels.append(("token_f1", "token F1 vs full-cache outputs (0-1)"))
    if rows["nll_increase"].notna().any():
        panels.append(("nll_increase", "reference NLL increase (nats/token)"))
    fig = Figure(figsize=(5 * len(panels), 4.5), layout="constrained")
    axes = fig.subplots(1, len(panels))
    full = group[group["method"] == FULL_METHOD]
    for ax, (column, ylabel) in zip(axes, panels, strict=True):
        for name, series in rows.groupby("series", sort=True):
            series = series.sort_values("d")
            untrained = name.endswith(" untrained")
            ax.plot(
                series["d"],
                series[column],
                marker="o",
                linestyle="--" if untrained else "-",
                markerfacecolor="white" if untrained else None,
                label=name,
            )
        if column in (quality,) and full[column].notna().any():
            ax.axhline(full[column].dropna().iloc[-1], color="gray", ls="--", label="full cache")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("reduced head dim d (channels per head)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(title="variant", fontsize=8)
    fig.suptitle(f"{model} · {task}: KV-Latent head dim vs {quality} and fidelity")
    return fig


METHOD_PLOTS = {"spindlekv_budgets": plot_spindle_budgets, "kvlatent": plot_kvlatent}
