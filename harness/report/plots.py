"""The report's plots, one PNG per (model, task) and kind, from the table ``load_report`` builds.

* ``score_vs_kv_ratio__<model>__<task>.png``: the task score with its 95 % interval
  against the measured fraction of the KV cache kept, one line per method, with the runs'
  Pareto front (the accuracy / memory trade-off) and n;
* ``paired_difference__<model>__<task>.png``: each run's paired difference from the
  full-cache run with its interval, outside noise or not (:mod:`harness.report.stats`);
* ``fidelity_vs_kv_ratio__<model>__<task>.png``: the same for the token F1 of the outputs
  against the full-cache run's (:mod:`harness.report.fidelity`);
* latency and memory per run (bars at the median request, whiskers to p95):
  :mod:`harness.report.plots_costs`;
* per request, against context length: :mod:`harness.report.plots_context`;
* SpindleKV's per-layer budgets and KV-Latent's head dim: :mod:`harness.report.plots_methods`;
* RULER's needle heatmaps and needles found vs KV kept: :mod:`harness.report.plots_ruler`.

Axis labels are words ("qasper F1"), fractions are drawn on [0, 1] and legends sit beside
the axes, off the data. Figures are built with :class:`matplotlib.figure.Figure` (rendered by Agg on save), so
nothing here touches pyplot's global state or the backend a notebook has chosen.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from harness.records import slug
from harness.report.plot_common import (  # noqa: F401 (pareto_front: re-exported)
    DODGE,
    FULL_METHOD,
    dodge,
    errors,
    is_bounded,
    method_colors,
    metric_name,
    metric_words,
    n_text,
    no_data,
    pareto_front,
    plot_vs_kv_ratio,
    run_labels,
    series,
    set_fraction_axis,
    wrapped,
)
from harness.report.plots_context import CONTEXT_TITLES, has_context, plot_context
from harness.report.plots_costs import COST_PLOTS, COST_TITLES, peak_words
from harness.report.plots_methods import METHOD_PLOTS, METHOD_TITLES
from harness.report.plots_nll import NLL_PLOTS, NLL_TITLES
from harness.report.plots_ruler import RULER_PLOTS, RULER_TITLES

log = logging.getLogger("kvbench")


def plot_score_vs_kv_ratio(group: pd.DataFrame, colors: dict[str, Any]) -> Figure:
    """Task score against the measured KV ratio (the accuracy / memory trade-off)."""
    metric = group["metric"].dropna().iloc[0] if group["metric"].notna().any() else "score"
    task = group["task"].iloc[0]
    words = metric_words(task, metric)
    return plot_vs_kv_ratio(
        group, colors, "score", words, metric_name(metric, task), is_bounded(metric)
    )


def plot_fidelity_vs_kv_ratio(group: pd.DataFrame, colors: dict[str, Any]) -> Figure:
    """Token F1 of each run's outputs against the full-cache run's, vs the measured KV ratio."""
    return plot_vs_kv_ratio(
        group,
        colors,
        "token_f1",
        "token F1 of the outputs vs the full cache's (1 = identical)",
        "output fidelity",
    )


def plot_paired_difference(group: pd.DataFrame, colors: dict[str, Any]) -> Figure | None:
    """Each run's paired score difference from the full-cache run (mean over the samples both
    scored, run − full) with its 95 % interval; a filled marker when the verdict is outside
    noise (the interval excludes 0 over at least 6 pairs), a hollow one otherwise. None when
    no run has a reference."""
    rows = group[group["score_diff"].notna() & (group["verdict"] != "reference")]
    if rows.empty:
        return None
    model, task = group["model"].iloc[0], group["task"].iloc[0]
    metric = group["metric"].dropna().iloc[0] if group["metric"].notna().any() else "score"
    labels = dict(zip(group.index, run_labels(group), strict=True))
    fig = Figure(figsize=(8.5, 1.6 + 0.4 * len(rows)), layout="constrained")
    ax = fig.add_subplot()
    y = list(range(len(rows)))
    for i, (_, row) in zip(y, rows.iterrows(), strict=True):
        outside = row["verdict"] in ("higher", "lower")
        xerr = errors(
            pd.Series([row["score_diff"]]),
            pd.Series([row["score_diff_lo"]]),
            pd.Series([row["score_diff_hi"]]),
        )
        ax.errorbar(
            row["score_diff"],
            i,
            xerr=xerr,
            fmt="o",
            color=colors[row["method"]],
            markerfacecolor=colors[row["method"]] if outside else "white",
            capsize=3,
        )
    ax.axvline(0, color="gray", linestyle="--", linewidth=1)
    ax.set_yticks(y, [f"{labels[i]} (n={int(n)})" for i, n in rows["n_paired"].items()])
    ax.invert_yaxis()
    ax.set_xlabel(f"{metric_words(task, metric)}: run − full cache, paired over samples")
    fig.suptitle(f"{model} · {task}: difference from the full cache")
    ax.set_title(
        wrapped(
            "95 % paired-bootstrap interval; filled marker: outside noise (the interval "
            "excludes 0, n ≥ 6); hollow: within noise or too few pairs",
            95,
        ),
        fontsize=8,
        color="dimgray",
    )
    ax.grid(True, axis="x", alpha=0.3)
    return fig


PLOTS = {
    "score_vs_kv_ratio": plot_score_vs_kv_ratio,
    "paired_difference": plot_paired_difference,
    "fidelity_vs_kv_ratio": plot_fidelity_vs_kv_ratio,
    **COST_PLOTS,
}
PLOT_TITLES = {
    "score_vs_kv_ratio": "score vs KV cache kept",
    "paired_difference": "paired difference from the full cache",
    "fidelity_vs_kv_ratio": "output fidelity (token F1) vs KV cache kept",
    **COST_TITLES,
    **NLL_TITLES,
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
        for kind, plot in {**PLOTS, **NLL_PLOTS}.items():  # NLL plots: None without NLL
            save(f"{kind}__{where}", partial(plot, group, colors))
        if requests is not None and not requests.empty:
            mine = requests[(requests["model"] == model) & (requests["task"] == task)]
            if has_context(mine):
                labels = dict(zip(group["run_id"], run_labels(group), strict=True))
                context = partial(plot_context, mine, colors, labels, peak_words(group))
                save(f"context__{where}", context)
        for kind, plot in {**METHOD_PLOTS, **RULER_PLOTS}.items():
            save(f"{kind}__{where}", partial(plot, group))
    return paths
