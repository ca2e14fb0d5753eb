"""Fidelity: how close a run's per-sample outputs stay to the full-cache run of the same setting.

For every run the report finds its *reference*: the latest full-cache record (method
``full``, no prompt or model method composed in) whose resolved config equals the run's
once the ``method`` section and the bookkeeping fields (``run.results_dir``,
``run.overwrite``, ``run.report``, ``model.threads``) are set aside: the same model, task,
subtask, slice (``task.limit``), few-shot count, window (``model.max_length``), seed and
generation length, and the same task data (``task.data_hash``, the content hash of the data
files the task read). Samples are paired by (lm-eval task, doc_id) **and only when their
``prompt_hash`` values agree** (the prompt lm-eval built, before any prompt method): a sample
whose prompt differs is a different question, and is left out (``n_paired`` says how many
were paired). lm-eval logs one entry per filter for the same generation, so the raw
``output`` of the first entry is used.

* ``score_diff`` (with ``score_diff_lo``/``score_diff_hi``): the paired difference of the
  primary metric, mean over paired samples of (run − reference), with its paired-bootstrap
  95 % interval (:mod:`harness.report.stats`); ``verdict`` says whether it is outside noise
  (``higher`` / ``lower``: the interval excludes 0) or ``within noise`` (``reference`` for
  the full-cache run itself); ``score_delta`` is the plain difference of the two scores;
* ``exact_match``: fraction of paired samples whose output equals the reference's
  (surrounding whitespace ignored);
* ``token_f1`` (with ``token_f1_lo``/``_hi``, :func:`stats.mean_interval`): mean over paired samples of
  SQuAD's F1 between the two outputs' bags of whitespace tokens (case and punctuation
  kept: both texts come from the same model);
* ``nll_increase`` (with ``nll_increase_lo``/``_hi``): mean over paired samples of (run −
  reference) of ``reference_nll``, the teacher-forced mean NLL per token of the reference
  answer that the adapter records per request, with its paired-bootstrap interval; NaN
  when either run lacks it.

Everything here is a pure function of record dicts; :mod:`harness.report` calls
:func:`summarize` once per record and :func:`add_fidelity` once per table.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from harness.record_values import get, is_number
from harness.records import BOOKKEEPING_FIELDS, MODEL_DEFAULTS
from harness.report import stats

FULL_METHOD = "full"
NLL_FIELD = "reference_nll"
FIDELITY_COLUMNS = (
    "reference",
    "n_paired",
    "score_delta",
    "score_diff",
    "score_diff_lo",
    "score_diff_hi",
    "verdict",
    "exact_match",
    "token_f1",
    "token_f1_lo",
    "token_f1_hi",
    "nll_increase",
    "nll_increase_lo",
    "nll_increase_hi",
)
TEXT_COLUMNS = ("reference", "verdict")
# the intervals a reference run gets none of against itself
SELF_BLANK = ("score_diff_lo", "score_diff_hi", "token_f1_lo", "token_f1_hi")
SELF_BLANK += ("nll_increase_lo", "nll_increase_hi")
# fields that change how fast a run is, never what it computes
IGNORED_MODEL_FIELDS = ("threads",)

SampleKey = tuple[str, int]


def sample_outputs(samples: list[dict[str, Any]] | None) -> dict[SampleKey, str]:
    """``{(task, doc_id): raw output}``, one per document (the per-filter copies dropped)."""
    out: dict[SampleKey, str] = {}
    for s in samples or []:
        if not isinstance(s, dict) or s.get("doc_id") is None:
            continue
        key = (str(s.get("task")), int(s["doc_id"]))
        if key not in out:
            output = s.get("output")
            out[key] = "" if output is None else str(output)
    return out


def sample_values(samples: list[dict[str, Any]] | None, name: str) -> dict[SampleKey, float]:
    """``{(task, doc_id): mean of the requests' numeric ``name``}`` for documents that have it."""
    out: dict[SampleKey, float] = {}
    for s in samples or []:
        if not isinstance(s, dict) or s.get("doc_id") is None:
            continue
        key = (str(s.get("task")), int(s["doc_id"]))
        if key in out:
            continue
        values = [
            float(r[name])
            for r in s.get("requests") or []
            if isinstance(r, dict) and is_number(r.get(name))
        ]
        if values:
            out[key] = sum(values) / len(values)
    return out


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's F1 over whitespace tokens: 1.0 when both are empty, 0.0 when one is."""
    pred, ref = prediction.split(), reference.split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match_rate(mine: dict[SampleKey, str], reference: dict[SampleKey, str]) -> float:
    """Fraction of the shared samples whose outputs are equal; NaN when none are shared."""
    shared = [k for k in mine if k in reference]
    if not shared:
        return math.nan
    return sum(mine[k].strip() == reference[k].strip() for k in shared) / len(shared)


def mean_token_f1(mine: dict[SampleKey, str], reference: dict[SampleKey, str]) -> float:
    """Mean :func:`token_f1` over the shared samples; NaN when none are shared."""
    shared = [k for k in mine if k in reference]
    if not shared:
        return math.nan
    return sum(token_f1(mine[k], reference[k]) for k in shared) / len(shared)


def nll_increase(mine: dict[SampleKey, float], reference: dict[SampleKey, float]) -> float:
    """Mean of (run - reference) NLL over the samples both measured; NaN when none did."""
    shared = [k for k in mine if k in reference]
    if not shared:
        return math.nan
    return sum(mine[k] - reference[k] for k in shared) / len(shared)


def reference_key(record: dict[str, Any]) -> str:
    """What a run and its full-cache reference share: the resolved config without the
    ``method`` section, the bookkeeping fields and the model fields at their
    :data:`~harness.records.MODEL_DEFAULTS` (records from before a field was added pair with
    those after), and the task data's content hash (``task.data_hash``), as canonical JSON."""
    config = record.get("config")
    if not isinstance(config, dict):
        config = {
            "model": {"name": get(record, "model", "name")},
            "task": {"name": get(record, "task", "name"), "limit": get(record, "task", "limit")},
        }
    data = {k: v for k, v in config.items() if k not in ("method", "hydra")}
    if isinstance(data.get("run"), dict):
        data["run"] = {k: v for k, v in data["run"].items() if k not in BOOKKEEPING_FIELDS}
    if isinstance(data.get("model"), dict):  # a field at its default is as if absent
        data["model"] = {
            k: v
            for k, v in data["model"].items()
            if k not in IGNORED_MODEL_FIELDS and (k not in MODEL_DEFAULTS or v != MODEL_DEFAULTS[k])
        }
    data["data_hash"] = get(record, "task", "data_hash")
    return json.dumps(data, sort_keys=True, default=str, separators=(",", ":"))


def is_full_cache(record: dict[str, Any]) -> bool:
    """The unmodified model: method ``full`` with no prompt or model method composed in."""
    method = record.get("method") or {}
    kinds = set(method.get("kinds") or [])
    return method.get("name") == FULL_METHOD and not kinds & {"prompt", "model"}


def prompt_hashes(samples: list[dict[str, Any]] | None) -> dict[SampleKey, str]:
    """``{(task, doc_id): prompt_hash}`` for the samples that recorded one."""
    out: dict[SampleKey, str] = {}
    for s in samples or []:
        if isinstance(s, dict) and s.get("doc_id") is not None and s.get("prompt_hash"):
            out.setdefault((str(s.get("task")), int(s["doc_id"])), str(s["prompt_hash"]))
    return out


@dataclass
class FidelityInputs:
    """What fidelity needs from one record (kept instead of the whole record)."""

    key: str
    is_full: bool
    finished_at: str
    score: float
    outputs: dict[SampleKey, str] = field(default_factory=dict)
    nll: dict[SampleKey, float] = field(default_factory=dict)
    scores: dict[SampleKey, float] = field(default_factory=dict)
    hashes: dict[SampleKey, str] = field(default_factory=dict)
    bounds: tuple[float, float] = stats.UNBOUNDED  # the range of the score's metric


def summarize(record: dict[str, Any]) -> FidelityInputs:
    """What :func:`compare` needs of ``record``."""
    samples = record.get("samples")
    score = get(record, "score", "value")
    scores = stats.sample_scores(record)
    return FidelityInputs(
        key=reference_key(record),
        is_full=is_full_cache(record),
        finished_at=str(get(record, "provenance", "finished_at") or ""),
        score=float(score) if is_number(score) else math.nan,
        outputs=sample_outputs(samples),
        nll=sample_values(samples, NLL_FIELD),
        scores=scores,
        hashes=prompt_hashes(samples),
        bounds=stats.metric_range(get(record, "score", "metric"), list(scores.values())),
    )


def paired_keys(run: FidelityInputs, reference: FidelityInputs) -> set[SampleKey]:
    """The samples of ``run`` that pair with ``reference``'s: the same (task, doc_id) and the
    same ``prompt_hash`` (a sample without one pairs with nothing)."""
    return {k for k, h in run.hashes.items() if reference.hashes.get(k) == h}


def _only(values: dict[SampleKey, Any], keys: set[SampleKey]) -> dict[SampleKey, Any]:
    return {k: v for k, v in values.items() if k in keys}


def compare(run: FidelityInputs, reference: FidelityInputs) -> dict[str, Any]:
    """The fidelity columns of ``run`` against ``reference``, over the paired samples."""
    keys = paired_keys(run, reference)
    outputs = _only(run.outputs, keys)
    diff = stats.paired_difference(_only(run.scores, keys), reference.scores, reference.bounds)
    nll = stats.paired_difference(_only(run.nll, keys), reference.nll)
    f1s = [token_f1(out, reference.outputs[k]) for k, out in outputs.items()]
    f1 = stats.mean_interval(f1s, stats.UNIT)
    return {
        "n_paired": float(len(keys)),
        "score_delta": run.score - reference.score,
        "score_diff": diff.estimate,
        "score_diff_lo": diff.lo,
        "score_diff_hi": diff.hi,
        "verdict": stats.verdict(diff),
        "exact_match": exact_match_rate(outputs, reference.outputs),
        "token_f1": mean_token_f1(outputs, reference.outputs),
        "token_f1_lo": f1.lo,
        "token_f1_hi": f1.hi,
        "nll_increase": nll.estimate,
        "nll_increase_lo": nll.lo,
        "nll_increase_hi": nll.hi,
    }


def references(inputs: dict[str, FidelityInputs]) -> dict[str, str]:
    """``{run: its reference run}`` for every run that has one (the latest full-cache run,
    by ``finished_at``, with the same :func:`reference_key`)."""
    latest: dict[str, tuple[str, str]] = {}
    for name, item in inputs.items():
        if item.is_full and (item.key not in latest or item.finished_at >= latest[item.key][0]):
            latest[item.key] = (item.finished_at, name)
    return {name: latest[item.key][1] for name, item in inputs.items() if item.key in latest}


def add_fidelity(table: pd.DataFrame, inputs: dict[str, FidelityInputs]) -> pd.DataFrame:
    """``table`` (one row per run, ``run_id`` and ``path`` columns; ``inputs`` keyed by
    ``path``) with :data:`FIDELITY_COLUMNS` filled in; NaN / None where a run has no
    reference."""
    table = table.copy()
    for column in FIDELITY_COLUMNS:
        table[column] = None if column in TEXT_COLUMNS else math.nan
    refs = references(inputs)
    run_ids = dict(zip(table["path"], table["run_id"], strict=True))
    for idx, path in table["path"].items():
        ref = refs.get(path)
        if ref is None:
            continue
        table.at[idx, "reference"] = run_ids.get(ref)
        for column, value in compare(inputs[path], inputs[ref]).items():
            table.at[idx, column] = value
        if ref == path:  # itself: identical by definition, no interval to give
            table.at[idx, "verdict"] = "reference"
            for column in SELF_BLANK:
                table.at[idx, column] = math.nan
    return table
