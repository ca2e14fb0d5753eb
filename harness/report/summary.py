"""The report's summary tables: a compact one for the terminal (:func:`summary_markdown`, at
most :data:`TERMINAL_WIDTH` columns wide) and the detailed one in ``report.md``
(:func:`details_markdown`). Both name runs by their label (:mod:`harness.report.labels`) and
give every score the interval of :mod:`harness.report.stats`, the numbers the plots show.
"""

from __future__ import annotations

import pandas as pd

from harness.report.labels import label_runs
from harness.report.tables import distinguishing_params, fmt, markdown, with_intervals

TERMINAL_WIDTH = 100
# one table per (model, task), under a heading naming them and the metric: {shown: column};
# the last ones are left out (and named) where a long label would pass TERMINAL_WIDTH
COMPACT_COLUMNS = {
    "run": "run",
    "n": "n",
    "score [95% CI]": "score (95% CI)",
    "Δ vs full [95% CI]": "Δ vs full (95% CI)",
    "verdict": "verdict",
    "KV kept": "KV kept",
}
DETAIL_COLUMNS = [
    "model",
    "task",
    "run",
    "method",
    "method_params",
    "metric",
    "n",
    "score (95% CI)",
    "CI from",
    "Δ vs full (95% CI)",
    "paired",
    "verdict",
    "exact_match",
    "token_f1",
    "NLL increase (95% CI)",
    "kv_ratio_requested",
    "kv_ratio",
    "kv_ratio_reachable",
    "prompt_tokens",
    "prefill_ms",
    "decode_tok_s",
    "peak_mem_mb",
]
STATISTICS_NOTE = (
    "How to read the summary. `run`: the run's label, the same in every table and plot (its "
    "method, the parameter that sets its size, and where two runs of a task would share it, "
    "the parameters or task settings that tell them apart). `n`: samples the score is over. "
    "`score (95% CI)`: the task score with its 95 % interval, one rule everywhere: Wilson "
    "for pass/fail metrics (exact match, pass rate), a seeded percentile bootstrap over the "
    "per-sample values for continuous ones (F1, Rouge-L), a Wilson-style bound when every "
    "sample gave the same value; never outside the metric's range, never of zero width "
    "(`CI from` says which). `Δ vs full (95% CI)`: the paired difference from the "
    "full-cache run of the same model, task, slice and data, mean over the `paired` samples "
    "(same document and the same `prompt_hash`) of run − full, with a paired bootstrap "
    "interval; `verdict` is `higher`/`lower` only when that interval excludes 0 over at "
    "least 6 paired samples, `within noise` when it holds 0, `too few (n<6)` below 6 pairs "
    "(no distribution-free 95 % test of a paired difference can reject 0 on fewer). "
    "Fidelity against the same full-cache run: `exact_match` (identical outputs), `token_f1` "
    "(token overlap), `NLL increase` (reference-answer NLL per token, run − full, paired "
    "bootstrap interval). KV cache: `KV kept`/`kv_ratio` is what the method stored (measured "
    "bytes after prefill over a full cache's), `kv_ratio_requested` what it was asked to "
    "keep, `kv_ratio_reachable` the lowest it could store on the same requests. "
    "Sliding-window layers (Gemma-3's local layers) are left to their window unless "
    "`method.compress_sliding=true`, so on such models the measured ratio is above the "
    "requested one. `peak_mem_mb`: see the memory plot for what it measured."
)


def _display(table: pd.DataFrame, digits: int) -> pd.DataFrame:
    if "label" not in table.columns or table["label"].isna().any():
        table = table.assign(label=label_runs(table))
    if "params_json" in table.columns:
        table = table.assign(method_params=distinguishing_params(table))
    return with_intervals(table, digits)


def summary_markdown(table: pd.DataFrame) -> str:
    """The compact summary printed to the terminal (and heading ``report.md``): per (model,
    task) a heading with the metric, then one row per run (:data:`COMPACT_COLUMNS`), at most
    :data:`TERMINAL_WIDTH` columns wide; the other columns are in :func:`details_markdown`."""
    if table.empty:
        return "(no finished runs)"
    shown = _display(table, 3)
    parts = []
    for (model, task), group in shown.groupby(["model", "task"], sort=False):
        metric = group["metric"].dropna().iloc[0] if group["metric"].notna().any() else "score"
        cells = {name: [fmt(v) for v in group[column]] for name, column in COMPACT_COLUMNS.items()}
        text, left_out = compact_table(cells, TERMINAL_WIDTH)
        note = f" ({', '.join(left_out)}: in report.md)" if left_out else ""
        parts.append(f"{model} · {task} · {metric}{note}\n\n{text}")
    return "\n\n".join(parts)


def compact_table(cells: dict[str, list[str]], width: int) -> tuple[str, list[str]]:
    """``cells`` (``{header: column}``) as a markdown table without tabulate's padding,
    leaving out its last columns while it is wider than ``width``: (text, the headers left
    out)."""
    headers, left_out = list(cells), []
    while True:
        widths = [max(len(h), *(len(c) for c in cells[h])) for h in headers]
        lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"]
        lines.append("|" + "|".join(":" + "-" * (w + 1) for w in widths) + "|")
        for i in range(len(cells[headers[0]])):
            row = (cells[h][i].ljust(w) for h, w in zip(headers, widths, strict=True))
            lines.append("| " + " | ".join(row) + " |")
        if max(len(line) for line in lines) <= width or len(headers) <= 3:
            return "\n".join(lines), left_out
        left_out.insert(0, headers.pop())


def details_table(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with the display values of :data:`DETAIL_COLUMNS` (labels, intervals as
    text): the rows of :func:`details_markdown` and of the HTML page's per-task tables."""
    return _display(table, 4)


def details_markdown(table: pd.DataFrame) -> str:
    """Every summary column (:data:`DETAIL_COLUMNS`) in one table: ``report.md``'s "Details"."""
    if table.empty:
        return "(no finished runs)"
    return markdown(_display(table, 4), DETAIL_COLUMNS)
