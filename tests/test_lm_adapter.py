"""The adapter changes measurement, not results: the same outputs, scores and
log-likelihoods as lm-eval's own `hf` backend on the same model, task and slice."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import lm_eval
import pytest
import torch
from lm_eval.models.huggingface import HFLM

from harness.lm import KVBenchLM
from harness.session import open_session, truncate
from harness.taskspec import TaskSpec
from methods.cache.streamingllm import StreamingLLM
from methods.full import FullCache

BOOLEAN_MC = {
    "task": "kvbench_test_boolean_mc",
    "dataset_path": "json",
    "output_type": "multiple_choice",
    "test_split": "train",
    "doc_to_text": "Q: {{input}}\nA:",
    "doc_to_choice": ["True", "False"],
    "doc_to_target": "{{['True', 'False'].index(target)}}",
    "metric_list": [{"metric": "acc"}],
}


def gsm8k_task() -> TaskSpec:
    return TaskSpec(
        name="gsm8k",
        local_tasks=["kvbench_gsm8k"],
        hub_tasks=["gsm8k"],
        primary_metric="exact_match,strict-match",
    )


def evaluate(lm, task: TaskSpec, limit: int, max_gen_toks: int) -> dict:
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=task.task_names(),
        task_manager=task.task_manager(),
        limit=limit,
        log_samples=True,
        bootstrap_iters=0,
        gen_kwargs={"max_gen_toks": max_gen_toks},
    )


@contextmanager
def adapter(model, tokenizer, method=None, **kwargs) -> Iterator[KVBenchLM]:
    """The adapter over a session with ``method`` (default: the full cache) applied."""
    with open_session(method or FullCache(), model, tokenizer, max_length=2048) as session:
        yield KVBenchLM(session, **kwargs)


def outputs(result: dict, task: str) -> list:
    return [
        (s["doc_id"], s["resps"])
        for s in sorted(result["samples"][task], key=lambda s: s["doc_id"])
    ]


def assert_same_as_hf(model, tokenizer, limit: int, max_gen_toks: int) -> None:
    task = gsm8k_task()
    with adapter(model, tokenizer) as lm:
        ours = evaluate(lm, task, limit, max_gen_toks)
    hf = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, max_length=2048)
    theirs = evaluate(hf, task, limit, max_gen_toks)
    assert outputs(ours, "kvbench_gsm8k") == outputs(theirs, "kvbench_gsm8k")
    assert ours["results"]["kvbench_gsm8k"] == theirs["results"]["kvbench_gsm8k"]


def test_generate_until_matches_hf_backend_on_tiny_model(tiny_gqa):
    model, tokenizer = tiny_gqa
    assert_same_as_hf(model, tokenizer, limit=3, max_gen_toks=24)


def test_loglikelihood_matches_hf_backend(tiny_mha, tmp_path):
    model, tokenizer = tiny_mha
    data = tmp_path / "bool.jsonl"
    data.write_text(
        "\n".join(
            json.dumps({"input": q, "target": t})
            for q, t in [
                ("True and False is", "False"),
                ("not False is", "True"),
                ("True or False is", "True"),
            ]
        )
    )
    config = {**BOOLEAN_MC, "dataset_kwargs": {"data_files": {"train": str(data)}}}
    with adapter(model, tokenizer) as lm:
        ours = lm_eval.simple_evaluate(
            model=lm, tasks=[config], log_samples=True, bootstrap_iters=0
        )
    hf = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, max_length=2048)
    theirs = lm_eval.simple_evaluate(model=hf, tasks=[config], log_samples=True, bootstrap_iters=0)
    name = BOOLEAN_MC["task"]
    ours_ll = [r for s in ours["samples"][name] for r in s["resps"]]
    theirs_ll = [r for s in theirs["samples"][name] for r in s["resps"]]
    for (a,), (b,) in zip(ours_ll, theirs_ll, strict=True):
        assert a[0] == pytest.approx(b[0], abs=1e-3) and a[1] == b[1]
    assert ours["results"][name]["acc,none"] == theirs["results"][name]["acc,none"]


def test_adapter_measures_every_request(tiny_gqa):
    model, tokenizer = tiny_gqa
    with adapter(model, tokenizer, StreamingLLM(ratio=0.25)) as lm:
        evaluate(lm, gsm8k_task(), limit=2, max_gen_toks=8)
    rows = lm.measurement_rows()
    assert [r["doc_id"] for r in rows] == [0, 1]
    for r in rows:
        assert r["task"] == "kvbench_gsm8k" and r["request_type"] == "generate_until"
        assert r["prefill_s"] > 0 and r["decode_s"] > 0 and r["peak_memory_bytes"] > 0
        assert r["kv_bytes_prefill"] / r["kv_full_bytes_prefill"] == pytest.approx(0.25, abs=2e-3)
        assert r["kv_bytes_final"] > r["kv_bytes_prefill"]
        assert 1 <= r["generated_tokens"] <= 8


def test_reference_nll_is_the_teacher_forced_answer_nll(tiny_gqa):
    model, tokenizer = tiny_gqa
    task = TaskSpec(**{**vars(gsm8k_task()), "reference_field": "answer", "reference_tokens": 6})
    with adapter(
        model, tokenizer, reference_answer=task.reference_answer, reference_tokens=6
    ) as lm:
        request = type("Request", (), {"doc": {"answer": ["ab c", "ignored"]}})()
        ids = lm.tok_encode("Q: 1+1\nA:")
        got = lm.session.reference_nll(lm._reference_answer(request), ids, lm.reference_tokens)
        answer = lm.tok_encode(" ab c", add_special_tokens=False)
        empty_doc = type("Request", (), {"doc": {"answer": ""}})()
        empty = lm.session.reference_nll(lm._reference_answer(empty_doc), ids, 6)
    with torch.no_grad():
        logits = model(torch.tensor([ids + answer])).logits[0, len(ids) - 1 : -1]
    expected = -torch.log_softmax(logits, -1).gather(1, torch.tensor([answer]).T).mean()
    assert got == {
        "reference_nll": pytest.approx(float(expected), rel=1e-4),
        "reference_tokens": len(answer),
    }
    assert empty == {}


def test_reference_nll_is_measured_under_the_cache_method_without_changing_outputs(tiny_gqa):
    model, tokenizer = tiny_gqa
    task = TaskSpec(**{**vars(gsm8k_task()), "reference_field": "answer", "reference_tokens": 8})
    runs = {}
    for name, method, reference in [
        ("plain", StreamingLLM(ratio=0.25), None),
        ("full", None, task.reference_answer),
        ("stream", StreamingLLM(ratio=0.25), task.reference_answer),
    ]:
        with adapter(
            model, tokenizer, method, reference_answer=reference, reference_tokens=8
        ) as lm:
            result = evaluate(lm, task, limit=2, max_gen_toks=8)
        runs[name] = (outputs(result, "kvbench_gsm8k"), lm.measurement_rows())
    assert runs["plain"][0] == runs["stream"][0]
    assert all(r["reference_nll"] is None for r in runs["plain"][1])
    for full, stream in zip(runs["full"][1], runs["stream"][1], strict=True):
        assert full["reference_tokens"] == stream["reference_tokens"] == 8
        assert 0 < full["reference_nll"] < 20 and 0 < stream["reference_nll"] < 20
        assert stream["reference_nll"] != pytest.approx(full["reference_nll"], abs=1e-6)


def test_middle_truncation_keeps_both_ends():
    ids = list(range(10))
    assert truncate(ids, 6, "middle") == [0, 1, 2, 7, 8, 9]
    assert truncate(ids, 5, "middle") == [0, 1, 7, 8, 9]
    assert truncate(ids, 4, "left") == [6, 7, 8, 9]
    assert truncate(ids, 20, "middle") == ids


@pytest.mark.integration
def test_generate_until_matches_hf_backend_on_smollm2(smollm2):
    model, tokenizer = smollm2
    assert_same_as_hf(model, tokenizer, limit=2, max_gen_toks=48)
