"""harness.report.fidelity: output agreement and NLL increase against the full-cache reference."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import pytest

from harness.report.fidelity import (
    add_fidelity,
    exact_match_rate,
    is_full_cache,
    mean_token_f1,
    nll_increase,
    reference_key,
    references,
    sample_outputs,
    sample_values,
    summarize,
    token_f1,
)


def sample(
    doc: int,
    output: str,
    nll: float | None = None,
    filt: str = "strict",
    value: float = 0.0,
    prompt: str | None = None,
) -> dict:
    requests = [{"prompt_tokens": 10}] if nll is None else [{"reference_nll": nll}]
    return {
        "task": "t",
        "doc_id": doc,
        "filter": filt,
        "output": output,
        "metrics": {"acc": value},
        "prompt_hash": prompt or f"prompt{doc}",
        "requests": requests,
    }


def record(
    method: str,
    outputs: list[str],
    nll: list[float] | None = None,
    finished: str = "2025-01-01",
    limit: int = 2,
    kinds: tuple[str, ...] = ("cache",),
    score: float = 0.5,
    values: list[float] | None = None,
    prompts: list[str] | None = None,
    data_hash: str | None = "data1",
) -> dict[str, Any]:
    samples = []
    for i, out in enumerate(outputs):
        nll_i = nll[i] if nll else None
        v = values[i] if values else 0.0
        p = prompts[i] if prompts else None
        # lm-eval logs one entry per filter: the same raw output twice
        samples += [sample(i, out, nll_i, "strict", v, p), sample(i, out, nll_i, "flexible", v, p)]
    return {
        "config": {
            "model": {"name": "m", "max_length": 4096, "threads": 1},
            "method": {"name": method},
            "task": {"name": "t", "limit": limit},
            "run": {"seed": 1, "results_dir": "/x", "overwrite": False, "report": True},
        },
        "method": {"name": method, "kinds": list(kinds), "params": {}},
        "task": {"name": "t", "limit": limit, "data_hash": data_hash},
        "score": {"metric": "acc,strict", "value": score},
        "samples": samples,
        "provenance": {"finished_at": finished},
    }


def test_token_f1_is_squad_f1_over_whitespace_tokens() -> None:
    assert token_f1("the cat sat", "the cat sat") == 1.0
    assert token_f1("the cat", "the cat sat down") == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert token_f1("a a b", "a b b") == pytest.approx(2 / 3)  # bag of tokens, with counts
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0 and token_f1("x", "y") == 0.0


def test_outputs_deduplicate_filters_and_match_by_doc() -> None:
    samples = [sample(0, "a"), sample(0, "a", filt="other"), sample(1, " b ")]
    assert sample_outputs(samples) == {("t", 0): "a", ("t", 1): " b "}
    mine = {("t", 0): "a", ("t", 1): "b", ("t", 2): "z"}
    ref = {("t", 0): "a", ("t", 1): " b\n", ("t", 3): "q"}
    assert exact_match_rate(mine, ref) == 1.0  # surrounding whitespace ignored, 2 shared
    assert mean_token_f1({("t", 0): "a b"}, {("t", 0): "a c"}) == pytest.approx(0.5)
    assert math.isnan(exact_match_rate(mine, {})) and math.isnan(mean_token_f1({}, ref))


def test_nll_increase_mean_over_shared_samples_nan_when_absent() -> None:
    mine = sample_values([sample(0, "a", 2.5), sample(1, "b", 3.0)], "reference_nll")
    ref = sample_values([sample(0, "a", 2.0), sample(1, "b", 2.0)], "reference_nll")
    assert nll_increase(mine, ref) == pytest.approx(0.75)
    assert sample_values([sample(0, "a")], "reference_nll") == {}
    assert math.isnan(nll_increase({}, ref))


def test_reference_is_the_latest_full_run_with_the_same_non_method_config() -> None:
    runs = {
        "full_old": record("full", ["a b", "c"], [1.0, 1.0], finished="2025-01-01"),
        "full_new": record("full", ["a b", "c d"], [1.0, 2.0], finished="2025-02-01"),
        "full_other_limit": record("full", ["x", "y"], limit=5),
        "dac_full_named": record("full", ["x", "y"], kinds=("prompt",)),
        "stream": record("streamingllm", ["a b", "c x"], [1.5, 2.5], score=0.25),
        "stream_limit5": record("streamingllm", ["x", "y"], limit=5),
        "stream_no_ref": record("streamingllm", ["x"], limit=9),
    }
    # bookkeeping fields and threads do not matter
    runs["stream"]["config"]["run"]["results_dir"] = "/elsewhere"
    runs["stream"]["config"]["model"]["threads"] = 8
    assert reference_key(runs["stream"]) == reference_key(runs["full_new"])
    assert not is_full_cache(runs["dac_full_named"]) and is_full_cache(runs["full_old"])
    inputs = {name: summarize(rec) for name, rec in runs.items()}
    refs = references(inputs)
    assert refs["stream"] == "full_new" and refs["full_old"] == "full_new"
    assert refs["stream_limit5"] == "full_other_limit"
    assert "stream_no_ref" not in refs

    table = pd.DataFrame({"run_id": [f"id_{n}" for n in runs], "path": list(runs)})
    out = add_fidelity(table, inputs).set_index("path")
    assert out.at["stream", "reference"] == "id_full_new"
    assert out.at["stream", "exact_match"] == pytest.approx(0.5)
    assert out.at["stream", "token_f1"] == pytest.approx(0.75)  # 1.0 and 0.5
    assert out.at["stream", "nll_increase"] == pytest.approx(0.5)
    assert out.at["stream", "score_delta"] == pytest.approx(-0.25)
    assert out.at["full_new", "exact_match"] == 1.0 and out.at["full_new", "nll_increase"] == 0
    assert out.at["stream_no_ref", "reference"] is None
    assert math.isnan(out.at["stream_no_ref", "token_f1"])


def test_records_without_config_fall_back_to_model_task_and_limit() -> None:
    a = {"model": {"name": "m"}, "task": {"name": "t", "limit": 2}, "method": {"name": "full"}}
    b = {**a, "method": {"name": "h2o"}}
    assert reference_key(a) == reference_key(b)
    assert reference_key(a) != reference_key({**a, "task": {"name": "t", "limit": 3}})


def test_samples_pair_only_when_their_prompt_hashes_agree() -> None:
    full = record("full", ["a", "b", "c"], values=[1.0, 0.0, 1.0], score=2 / 3)
    run = record(
        "h2o",
        ["a", "x", "c"],
        values=[0.0, 0.0, 0.0],
        score=0.0,
        prompts=["prompt0", "prompt1", "another prompt"],  # doc 2 was asked differently
    )
    inputs = {"full": summarize(full), "run": summarize(run)}
    table = pd.DataFrame({"run_id": ["full", "run"], "path": ["full", "run"]})
    out = add_fidelity(table, inputs).set_index("path")
    assert out.at["run", "n_paired"] == 2  # docs 0 and 1
    assert out.at["run", "score_diff"] == pytest.approx(-0.5)  # (0-1 + 0-0) / 2
    assert out.at["run", "exact_match"] == pytest.approx(0.5)  # "a" == "a", "x" != "b"
    assert out.at["full", "verdict"] == "reference"


def test_a_run_over_other_data_is_never_paired_with_the_standard_reference() -> None:
    full = record("full", ["a", "b"], data_hash="standard")
    other = record("h2o", ["a", "b"], data_hash="my-own-files")
    assert reference_key(full) != reference_key(other)
    inputs = {"full": summarize(full), "other": summarize(other)}
    assert "other" not in references(inputs)
    table = pd.DataFrame({"run_id": ["full", "other"], "path": ["full", "other"]})
    out = add_fidelity(table, inputs).set_index("path")
    assert out.at["other", "reference"] is None and math.isnan(out.at["other", "n_paired"])


def test_paired_difference_outside_noise_only_when_the_interval_excludes_zero() -> None:
    n = 30
    ref_values = [float(i % 2) for i in range(n)]
    full = record("full", ["o"] * n, values=ref_values, score=0.5)
    worse = record("h2o", ["o"] * n, values=[0.0] * n, score=0.0)  # loses every 1
    same = record("snapkv", ["o"] * n, values=ref_values[1:] + ref_values[:1], score=0.5)
    inputs = {"full": summarize(full), "worse": summarize(worse), "same": summarize(same)}
    table = pd.DataFrame({"run_id": list(inputs), "path": list(inputs)})
    out = add_fidelity(table, inputs).set_index("path")
    assert out.at["worse", "verdict"] == "lower"
    assert out.at["worse", "score_diff_hi"] < 0
    # every sample changes by ±1 but the mean does not move: the interval holds 0
    assert out.at["same", "score_diff"] == pytest.approx(0.0)
    assert out.at["same", "score_diff_lo"] < 0 < out.at["same", "score_diff_hi"]
    assert out.at["same", "verdict"] == "within noise"
