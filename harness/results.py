"""A run's record, assembled in one place: lm-eval's output and the session's per-request
measurements into the sections below (:func:`make_record`, :func:`provenance_section`).
:mod:`harness.records` names and writes the record, :mod:`harness.record_schema` types it.

``record.json`` (schema version 1)::

    schema_version  1
    run_id          the folder name
    config          resolved config (model, method, task, run)
    model           {name, num_layers, num_kv_heads, head_dim, dtype (resolved: ``auto`` is
                    bfloat16 on CUDA, float32 on the CPU), dtype_requested, device,
                    attn_implementation, max_length}
    method          {name, kinds, params, describe, stats}: ``describe`` the static facts of
                    the applied method (``Method.describe``: KV-Latent's d_qk/d_vo, trained),
                    ``stats`` what it did, over the requests (``Method.last_stats``: tokens
                    held and kept per layer, compressed layers, ...)
    task            {name, lm_eval_tasks, limit, primary_metric, data_hash}
    metrics         lm-eval's results, per lm-eval task / group
    score           {metric, value}: the task's primary metric
    measurements    per-request values aggregated: {field: {n, mean, p50, p95, min, max, total}}
                    plus totals: kv_ratio (measured), kv_ratio_requested,
                    kv_ratio_reachable, decode_tok_per_s (``capture_s``, the time spent
                    capturing decoding steps for new shapes, left out), prefill_tok_per_s
    samples         per-sample outputs with lm-eval's per-sample metrics and the request's
                    own measurements
    provenance      git commit, package versions, device, threads, seed, times, and
                    ``code``: hashes of the methods' and the harness's measuring source
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from harness import records
from harness.measure import RequestMeasurement, summarize
from harness.models import ModelSpec
from harness.provenance import code_hashes, now, provenance
from harness.record_values import is_number
from harness.session import Session
from harness.taskspec import TaskSpec
from methods.base import CacheMethod, Method

# every numeric measurement of a request, in RequestMeasurement's order: summed and averaged
# over the run (a field that is None in a request, e.g. a prompt method's rates without one,
# is left out of its summary)
MEASURED_FIELDS = tuple(
    f.name for f in dataclasses.fields(RequestMeasurement) if f.metadata.get("aggregate", True)
)


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-field summaries (n, mean, p50, p95, min, max, total) and run-level ratios.

    ``kv_ratio`` is stored KV bytes over full-cache KV bytes after prefill, summed over
    requests (``kv_ratio_final``: at the end of generation, generated tokens included);
    ``kv_ratio_reachable`` the lowest ratio the cache methods could reach on the same
    requests (None without a reducing cache method).

    Prompt tokens: ``prompt_tokens_original`` = ``prompt_tokens`` (seen) + ``truncated_tokens``
    (cut by the model's window) + what prompt methods removed. ``prompt_ratio`` measures the
    prompt methods only: tokens seen over tokens the window let through (1.0 without a prompt
    method, however much the window cut); ``truncated_ratio`` is the window's share: tokens
    cut over original tokens, and ``truncated_requests`` how many requests it cut.
    """
    out: dict[str, Any] = {"requests": len(rows)}
    for field in MEASURED_FIELDS:
        out[field] = summarize(row[field] for row in rows if row.get(field) is not None)

    def total(field: str) -> float:
        return out[field].get("total", 0.0)

    out["kv_ratio"] = _ratio(total("kv_bytes_prefill"), total("kv_full_bytes_prefill"))
    out["kv_ratio_final"] = _ratio(total("kv_bytes_final"), total("kv_full_bytes_final"))
    floor = out["kv_floor_bytes_prefill"]
    out["kv_ratio_reachable"] = (
        _ratio(total("kv_floor_bytes_prefill"), total("kv_full_bytes_prefill"))
        if floor.get("n") == len(rows) and rows
        else None
    )
    out["prompt_ratio"] = _ratio(
        total("prompt_tokens"), total("prompt_tokens_original") - total("truncated_tokens")
    )
    out["truncated_ratio"] = _ratio(total("truncated_tokens"), total("prompt_tokens_original"))
    out["truncated_requests"] = sum(1 for row in rows if row.get("truncated_tokens"))
    out["compressible_ratio"] = _ratio(
        total("compressible_tokens"), total("compressible_tokens_original")
    )
    out["prefill_tok_per_s"] = _ratio(total("prompt_tokens"), total("prefill_s"))
    out["decode_tok_per_s"] = _ratio(total("decode_steps"), total("decode_s"))
    return out


def method_stats(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The requests' ``method_stats`` (``Method.last_stats``) over the run: a value every
    request reported alike is kept as it is (e.g. ``compressed_layers``), numbers are
    averaged, lists of numbers averaged position by position (e.g. ``tokens_kept`` per
    layer; None entries skipped), nested dicts (composed methods) likewise."""
    return _merge([r["method_stats"] for r in rows if r.get("method_stats")])


def _merge(values: list[Any]) -> Any:
    if not values:
        return None
    if all(v == values[0] for v in values):
        return values[0]
    if all(isinstance(v, dict) for v in values):
        keys = dict.fromkeys(k for v in values for k in v)
        return {k: _merge([v[k] for v in values if k in v]) for k in keys}
    if all(is_number(v, finite=False) for v in values):
        return sum(values) / len(values)
    if all(isinstance(v, list) for v in values) and len({len(v) for v in values}) == 1:
        columns = zip(*values, strict=True)
        return [_merge([x for x in column if x is not None]) for column in columns]
    return values[-1]


def no_effect(kinds: set[str], measurements: dict[str, Any], asks_kv: bool) -> str | None:
    """Why a run whose methods asked for a reduction but measured none must not be recorded
    (a silent no-op, like transformers 5.24's renamed cache argument), or None."""
    kv, prompt = measurements.get("kv_ratio"), measurements.get("prompt_ratio")
    if asks_kv and is_number(kv, finite=False) and abs(kv - 1.0) <= 0.001:
        return (
            f"the cache method asked to keep {measurements.get('kv_ratio_requested')} of the "
            f"KV cache but stored {kv:.4f} of it: it had no effect. Check that its hooks see "
            "the KV cache (the attention modules' `cache`/`past_key_values` argument, "
            "methods.base.cache_of, in this transformers version), that it compresses this "
            "model's layers (sliding-window layers are left alone unless "
            "method.compress_sliding=true) and that its budget is below the prompt length"
        )
    rates = measurements.get("prompt_rate_requested") or {}
    if (
        "prompt" in kinds
        and rates.get("max", 0) > 0
        and is_number(prompt, finite=False)
        and prompt >= 0.999
    ):
        return (
            f"the prompt method asked to remove up to {rates['max']:.2f} of the prompt but "
            "removed nothing: it had no effect. Check that task.protect_from matches the "
            "prompts (without a match the whole prompt is protected) and the method's ratio"
        )
    return None


def samples(
    lm_eval_samples: dict[str, list[dict]], rows: list[dict], doc_fields: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """One entry per evaluated document: output, target, per-sample metrics, the document's
    ``doc_fields`` (``doc``: e.g. a RULER sample's length and needle depth), and the
    measurements of its request(s) (documents are matched by task and doc_id)."""
    by_doc: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for row in rows:
        by_doc[(row["task"], row["doc_id"])].append(row)
    out = []
    for task, entries in (lm_eval_samples or {}).items():
        for entry in entries:
            metrics = entry.get("metrics") or []
            doc_id = int(entry["doc_id"])
            resps = entry.get("resps") or []
            out.append(
                {
                    "task": task,
                    "doc_id": doc_id,
                    "filter": entry.get("filter"),
                    "target": entry.get("target"),
                    "output": resps[0][0] if resps and resps[0] else None,
                    "filtered_output": (entry.get("filtered_resps") or [None])[0],
                    "metrics": {m: entry.get(m) for m in metrics},
                    "prompt_hash": entry.get("prompt_hash"),
                    **_doc_fields(entry.get("doc") or {}, doc_fields),
                    "requests": [
                        {k: v for k, v in r.items() if k not in ("task", "doc_id")}
                        for r in by_doc.get((task, doc_id), [])
                    ],
                }
            )
    return out


def _doc_fields(doc: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    return {"doc": {name: doc.get(name) for name in names}} if names else {}


def primary_score(results: dict[str, Any], task_names: list[str], metric: str) -> float | None:
    """The task's primary metric from lm-eval's ``results`` (a group's aggregate if any)."""
    for name in task_names:
        value = (results.get(name) or {}).get(metric)
        if isinstance(value, int | float):
            return float(value)
    return None


def make_record(
    cfg: DictConfig,
    model_spec: ModelSpec,
    model_config: Any,
    method: Method,
    task: TaskSpec,
    session: Session,
    output: dict[str, Any],
    data_hash: str | None = None,
) -> dict[str, Any]:
    """The record of a finished run, every section but ``provenance``
    (:func:`provenance_section`, added once the run is known to have had an effect)."""
    text_config = model_config.get_text_config()
    rows = session.measurement_rows()
    names = task.task_names()
    return {
        "schema_version": records.SCHEMA_VERSION,
        "run_id": records.run_id(cfg, data_hash),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "model": {
            "name": model_spec.name,
            "num_layers": text_config.num_hidden_layers,
            "num_kv_heads": getattr(text_config, "num_key_value_heads", None),
            "head_dim": session.kv_layout.layers[0][1],
            "dtype": model_spec.resolved_dtype,
            "dtype_requested": model_spec.dtype,
            "device": str(session.device),
            "attn_implementation": model_spec.attn_implementation,
            "sdpa_backend": model_spec.resolved_sdpa_backend(model_config),
            "decode_capture": model_spec.decode_plan(method, model_config),
            "max_length": session.max_length,
        },
        "method": {
            "name": method.name,
            "kinds": sorted(method.kinds()),
            "params": method.params(),
            "describe": method.describe(),
            "stats": method_stats(rows),
        },
        "task": {
            "name": task.name,
            "lm_eval_tasks": names,
            "limit": task.limit,
            "primary_metric": task.primary_metric,
            "score_range": task.score_range,
            **({"ruler": task.ruler_settings()} if task.is_ruler else {}),
            "data_hash": data_hash,
        },
        "metrics": output["results"],
        "score": {
            "metric": task.primary_metric,
            "value": primary_score(output["results"], names, task.primary_metric),
        },
        "measurements": {
            **aggregate(rows),
            "kv_ratio_requested": requested_kv_ratio(method),
            # what peak_memory_bytes measured (harness.measure.PEAK_MEMORY_WORDS)
            "peak_memory_kind": session.peak_memory.kind,
        },
        "samples": samples(output.get("samples", {}), rows, task.sample_fields),
    }


def provenance_section(
    session: Session, method: Method, seed: int, started: str, clock: float
) -> dict[str, Any]:
    """Where, with what and when the run was made: git commit, packages, device, threads,
    seed, the hashes of the methods' and the harness's measuring source, start and end times
    (``started``, with ``clock`` its ``time.perf_counter()``)."""
    return {
        **provenance(session.device, seed),
        "code": code_hashes(method.flatten()),
        "started_at": started,
        "finished_at": now(),
        "wall_s": time.perf_counter() - clock,
    }


def requested_kv_ratio(method: Method) -> float | None:
    """The fraction of the KV cache the cache methods were asked to keep (their product),
    None when none asks for a ratio (token budgets, prompt or model methods only)."""
    ratios = [
        m.requested_ratio()
        for m in method.flatten()
        if isinstance(m, CacheMethod) and m.asks_reduction()
    ]
    if not ratios or any(r is None for r in ratios):
        return None
    product = 1.0
    for r in ratios:
        product *= r
    return product
