"""The ``kvbench-report`` command: every finished record under a folder, in one table.

    kvbench-report results/                  # writes results/report/{report.csv,.parquet,.md,*.png}
    kvbench-report results/ --out /tmp/rep

One row per run (model x method x task): the task's score, the KV bytes actually stored
against what a full cache holds, prefill and decode speed, peak memory, provenance, and
fidelity against the full-cache run of the same model and task (``score_delta``,
``output_agreement``). A record that cannot be read is listed and skipped, never fatal.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from harness.records import SCHEMA_VERSION, find_records, read_record

COLUMNS = [
    "run_id",
    "model",
    "method",
    "method_params",
    "ratio",
    "budget",
    "task",
    "metric",
    "score",
    "score_delta",
    "output_agreement",
    "n_samples",
    "limit",
    "kv_bytes_stored",
    "kv_bytes_full",
    "kv_ratio",
    "kv_ratio_final",
    "prompt_tokens",
    "prompt_ratio",
    "prefill_ms",
    "decode_tok_s",
    "peak_mem_mb",
    "wall_s",
    "device",
    "dtype",
    "git_commit",
    "finished_at",
    "path",
]
SUMMARY_COLUMNS = [
    "model",
    "task",
    "method",
    "method_params",
    "metric",
    "score",
    "score_delta",
    "output_agreement",
    "kv_ratio",
    "prompt_tokens",
    "prefill_ms",
    "decode_tok_s",
    "peak_mem_mb",
    "n_samples",
]
FIDELITY_COLUMNS = ("score_delta", "output_agreement")
SORT_BY = ["model", "task", "method", "ratio"]
REQUIRED = (("run_id",), ("model", "name"), ("method", "name"), ("task", "name"), ("score",))
FULL_METHOD = "full"


def _get(data: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _num(value: Any) -> float:
    """``value`` as a float, NaN when it is absent or not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    return float(value)


def format_params(params: dict[str, Any] | None, prefix: str = "") -> str:
    """``{"ratio": 0.2, "sinks": 4}`` -> ``"ratio=0.2, sinks=4"``; nested dicts (composed
    methods) become ``"snapkv.ratio=0.2"``. Only scalars are kept; ``None`` is left out."""
    parts = []
    for key, value in (params or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            nested = format_params(value, f"{name}.")
            if nested:
                parts.append(nested)
        elif isinstance(value, float):
            parts.append(f"{name}={value:g}")
        elif isinstance(value, bool | int | str):
            parts.append(f"{name}={value}")
    return ", ".join(parts)


def _param_dicts(params: dict[str, Any]) -> list[dict[str, Any]]:
    """The params dict and, depth first, those of the methods it composes."""
    out = [params]
    for value in params.values():
        if isinstance(value, dict):
            out.extend(_param_dicts(value))
    return out


def method_ratio(name: str, params: dict[str, Any] | None) -> tuple[float, float]:
    """(ratio, budget) a method was configured with: ``budget`` (tokens) when one is set,
    with ratio NaN (the budget overrides it; the measured ``kv_ratio`` says what it kept);
    else ``ratio``; 1.0 for the full cache; NaN when unknown."""
    for p in _param_dicts(params or {}):
        if not math.isnan(_num(p.get("budget"))):
            return math.nan, float(p["budget"])
        if not math.isnan(_num(p.get("ratio"))):
            return float(p["ratio"]), math.nan
    return (1.0 if name == FULL_METHOD else math.nan), math.nan


def _check(record: Any) -> str | None:
    """Why ``record`` cannot be reported, or None when it can."""
    if not isinstance(record, dict):
        return "not a JSON object"
    version = record.get("schema_version")
    if version != SCHEMA_VERSION:
        return f"schema_version {version!r}, expected {SCHEMA_VERSION}"
    for keys in REQUIRED:
        if _get(record, *keys) is None:
            return f"missing key {'.'.join(keys)}"
    return None


def _row(record: dict[str, Any], path: Path) -> dict[str, Any]:
    meas = record.get("measurements") or {}
    prov = record.get("provenance") or {}
    method = record["method"]
    ratio, budget = method_ratio(method["name"], method.get("params"))
    samples = record.get("samples") or []
    docs = {(s.get("task"), s.get("doc_id")) for s in samples if isinstance(s, dict)}
    limit = _num(_get(record, "task", "limit"))

    def mean(field: str) -> float:
        return _num(_get(meas, field, "mean"))

    return {
        "run_id": record["run_id"],
        "model": record["model"]["name"],
        "method": method["name"],
        "method_params": format_params(method.get("params")),
        "ratio": ratio,
        "budget": budget,
        "task": record["task"]["name"],
        "metric": _get(record, "score", "metric"),
        "score": _num(_get(record, "score", "value")),
        "n_samples": float(len(docs)) if docs else limit,
        "limit": limit,
        "kv_bytes_stored": mean("kv_bytes_prefill"),
        "kv_bytes_full": mean("kv_full_bytes_prefill"),
        "kv_ratio": _num(meas.get("kv_ratio")),
        "kv_ratio_final": _num(meas.get("kv_ratio_final")),
        "prompt_tokens": mean("prompt_tokens"),
        "prompt_ratio": _num(meas.get("prompt_ratio")),
        "prefill_ms": mean("prefill_s") * 1000.0,
        "decode_tok_s": _num(meas.get("decode_tok_per_s")),
        "peak_mem_mb": _num(_get(meas, "peak_memory_bytes", "max")) / 2**20,
        "wall_s": _num(prov.get("wall_s")),
        "device": prov.get("device") or _get(record, "model", "device"),
        "dtype": _get(record, "model", "dtype"),
        "git_commit": prov.get("git_commit"),
        "finished_at": prov.get("finished_at"),
        "path": str(path),
    }


def _outputs(record: dict[str, Any]) -> dict[tuple, Any]:
    return {
        (s.get("task"), s.get("doc_id"), s.get("filter")): s.get("filtered_output")
        for s in record.get("samples") or []
        if isinstance(s, dict)
    }


def _add_fidelity(table: pd.DataFrame, outputs: dict[str, dict[tuple, Any]]) -> None:
    """``score_delta`` and ``output_agreement`` against the latest full-cache run of the same
    model and task (the fraction of samples whose filtered output is identical)."""
    table["score_delta"] = math.nan
    table["output_agreement"] = math.nan
    full = table[table["method"] == FULL_METHOD].sort_values("finished_at", na_position="first")
    for (model, task), ref in full.groupby(["model", "task"], sort=False):
        ref = ref.iloc[-1]
        rows = (table["model"] == model) & (table["task"] == task)
        table.loc[rows, "score_delta"] = table.loc[rows, "score"] - ref["score"]
        ref_out = outputs.get(ref["path"], {})
        for idx in table.index[rows]:
            mine = outputs.get(table.at[idx, "path"], {})
            shared = [key for key in mine if key in ref_out]
            if shared:
                same = sum(mine[key] == ref_out[key] for key in shared)
                table.at[idx, "output_agreement"] = same / len(shared)


def load_records(root: Path) -> tuple[pd.DataFrame, list[tuple[Path, str]]]:
    """One row per finished run under ``root``; the second value lists ``(path, reason)``
    for every record skipped (unreadable JSON, wrong schema_version, missing keys)."""
    rows, skipped, outputs = [], [], {}
    for path in find_records(Path(root)):
        try:
            record = read_record(path)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            skipped.append((path, f"unreadable: {exc}"))
            continue
        reason = _check(record)
        if reason is None:
            try:
                row, outs = _row(record, path), _outputs(record)
            except (TypeError, KeyError, AttributeError, ValueError) as exc:
                reason = f"malformed: {exc!r}"
        if reason is not None:
            skipped.append((path, reason))
            continue
        rows.append(row)
        outputs[str(path)] = outs
    table = pd.DataFrame(rows, columns=[c for c in COLUMNS if c not in FIDELITY_COLUMNS])
    _add_fidelity(table, outputs)
    table = table[COLUMNS].sort_values(SORT_BY, na_position="last", kind="stable")
    return table.reset_index(drop=True), skipped


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return "" if value is None else str(value)


def _markdown(table: pd.DataFrame, columns: list[str]) -> str:
    if table.empty:
        return "(no finished runs)"
    shown = {c: [_fmt(v) for v in table[c].tolist()] for c in columns if c in table.columns}
    return pd.DataFrame(shown).to_markdown(index=False, disable_numparse=True)


def summary_markdown(table: pd.DataFrame) -> str:
    """The compact table printed to the terminal (and heading ``report.md``)."""
    return _markdown(table, SUMMARY_COLUMNS)


def write_report(table: pd.DataFrame, out_dir: Path) -> dict[str, Path]:
    """Write ``report.csv``, ``report.parquet``, ``report.md`` and the plots into
    ``out_dir``; returns ``{kind: path}`` (plots keyed by their file stem)."""
    from harness.plots import write_plots

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {kind: out_dir / f"report.{kind}" for kind in ("csv", "parquet", "md")}
    table.to_csv(paths["csv"], index=False)
    table.to_parquet(paths["parquet"], index=False)
    details = _markdown(table, [c for c in table.columns if c != "path"])
    paths["md"].write_text(
        f"# kvbench report\n\n{summary_markdown(table)}\n\n## All columns\n\n{details}\n"
    )
    paths.update(write_plots(table, out_dir))
    return paths


def main(argv: list[str] | None = None) -> int:
    """``kvbench-report DIR [--out OUT]``: 0 on success, 1 when DIR holds no record."""
    parser = argparse.ArgumentParser(
        prog="kvbench-report",
        description="Read every finished kvbench record under DIR into one table; write "
        "CSV, parquet, markdown and PNG plots.",
    )
    parser.add_argument("dir", type=Path, help="results folder (searched recursively)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (DIR/report)")
    args = parser.parse_args(argv)
    if not args.dir.is_dir():
        print(f"kvbench-report: {args.dir} is not a directory", file=sys.stderr)
        return 1
    table, skipped = load_records(args.dir)
    for path, reason in skipped:
        print(f"kvbench-report: skipped {path}: {reason}", file=sys.stderr)
    if table.empty:
        print(
            f"kvbench-report: no finished record (*/record.json) under {args.dir}", file=sys.stderr
        )
        return 1
    paths = write_report(table, args.out or args.dir / "report")
    print(summary_markdown(table))
    print(f"\n{len(table)} run(s), {len(skipped)} skipped")
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
