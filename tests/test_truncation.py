"""Truncation is counted on every request path: ``prompt_tokens_original`` is the prompt before
any cut, ``truncated_tokens`` what the model's window removed, and a run says once how many
requests were cut. ``prompt_ratio`` measures prompt methods only; ``truncated_ratio`` the window.

The tiny models' tokenizer is byte-level without BOS: one token per byte, so counts are exact.
"""

from __future__ import annotations

import logging

import pytest
from hydra import compose, initialize_config_dir

from harness import records
from harness.api import build
from harness.results import aggregate
from harness.run import CONF_DIR, execute
from harness.session import open_session
from methods.base import PromptParts


def test_generate_counts_the_window_cut_of_text_and_of_ids(tiny_gqa):
    model, tokenizer = tiny_gqa
    prompt = "".join(chr(97 + i % 26) for i in range(150))
    with open_session(build("method", "full"), model, tokenizer, max_length=100) as session:
        from_text = session.generate(prompt, max_new_tokens=10).measurement
        from_ids = session.generate(tokenizer.encode(prompt), max_new_tokens=10).measurement
        layout = session.kv_layout
    for m in (from_text, from_ids):
        assert (m.prompt_tokens_original, m.prompt_tokens, m.truncated_tokens) == (150, 90, 60)
        # the full-cache reference is what fits the window, not what the window cut
        assert m.kv_full_bytes_prefill == layout.full_bytes(90) == m.kv_bytes_prefill
    summary = aggregate([from_text.__dict__, from_ids.__dict__])
    assert summary["prompt_ratio"] == 1.0  # no prompt method: the window is not one
    assert summary["truncated_ratio"] == pytest.approx(60 / 150)
    assert summary["truncated_requests"] == 2


def test_window_and_prompt_method_are_told_apart(tiny_gqa):
    model, tokenizer = tiny_gqa
    method = build("method", "random_deletion", ratio=0.5)
    prompt = PromptParts("x" * 200, "Q: why?")
    with open_session(method, model, tokenizer, max_length=110) as session:
        m = session.generate(prompt, max_new_tokens=10).measurement
    window = 100  # 110 - 10 generated
    assert m.prompt_tokens_original == 207
    assert m.truncated_tokens == 107
    removed_by_method = window - m.prompt_tokens
    assert removed_by_method == m.compressible_tokens_original - m.compressible_tokens > 0
    assert m.kv_full_bytes_prefill == session.kv_layout.full_bytes(window)
    summary = aggregate([m.__dict__])
    assert summary["prompt_ratio"] == pytest.approx(m.prompt_tokens / window)
    assert summary["truncated_ratio"] == pytest.approx(107 / 207)


def test_scoring_counts_the_window_cut_and_the_prompt_methods(tiny_gqa):
    model, tokenizer = tiny_gqa
    with open_session(build("method", "full"), model, tokenizer, max_length=100) as session:
        session.logprob(list(range(65, 65 + 150)), [70, 71, 72, 73, 74])
        [m] = session.measurements
    assert (m.prompt_tokens_original, m.prompt_tokens, m.truncated_tokens) == (150, 96, 54)
    assert m.kv_full_bytes_prefill == session.kv_layout.full_bytes(96)

    method = build("method", "random_deletion", ratio=0.5)
    with open_session(method, model, tokenizer, max_length=1000) as session:
        session.loglikelihood("y" * 200, " z")
        [m] = session.measurements
    assert m.prompt_tokens_original == 200 and m.truncated_tokens == 0
    assert m.prompt_tokens == m.compressible_tokens < 200
    # the prompt method's saving shows in the KV ratio, as on the generation path
    assert m.kv_full_bytes_prefill == session.kv_layout.full_bytes(200)


def test_a_run_records_and_logs_what_the_window_cut(tmp_path, caplog):
    """GSM8K's 5-shot prompt (~1,000 bytes) in a 300-token window: the record used to say
    prompt_tokens_original == prompt_tokens and truncated_tokens == 0, and nothing was logged."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[
                "model=tiny_llama_gqa",
                "model.max_length=300",
                "task.limit=2",
                "run.max_gen_toks=8",
                "run.report=false",
                f"run.results_dir={tmp_path}",
            ],
        )
    with caplog.at_level(logging.WARNING, logger="kvbench"):
        record = records.read_record(execute(cfg))
    by_doc = {s["doc_id"]: s["requests"] for s in record["samples"]}  # one copy per filter
    requests = [r for rs in by_doc.values() for r in rs]
    assert len(requests) == 2
    for r in requests:
        assert r["prompt_tokens"] == 292  # 300 - 8 generated
        assert r["prompt_tokens_original"] > 900
        assert r["truncated_tokens"] == r["prompt_tokens_original"] - 292
    m = record["measurements"]
    assert m["truncated_requests"] == 2 and m["prompt_ratio"] == 1.0
    cut = sum(r["truncated_tokens"] for r in requests)
    original = sum(r["prompt_tokens_original"] for r in requests)
    assert m["truncated_ratio"] == pytest.approx(cut / original)
    lines = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert len(lines) == 1
    assert "2 of 2 requests did not fit the window of 300 tokens" in lines[0]
    assert f"{cut} of their {original} prompt tokens were cut" in lines[0]
