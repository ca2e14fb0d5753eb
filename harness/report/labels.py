"""How the report names things: a run's label (the same in every table and plot) and a metric
in words.

A run's label is its method with the parameter that sets its size (``"snapkv r=0.2"``,
``"h2o budget=256"``, ``"dac kept=0.5"``, ``"kvlatent_kv d_qk=32 d_vo=32 trained"``; the full
cache is ``"full"``), so it does not change from one report to the next. Where two runs of
one model and task would share a label, it grows, in this order, by the method parameters
that tell them apart (``"snapkv r=0.2 (window=16)"``), then by the task settings that do
(``"full [3 per length]"``: lengths, samples, slice, few-shot count, window, generation
length), and last by a number. :func:`label_runs` computes the labels once for the whole
table (the ``label`` column); every table and plot reads that column.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pandas as pd

FULL_METHOD = "full"

# task-setting names as a label shows them ({} is the value)
SETTING_WORDS = {
    "samples_per_length": "{} per length",
    "lengths": "lengths {}",
    "limit": "limit {}",
    "num_fewshot": "{}-shot",
    "max_length": "window {}",
    "max_gen_toks": "{} new tokens",
    "subtask": "{}",
}
# ... and when a setting is unset (null)
UNSET_WORDS = {"limit": "all samples", "max_gen_toks": "task's generation length"}
# how a metric reads ("qasper F1", "GSM8K exact match (strict)", "pass rate")
METRIC_WORDS = {
    "qa_f1_score": "F1",
    "rouge_score": "Rouge-L",
    "exact_match": "exact match",
    "acc": "accuracy",
    "acc_norm": "accuracy (length-normalised)",
    "f1": "F1",
    "passed": "pass rate",
    "score": "score",
}
RULER_METRIC_WORDS = {"score": "share of values found", "passed": "pass rate"}
FILTER_WORDS = {"strict-match": "strict", "flexible-extract": "flexible", "get-answer": ""}
TASK_WORDS = {
    "longbench_qasper": "qasper",
    "longbench_multi_news": "multi_news",
    "gsm8k": "GSM8K",
    "bbh": "BBH",
}


def flat_params(params: dict[str, Any] | None, prefix: str = "") -> dict[str, Any]:
    """``{"ratio": 0.2, "training": {"lr": 0.003}}`` -> ``{"ratio": 0.2, "training.lr":
    0.003}``: nested dicts (composed methods, training) flattened, only scalars kept."""
    out: dict[str, Any] = {}
    for key, value in (params or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= flat_params(value, f"{name}.")
        elif isinstance(value, bool | int | float | str):
            out[name] = value
    return out


def format_params(params: dict[str, Any] | None, keys: set[str] | None = None) -> str:
    """``{"ratio": 0.2, "sinks": 4}`` -> ``"ratio=0.2, sinks=4"``; nested dicts (composed
    methods) become ``"snapkv.ratio=0.2"``. Only scalars are kept; ``None`` is left out.
    With ``keys``, only those (flattened) parameters are shown."""
    parts = []
    for name, value in flat_params(params).items():
        if keys is not None and name not in keys:
            continue
        parts.append(f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}")
    return ", ".join(parts)


def _is_set(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


def run_label(row: Any) -> str:
    """The stable part of a run's label, from a row of the runs table (see the module): the
    method, then its budget or ratio (cache methods: ``r=``, the fraction kept), the kept share
    of the prompt (prompt methods: ``kept=``) and head dims
    (KV-Latent), each where set; a composed method shows each of its members'."""
    method = str(row.method)
    parts = [method]
    if _is_set(getattr(row, "prompt_kept", math.nan)):
        parts.append(f"kept={row.prompt_kept:g}")
    d_qk, d_vo = getattr(row, "d_qk", math.nan), getattr(row, "d_vo", math.nan)
    if _is_set(d_qk) or _is_set(d_vo):
        parts.append(f"d_qk={d_qk:g} d_vo={d_vo:g}{trained_suffix(row)}")
    if _is_set(getattr(row, "budget", math.nan)):
        parts.append(f"budget={row.budget:g}{sliding_suffix(row)}")
    elif _is_set(getattr(row, "ratio", math.nan)) and method != FULL_METHOD:
        parts.append(f"r={row.ratio:g}{sliding_suffix(row)}")
    return " ".join(parts)


def sliding_suffix(row: Any) -> str:
    """``" +sliding"`` for a cache method that compressed sliding-window layers too."""
    params = _loads(getattr(row, "params_json", ""))
    return " +sliding" if params.get("compress_sliding") else ""


def trained_suffix(row: Any) -> str:
    """``" trained"`` / ``" untrained"`` for a model method that says, else ``""``."""
    value = getattr(row, "trained", None)
    if value is True:
        return " trained"
    if value is False:
        return " untrained"
    return ""


def _loads(text: Any) -> dict[str, Any]:
    try:
        value = json.loads(text) if isinstance(text, str) and text else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def differing(dicts: list[dict[str, Any]]) -> list[str]:
    """The keys whose values are not the same in all of ``dicts``, in first-seen order."""
    keys = dict.fromkeys(k for d in dicts for k in d)
    return [k for k in keys if len({repr(d.get(k)) for d in dicts}) > 1]


def setting_words(settings: dict[str, Any], keys: list[str]) -> str:
    """``{"samples_per_length": 3}`` -> ``"3 per length"`` (lists joined by commas)."""
    parts = []
    for key in keys:
        value = settings.get(key)
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)
        template = SETTING_WORDS.get(key, key.rsplit(".", 1)[-1] + "={}")
        unset = UNSET_WORDS.get(key, template.format("none"))
        parts.append(unset if value is None else template.format(value))
    return ", ".join(parts)


def _grow(labels: list[str], rows: list[Any], extra) -> list[str]:
    """Each label shared by several rows gets `` extra(those rows)[i]`` appended."""
    out = list(labels)
    for label in set(labels):
        same = [i for i, lab in enumerate(labels) if lab == label]
        if len(same) > 1:
            for i, words in zip(same, extra([rows[i] for i in same]), strict=True):
                out[i] = f"{label} {words}" if words else label
    return out


def _by_params(rows: list[Any]) -> list[str]:
    params = [flat_params(_loads(getattr(r, "params_json", ""))) for r in rows]
    keys = set(differing(params))
    return [f"({format_params(p, keys)})" if keys else "" for p in params]


def _by_settings(rows: list[Any]) -> list[str]:
    settings = [_loads(getattr(r, "task_settings", "")) for r in rows]
    keys = differing(settings)
    return [f"[{setting_words(s, keys)}]" if keys else "" for s in settings]


def group_labels(group: pd.DataFrame) -> list[str]:
    """The labels of the runs of one (model, task), in row order (see the module)."""
    rows = list(group.itertuples())
    labels = [run_label(row) for row in rows]
    labels = _grow(labels, rows, _by_params)
    labels = _grow(labels, rows, _by_settings)
    for i, label in enumerate(list(labels)):
        if labels.count(label) > 1:
            labels[i] = f"{label} #{labels[:i].count(label) + 1}"
    return labels


def label_runs(table: pd.DataFrame) -> pd.Series:
    """Every run's label (:func:`group_labels` per model and task), indexed as ``table``."""
    out = pd.Series("", index=table.index, dtype=object)
    if table.empty:
        return out
    for _, group in table.groupby(["model", "task"], sort=False):
        out[group.index] = group_labels(group)
    return out


def run_labels(group: pd.DataFrame) -> list[str]:
    """The labels of ``group``'s rows: its ``label`` column (computed once over the whole
    report by :func:`label_runs`), else computed over ``group`` alone."""
    if "label" in group.columns and group["label"].notna().all():
        return [str(label) for label in group["label"]]
    if {"model", "task"} <= set(group.columns):
        return list(label_runs(group))
    return group_labels(group)


def metric_name(metric: str | None, task: str = "") -> str:
    """``"exact_match,strict-match"`` -> ``"exact match (strict)"``, RULER's ``"score,none"``
    -> ``"share of values found"``; an unknown name is shown as it is."""
    name, _, filt = str(metric or "score").partition(",")
    words = METRIC_WORDS.get(name, name)
    if str(task).startswith("ruler"):
        words = RULER_METRIC_WORDS.get(name, words)
    extra = FILTER_WORDS.get(filt, filt) if filt and filt != "none" else ""
    return f"{words} ({extra})" if extra else words


def metric_words(task: str, metric: str | None) -> str:
    """``("longbench_qasper", "qa_f1_score,none")`` -> ``"qasper F1"``: the task and its
    metric in words (axis labels)."""
    base, _, subtask = str(task).partition("/")
    words = f"{TASK_WORDS.get(base, base)}{'/' + subtask if subtask else ''}"
    return f"{words} {metric_name(metric, task)}"
