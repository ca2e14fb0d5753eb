"""The prompt-method table: score, fidelity to the uncompressed run, requested and
achieved rate, compression time, from the records a prompt-method sweep wrote.

    python bench/prompt_table.py RESULTS_DIR

One row per (task, method, rate). ``agree`` is the share of documents whose filtered output
equals the full run's, ``f1_vs_full`` the mean token F1 of the raw output against the full
run's; ``achieved`` is 1 - (compressible tokens after / before) in the
target model's tokens, summed over requests; ``prompt`` is the whole prompt's ratio;
``ms/1k tok`` is compression time per 1000 compressible tokens.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

from harness.records import find_records, read_record

ORDER = ["full", "random_deletion", "selfinfo", "llmlingua", "dac"]


def outputs(record: dict[str, Any], key: str = "filtered_output") -> dict[tuple, Any]:
    return {(s["task"], s["doc_id"], s["filter"]): s[key] for s in record["samples"]}


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the whitespace-token bags of two outputs (1.0 when both are empty)."""
    pred, ref = (prediction or "").split(), (reference or "").split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    return 0.0 if common == 0 else 2 * common / (len(pred) + len(ref))


def row(record: dict[str, Any], full: dict[str, Any] | None) -> dict[str, Any]:
    meas, params = record["measurements"], record["method"]["params"]

    def total(field: str) -> float:
        return (meas.get(field) or {}).get("total", 0.0)

    before = total("compressible_tokens_original")
    mine, ref = outputs(record), outputs(full) if full else {}
    shared = [k for k in mine if k in ref]
    raw, raw_ref = outputs(record, "output"), outputs(full, "output") if full else {}
    return {
        "task": record["task"]["name"],
        "method": record["method"]["name"],
        "rate": params.get("rate", 0.0),
        "n": len({(s["task"], s["doc_id"]) for s in record["samples"]}),
        "score": record["score"]["value"],
        "agree": sum(mine[k] == ref[k] for k in shared) / len(shared) if shared else None,
        "f1_vs_full": sum(token_f1(raw[k], raw_ref[k]) for k in shared) / len(shared)
        if shared
        else None,
        "achieved": 1 - total("compressible_tokens") / before if before else 0.0,
        "prompt": meas.get("prompt_ratio"),
        "passes": (meas.get("compressor_passes") or {}).get("mean", 0.0),
        "ms/1k tok": 1e6 * total("prompt_method_s") / before if before else 0.0,
    }


def table(root: Path) -> list[dict[str, Any]]:
    records = [read_record(p) for p in find_records(root)]
    full = {r["task"]["name"]: r for r in records if r["method"]["name"] == "full"}
    rows = [row(r, full.get(r["task"]["name"])) for r in records]
    rank = {m: i for i, m in enumerate(ORDER)}
    return sorted(rows, key=lambda r: (r["task"], r["rate"], rank.get(r["method"], 99)))


def markdown(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no records)"
    cols = list(rows[0])

    def fmt(v: Any) -> str:
        return "–" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(table(Path(sys.argv[1] if len(sys.argv) > 1 else "results"))))
