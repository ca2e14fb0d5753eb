"""What the report warns about: comparisons that mix code versions, and pairings that left
samples out.

A comparison is one (model, task): its table rows and plots put runs side by side. Each
record carries hashes of the source it was measured with (``provenance.code``: the method's
modules, and the harness's request/measurement modules); when two runs of one method, or
two runs of the comparison, were written by different versions, their difference may be the
code's, not the method's, and the report says so.
"""

from __future__ import annotations

import math

import pandas as pd


def _versions(rows: pd.DataFrame, column: str) -> list[str]:
    return sorted({v for v in rows[column].dropna() if v})


def code_warnings(table: pd.DataFrame) -> list[str]:
    """One line per comparison whose runs were written by different versions of a method's
    code (per method) or of the harness's measuring code."""
    out = []
    if table.empty:
        return out
    for (model, task), group in table.groupby(["model", "task"], sort=True):
        for method, rows in group.groupby("method", sort=True):
            versions = _versions(rows, "method_code")
            if len(versions) > 1:
                out.append(
                    f"{model} · {task}: the {len(rows)} runs of {method} were written by "
                    f"{len(versions)} versions of its code ({', '.join(rows['run_id'])}): "
                    "re-run the older ones (run.overwrite=true) before comparing them"
                )
        versions = _versions(group, "harness_code")
        if len(versions) > 1:
            out.append(
                f"{model} · {task}: its runs were measured by {len(versions)} versions of the "
                "harness's generation/measurement code: differences between them may come "
                "from the code; re-run the older ones (run.overwrite=true)"
            )
    return out


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def pairing_warnings(table: pd.DataFrame) -> list[str]:
    """One line per comparison whose runs have no full-cache reference of the same settings
    (their Δ and fidelity columns stay empty), and one per run compared with a reference on
    fewer samples than it has (the rest had another prompt, i.e. another ``prompt_hash``,
    or were missing from the reference)."""
    out = []
    if table.empty or "reference" not in table:
        return out
    for (model, task), group in table.groupby(["model", "task"], sort=True):
        alone = [
            r.run_id for r in group.itertuples() if r.method != "full" and _missing(r.reference)
        ]
        if alone:
            out.append(
                f"{model} · {task}: {len(alone)} run(s) have no full-cache run with the same "
                f"settings (task config, slice, window, generation length, data) to be paired "
                f"with, so their Δ and fidelity are empty ({', '.join(alone)}): run the full "
                "cache with their config"
            )
    for row in table.itertuples():
        paired, n = getattr(row, "n_paired", math.nan), getattr(row, "n_samples", math.nan)
        if row.reference is None or math.isnan(paired) or math.isnan(n) or paired >= n:
            continue
        out.append(
            f"{row.run_id}: paired with {row.reference} on {int(paired)} of its {int(n)} "
            "samples (the others had another prompt or are not in the reference)"
        )
    return out
