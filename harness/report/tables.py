"""The report's rows: one per run (:func:`run_row`) and one per request (:func:`request_rows`)
from a record, the per-method summary (:func:`best_by_kv_ratio`) and markdown formatting.

Everything here reads plain record dicts and tolerates missing fields (NaN), so that one odd
record never breaks a report; :func:`check` says why a record cannot be reported at all.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pandas as pd

from harness.record_values import get
from harness.records import SCHEMA_VERSION
from harness.report import ratios
from harness.report.labels import flat_params, format_params, metric_name
from harness.report.stats import score_interval

FULL_METHOD = "full"
REQUIRED = (("run_id",), ("model", "name"), ("method", "name"), ("task", "name"), ("score",))
# metric names (before lm-eval's ",filter") read as a perplexity, in order of preference
PERPLEXITY_METRICS = ("perplexity", "word_perplexity", "token_perplexity", "ppl")
# the measured KV ratio is reported in the nearest of these buckets
KV_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
MB = 2**20
# parameters that set a method's size: always in the summary's method_params
HEADLINE_PARAMS = ("ratio", "budget", "dim", "num_kv_heads", "variant")
# config fields of a run's task that say what it ran on (a label names those that differ)
IGNORED_TASK_FIELDS = ("_target_", "name", "local_tasks", "hub_tasks", "sample_fields", "source")
PEAK_MEMORY_WORDS = {
    "cuda_max_allocated": "CUDA allocator peak (weights, KV cache, activations)",
    "weights_plus_kv_allocated": "weights + KV cache allocated",
    "rss_peak": "process resident-set peak (RSS: does not show the KV cache)",
}


def num(value: Any) -> float:
    """``value`` as a float, NaN when it is absent or not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    return float(value)


def distinguishing_params(table: pd.DataFrame) -> pd.Series:
    """Per run, the summary's short ``method_params``: the parameters that set a method's size
    (:data:`HEADLINE_PARAMS`) and those whose values differ between the runs of its method in
    ``table``; all of them when that leaves none, so a method with parameters never shows a
    blank cell (KV-Latent's two dozen training settings would hide the dim and RoPE mode that
    tell its runs apart)."""
    params = table["params_json"].map(lambda text: json.loads(text) if text else {})
    shown = pd.Series("", index=table.index, dtype=object)
    for _, group in params.groupby(table["method"]):
        flat = [flat_params(p) for p in group]
        keys = set().union(*flat)
        differing = {k for k in keys if len({repr(f.get(k)) for f in flat}) > 1}
        headline = {k for k in keys if k.rsplit(".", 1)[-1] in HEADLINE_PARAMS}
        wanted = (differing | headline) or keys
        for index, p in group.items():
            shown[index] = format_params(p, wanted) or format_params(p)
    return shown


def param_dicts(params: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The params dict and, depth first, those of the methods it composes."""
    out = [params or {}]
    for value in (params or {}).values():
        if isinstance(value, dict):
            out.extend(param_dicts(value))
    return out


def method_ratio(name: str, params: dict[str, Any] | None) -> tuple[float, float]:
    """(ratio, budget) a method was configured with: ``budget`` (tokens) when one is set,
    with ratio NaN (the budget overrides it; the measured ``kv_ratio`` says what it kept);
    else ``ratio``; 1.0 for the full cache; NaN when unknown."""
    for p in param_dicts(params):
        if not math.isnan(num(p.get("budget"))):
            return math.nan, float(p["budget"])
        if not math.isnan(num(p.get("ratio"))):
            return float(p["ratio"]), math.nan
    return (1.0 if name == FULL_METHOD else math.nan), math.nan


def requested_ratio(measurements: dict[str, Any], configured: float) -> float:
    """The KV ratio the cache methods were asked for, as the record says
    (``measurements.kv_ratio_requested``); older records: the configured ``ratio``."""
    if "kv_ratio_requested" in measurements:
        value = num(measurements.get("kv_ratio_requested"))
        return 1.0 if math.isnan(value) and configured == 1.0 else value
    return configured


def described(describe: dict[str, Any] | None, key: str) -> Any:
    """``key`` of what the record says the method was (``method.describe``: its own dict, or
    a composed method's per-member dicts), None when absent."""
    for d in param_dicts(describe):
        if key in d:
            return d[key]
    return None


def perplexity(metrics: Any) -> float:
    """The first perplexity-like metric of lm-eval's results (:data:`PERPLEXITY_METRICS`)."""
    for wanted in PERPLEXITY_METRICS:
        for results in (metrics or {}).values():
            for key, value in (results if isinstance(results, dict) else {}).items():
                if str(key).split(",")[0] == wanted and not math.isnan(num(value)):
                    return float(value)
    return math.nan


def check(record: Any) -> str | None:
    """Why ``record`` cannot be reported, or None when it can."""
    if not isinstance(record, dict):
        return "not a JSON object (not a kvbench record)"
    version = record.get("schema_version")
    if version is None and "run_id" not in record:
        return "no schema_version or run_id: not a kvbench record"
    if version != SCHEMA_VERSION:
        older = isinstance(version, int) and version < SCHEMA_VERSION
        hint = " (written by an older kvbench: re-run it to report it)" if older else ""
        return f"schema_version {version!r}, expected {SCHEMA_VERSION}{hint}"
    for keys in REQUIRED:
        if get(record, *keys) is None:
            return f"missing key {'.'.join(keys)}"
    return None


def task_label(record: dict[str, Any]) -> str:
    """The task's name, with the BBH subtask when one was run (``bbh/date_understanding``)."""
    name = str(record["task"]["name"])
    subtask = get(record, "config", "task", "subtask")
    return f"{name}/{subtask}" if subtask else name


def run_row(record: dict[str, Any], path: str) -> dict[str, Any]:
    """One row of the report table (see ``harness.report.build.COLUMNS``)."""
    meas = record.get("measurements") or {}
    prov = record.get("provenance") or {}
    method = record["method"]
    params = method.get("params") if isinstance(method.get("params"), dict) else {}
    ratio, budget = method_ratio(method["name"], ratios.kv_params(params))
    prompt_kept = ratios.prompt_kept(params)
    params = ratios.normalise_params(params)  # old records' prompt ``rate`` as ``ratio``
    describe = method.get("describe") if isinstance(method.get("describe"), dict) else {}
    samples = record.get("samples") or []
    docs = {(s.get("task"), s.get("doc_id")) for s in samples if isinstance(s, dict)}
    limit = num(get(record, "task", "limit"))
    interval = score_interval(record)
    device = prov.get("device") or get(record, "model", "device")

    def mean(field: str) -> float:
        return num(get(meas, field, "mean"))

    return {
        "run_id": record["run_id"],
        "model": record["model"]["name"],
        "method": method["name"],
        "label": None,  # the run's label, set over the whole table (labels.label_runs)
        "kinds": "+".join(method.get("kinds") or []),
        "method_params": format_params(params),
        "ratio": ratio,
        "budget": budget,
        "prompt_kept": prompt_kept,
        "d_qk": num(described(describe, "d_qk")),
        "d_vo": num(described(describe, "d_vo")),
        "trained": described(describe, "trained"),
        "task": task_label(record),
        "metric": get(record, "score", "metric"),
        "metric_name": metric_name(get(record, "score", "metric"), task_label(record)),
        "score": num(get(record, "score", "value")),
        "score_lo": interval.lo,
        "score_hi": interval.hi,
        "score_n": float(interval.n) if interval.n else math.nan,
        "score_ci": interval.source,
        "task_settings": json.dumps(task_settings(record), sort_keys=True, default=str),
        "perplexity": perplexity(record.get("metrics")),
        "n_samples": float(len(docs)) if docs else limit,
        "limit": limit,
        "kv_bytes_stored": mean("kv_bytes_prefill"),
        "kv_bytes_full": mean("kv_full_bytes_prefill"),
        "kv_ratio_requested": requested_ratio(meas, ratio),
        "kv_bytes_allocated": mean("kv_allocated_bytes_prefill"),  # stored + reserved room
        "kv_ratio": num(meas.get("kv_ratio")),
        "kv_ratio_reachable": num(meas.get("kv_ratio_reachable")),
        "kv_ratio_final": num(meas.get("kv_ratio_final")),
        "prompt_tokens": mean("prompt_tokens"),
        "prompt_ratio": num(meas.get("prompt_ratio")),  # what prompt methods kept
        "truncated_ratio": num(meas.get("truncated_ratio")),  # what the window cut
        "prefill_ms": mean("prefill_s") * 1000.0,
        "decode_tok_s": num(meas.get("decode_tok_per_s")),  # captures left out
        "capture_ms": num(get(meas, "capture_s", "total")) * 1000.0,  # capturing decode steps
        "peak_mem_mb": num(get(meas, "peak_memory_bytes", "max")) / MB,
        "peak_rise_mb": num(get(meas, "peak_memory_rise_bytes", "max")) / MB,
        "peak_mem_kind": peak_memory_kind(meas, device),
        "num_layers": num(get(record, "model", "num_layers")),
        "wall_s": num(prov.get("wall_s")),
        "device": device,
        "dtype": get(record, "model", "dtype"),
        "git_commit": prov.get("git_commit"),
        "method_code": _code(get(prov, "code", "methods")),
        "harness_code": _code(get(prov, "code", "harness")),
        "data_hash": get(record, "task", "data_hash"),
        "finished_at": prov.get("finished_at"),
        "params_json": json.dumps(params, sort_keys=True, default=str),
        "describe_json": json.dumps(describe, sort_keys=True, default=str),
        "stats_json": json.dumps(method.get("stats"), sort_keys=True, default=str),
        "path": path,
    }


def task_settings(record: dict[str, Any]) -> dict[str, Any]:
    """What a run's task ran on: its config's ``task`` fields (less the names and
    :data:`IGNORED_TASK_FIELDS`) with ``model.max_length`` and ``run.max_gen_toks``; an
    older record without a config: its ``task.limit``."""
    config = record.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("task"), dict):
        return {"limit": get(record, "task", "limit")}
    out = {k: v for k, v in config["task"].items() if k not in IGNORED_TASK_FIELDS}
    out["max_length"] = get(config, "model", "max_length")
    out["max_gen_toks"] = get(config, "run", "max_gen_toks")
    return out


def peak_memory_kind(measurements: dict[str, Any], device: Any) -> str:
    """What the record's ``peak_memory_bytes`` measured, in words (:data:`PEAK_MEMORY_WORDS`):
    ``measurements.peak_memory_kind``; an older record: the allocator's peak on CUDA, the
    process's resident-set peak on the CPU."""
    kind = measurements.get("peak_memory_kind")
    if kind is None:
        kind = "cuda_max_allocated" if "cuda" in str(device or "") else "rss_peak"
    return PEAK_MEMORY_WORDS.get(str(kind), str(kind))


def _code(value: Any) -> str | None:
    """A code-version hash (or a dict of them) as one comparable string; None if absent."""
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True) if value else None
    return str(value) if value else None


def request_rows(record: dict[str, Any], row: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per measured request of ``record`` (the per-filter sample copies counted once):
    prompt length against prefill time, decode speed, peak memory and KV bytes."""
    out, seen = [], set()
    for s in record.get("samples") or []:
        if not isinstance(s, dict) or (s.get("task"), s.get("doc_id")) in seen:
            continue
        seen.add((s.get("task"), s.get("doc_id")))
        for r in s.get("requests") or []:
            if not isinstance(r, dict):
                continue
            decode_s, steps = num(r.get("decode_s")), num(r.get("decode_steps"))
            out.append(
                {
                    "run_id": row["run_id"],
                    "model": row["model"],
                    "task": row["task"],
                    "method": row["method"],
                    "ratio": row["ratio"],
                    "budget": row["budget"],
                    "method_params": row["method_params"],
                    "doc_id": s.get("doc_id"),
                    "prompt_tokens": num(r.get("prompt_tokens")),
                    "prompt_tokens_original": num(r.get("prompt_tokens_original")),
                    "prefill_ms": num(r.get("prefill_s")) * 1000.0,
                    "decode_tok_s": steps / decode_s if decode_s > 0 else math.nan,
                    "decode_ms_tok": decode_s * 1000.0 / steps if steps > 0 else math.nan,
                    "capture_ms": num(r.get("capture_s")) * 1000.0,
                    "peak_mem_mb": num(r.get("peak_memory_bytes")) / MB,
                    "peak_rise_mb": num(r.get("peak_memory_rise_bytes")) / MB,
                    "kv_mb": num(r.get("kv_bytes_prefill")) / MB,
                    "kv_full_mb": num(r.get("kv_full_bytes_prefill")) / MB,
                    "reference_nll": num(r.get("reference_nll")),
                }
            )
    return out


# per-request columns of :func:`request_rows` summarised per run as p50 / p95
PERCENTILE_COLUMNS = (
    "prefill_ms",
    "decode_ms_tok",
    "kv_mb",
    "kv_full_mb",
    "peak_mem_mb",
    "peak_rise_mb",
)


def request_percentiles(requests: list[dict[str, Any]]) -> dict[str, float]:
    """``<column>_p50`` and ``<column>_p95`` over a run's requests for each of
    :data:`PERCENTILE_COLUMNS` (NaN where no request has the value)."""
    out = {}
    for column in PERCENTILE_COLUMNS:
        values = pd.Series([r.get(column) for r in requests], dtype=float).dropna()
        for q in (50, 95):
            out[f"{column}_p{q}"] = float(values.quantile(q / 100)) if len(values) else math.nan
    return out


def kv_bucket(kv_ratio: float) -> float:
    """The nearest of :data:`KV_BUCKETS` (NaN stays NaN)."""
    if math.isnan(kv_ratio):
        return math.nan
    return min(KV_BUCKETS, key=lambda b: abs(b - kv_ratio))


def best_by_kv_ratio(table: pd.DataFrame) -> pd.DataFrame:
    """Per (model, task, method): the best score among its runs in each measured-KV-ratio
    bucket (columns ``kv≈0.2``, ...), with the run count. Runs without a measured ratio are
    left out."""
    rows = table.dropna(subset=["kv_ratio", "score"]).copy()
    if rows.empty:
        return pd.DataFrame(columns=["model", "task", "method", "runs"])
    rows["bucket"] = rows["kv_ratio"].map(kv_bucket)
    pivot = rows.pivot_table(
        index=["model", "task", "method"], columns="bucket", values="score", aggfunc="max"
    )
    pivot.columns = [f"kv≈{b:g}" for b in pivot.columns]
    counts = rows.groupby(["model", "task", "method"]).size().rename("runs")
    return pivot.join(counts).reset_index()


def fmt(value: Any, digits: int = 4) -> str:
    """A cell for a markdown table: NaN as a dash, ``digits`` significant digits."""
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.{digits}g}"
    return "" if value is None else str(value)


def fmt_interval(estimate: Any, lo: Any, hi: Any, digits: int = 4) -> str:
    """``"0.143 [0.0476, 0.238]"``; the estimate alone when there is no interval."""
    if not isinstance(estimate, float | int) or math.isnan(estimate):
        return "–"
    if not isinstance(lo, float | int) or math.isnan(lo) or math.isnan(hi):
        return f"{fmt(float(estimate), digits)} [n/a]"
    parts = (fmt(float(v), digits) for v in (estimate, lo, hi))
    return "{} [{}, {}]".format(*parts)


def with_intervals(table: pd.DataFrame, digits: int = 4) -> pd.DataFrame:
    """``table`` with display columns for the summary: ``run`` (the run's label), ``metric``
    in words, ``n`` (samples the score is over), ``score (95% CI)``, ``CI from`` (Wilson or
    bootstrap, :mod:`harness.report.stats`), ``Δ vs full (95% CI)`` (the paired difference
    over the ``paired`` samples), ``NLL increase (95% CI)`` and ``KV kept`` (measured)."""
    out = table.copy()

    def joined(prefix: str, lo: str, hi: str) -> list[str]:
        columns = zip(out[prefix], out[lo], out[hi], strict=True)
        return [fmt_interval(e, a, b, digits) for e, a, b in columns]

    if "label" in out:
        out["run"] = out["label"]
    if "metric_name" in out:
        out["metric"] = out["metric_name"]
    out["n"] = out["score_n"].where(out["score_n"].notna(), out["n_samples"])
    out["score (95% CI)"] = joined("score", "score_lo", "score_hi")
    out["CI from"] = out["score_ci"]
    out["Δ vs full (95% CI)"] = joined("score_diff", "score_diff_lo", "score_diff_hi")
    out.loc[out["verdict"] == "reference", "Δ vs full (95% CI)"] = "(reference)"
    out["paired"] = out["n_paired"]
    out["NLL increase (95% CI)"] = joined("nll_increase", "nll_increase_lo", "nll_increase_hi")
    out["KV kept"] = [fmt(v, 2) for v in out["kv_ratio"]]
    return out


def markdown(table: pd.DataFrame, columns: list[str] | None = None) -> str:
    """``table`` (those ``columns``) as a GitHub markdown table."""
    if table.empty:
        return "(no finished runs)"
    columns = list(table.columns) if columns is None else columns
    shown = {c: [fmt(v) for v in table[c].tolist()] for c in columns if c in table.columns}
    return pd.DataFrame(shown).to_markdown(index=False, disable_numparse=True)
