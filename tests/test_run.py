"""End to end through Hydra on the tiny model: a record per run, skipped on re-run, the
report over the results folder, the demo sweep's composition."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

from harness import records
from harness.generation import greedy_generate
from harness.report import main as report_main
from harness.run import CONF_DIR, execute

REPO_DATA = CONF_DIR.parent / "data"
TINY = ["model=tiny_llama_gqa", "task=gsm8k", "task.limit=2", "run.max_gen_toks=12"]


def composed(tmp_path, *overrides: str, name: str = "config"):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(
            config_name=name,
            overrides=[f"run.results_dir={tmp_path}", "run.report=false", *overrides],
            return_hydra_config=False,
        )


def test_run_writes_a_complete_record_and_skips_a_rerun(tmp_path):
    cfg = composed(tmp_path, *TINY, "method=streamingllm", "method.ratio=0.25")
    folder = execute(cfg)
    record = records.read_record(folder)
    assert record["schema_version"] == records.SCHEMA_VERSION
    assert {k: v for k, v in record["method"].items() if k not in ("describe", "stats")} == {
        "name": "streamingllm",
        "kinds": ["cache"],
        "params": {
            "compress_sliding": False,
            "ratio": 0.25,
            "budget": None,
            "sinks": 4,
            "window": 0,
        },
    }
    assert record["task"]["lm_eval_tasks"] == ["kvbench_gsm8k"]
    assert record["score"]["metric"] == "exact_match,strict-match"
    assert (
        record["score"]["value"] == record["metrics"]["kvbench_gsm8k"]["exact_match,strict-match"]
    )
    m = record["measurements"]
    assert m["requests"] == 2
    assert m["kv_ratio"] == pytest.approx(0.25, abs=2e-3)
    assert m["kv_ratio_requested"] == 0.25
    # the lowest reachable: every layer at StreamingLLM's 4 sink tokens
    tokens = m["prompt_tokens"]["total"]
    assert m["kv_ratio_reachable"] == pytest.approx(2 * 4 / tokens)
    assert m["prefill_s"]["total"] > 0 and m["decode_s"]["total"] > 0
    assert m["kv_bytes_prefill"]["min"] > 0
    assert {s["doc_id"] for s in record["samples"]} == {0, 1}
    assert all(s["requests"] for s in record["samples"])
    prov = record["provenance"]
    assert prov["git_commit"] and prov["packages"]["lm_eval"] and prov["seed"] == 1234
    # model.dtype: auto is recorded as what ran (float32 on the CPU) and what was asked
    assert record["model"]["dtype"] == "float32" and record["model"]["dtype_requested"] == "auto"
    assert record["config"]["model"]["dtype"] == "float32"
    assert record["model"]["sdpa_backend"] == "default"  # auto on the CPU: torch's choice
    # auto on the CPU: eager decoding, and why
    assert record["model"]["decode_capture"] == "eager: CUDA graphs need CUDA (model.device=cpu)"
    # the id of the config as composed (auto) and of the task data it read
    assert records.run_id(cfg, record["task"]["data_hash"]) == folder.name

    stamp = (folder / records.RECORD_FILE).stat().st_mtime_ns
    assert execute(cfg) == folder
    assert (folder / records.RECORD_FILE).stat().st_mtime_ns == stamp

    cfg.run.overwrite = True
    assert execute(cfg) == folder
    assert (folder / records.RECORD_FILE).stat().st_mtime_ns != stamp


def test_full_cache_stores_exactly_the_formula(tmp_path):
    cfg = composed(tmp_path, *TINY, "method=full")
    record = records.read_record(execute(cfg))
    # tiny_llama_gqa: 4 layers x 2 KV heads x head_dim 16 x 4 bytes, keys and values
    for sample in record["samples"]:
        (request,) = sample["requests"]
        tokens = request["prompt_tokens"]
        assert request["kv_bytes_prefill"] == 2 * 4 * 2 * 16 * tokens * 4
        assert request["kv_bytes_prefill"] == request["kv_full_bytes_prefill"]
        assert request["kv_bytes_final"] == request["kv_full_bytes_final"]
    assert record["measurements"]["kv_ratio"] == 1.0


def test_cli_multirun_report_and_demo_config(tmp_path, capsys):
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    cli = [sys.executable, "-m", "harness.run", "-m", *TINY, "method=full,streamingllm"]
    done = subprocess.run(
        [*cli, f"run.results_dir={tmp_path}"], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "streamingllm" in done.stdout and "report.md" in done.stdout
    assert len(records.find_records(tmp_path)) == 2
    assert (tmp_path / "report" / "report.csv").is_file()
    assert report_main([str(tmp_path)]) == 0
    assert "tiny_llama_gqa" in capsys.readouterr().out


def test_demo_sweep_is_multirun_over_methods_and_tasks():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["sweep=demo"], return_hydra_config=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    params = cfg.hydra.sweeper.params
    assert params.method == "full,streamingllm,snapkv"
    assert params.task == "ruler_niah_single_1"
    assert params["task.lengths"] == "[1024,2048]"


@pytest.mark.integration
def test_smollm2_full_cache_bytes_equal_the_formula(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 8, return_tensors="pt")
    gen = greedy_generate(model, ids.input_ids, max_new_tokens=3)
    tokens = ids.input_ids.shape[1]
    # SmolLM2-135M: 30 layers, 3 KV heads, head_dim 64, float32
    assert gen.kv_bytes_prefill == 2 * 30 * 3 * 64 * tokens * 4
    assert gen.kv_bytes_final == 2 * 30 * 3 * 64 * (tokens + 2) * 4
    assert json.dumps(gen.tokens)  # generated real tokens
    assert torch.isfinite(gen.last_logits).all()


def test_a_run_over_other_data_gets_another_run_id_and_no_reference(tmp_path, monkeypatch):
    import shutil

    from harness.report import load_report
    from methods.storage import DATA_ENV

    results = tmp_path / "results"
    standard = execute(composed(results, *TINY, "method=full"))
    other = tmp_path / "data"
    (other / "gsm8k").mkdir(parents=True)
    shutil.copy(REPO_DATA / "gsm8k" / "train.jsonl", other / "gsm8k")
    lines = (REPO_DATA / "gsm8k" / "test.jsonl").read_text().splitlines(keepends=True)
    (other / "gsm8k" / "test.jsonl").write_text("".join(lines[2:]))  # other questions
    monkeypatch.setenv(DATA_ENV, str(other))
    moved = execute(composed(results, *TINY, "method=streamingllm", "method.ratio=0.5"))
    also_full = execute(composed(results, *TINY, "method=full"))
    assert also_full != standard  # not skipped as "already finished"
    rec, ref = records.read_record(moved), records.read_record(standard)
    assert rec["task"]["data_hash"] != ref["task"]["data_hash"]
    code = rec["provenance"]["code"]
    assert set(code["methods"]) == {"streamingllm"} and len(code["harness"]) == 12
    monkeypatch.delenv(DATA_ENV)
    rows = load_report(results).runs.set_index("path")
    # the run over other data is compared with the full cache over the same other data
    assert rows.at[str(moved / "record.json"), "reference"] == also_full.name


def test_a_cache_method_that_sees_no_cache_fails_and_writes_no_record(tmp_path, monkeypatch):
    # transformers 5.24 renamed the attention modules' cache argument (`past_key_values` ->
    # `cache`): with the old lookup the hooks see no cache; the run must fail, not record
    import methods.base

    monkeypatch.setattr(methods.base, "cache_of", lambda kwargs: kwargs.get("past_key_values"))
    results = tmp_path / "results"
    cfg = composed(results, *TINY, "method=streamingllm", "method.ratio=0.25")
    with pytest.raises(RuntimeError, match="without a KV cache"):
        execute(cfg)
    assert records.find_records(results) == []


def test_a_method_that_measures_no_reduction_fails_and_writes_no_record(tmp_path, monkeypatch):
    # hooks that see the cache but change nothing (as a renamed argument did before kvbench
    # checked it): the run measures kv_ratio 1 and is refused at the end, unrecorded
    from harness.job import NoEffectError
    from methods.cache.streamingllm import StreamingLLM

    monkeypatch.setattr(StreamingLLM, "compresses_layer", lambda self, module, layer: False)
    results = tmp_path / "results"
    cfg = composed(results, *TINY, "method=streamingllm", "method.ratio=0.25")
    with pytest.raises(NoEffectError, match="had no effect.*cache_of.*No record was written"):
        execute(cfg)
    assert records.find_records(results) == []


def test_a_prompt_method_that_removes_nothing_fails(tmp_path):
    from harness.job import NoEffectError

    results = tmp_path / "results"
    never = "task.protect_from=NEVER-IN-A-PROMPT"  # no match: the whole prompt is protected
    cfg = composed(results, *TINY, "method=random_deletion", "method.ratio=0.5", never)
    with pytest.raises(NoEffectError, match="removed nothing.*task.protect_from"):
        execute(cfg)
    assert records.find_records(results) == []


def test_records_say_what_the_method_did_per_layer(tmp_path):
    cfg = composed(tmp_path, *TINY, "method=streamingllm", "method.ratio=0.25")
    record = records.read_record(execute(cfg))
    stats = record["method"]["stats"]
    assert stats["compressed_layers"] == [0, 1, 2, 3]  # tiny_llama_gqa: 4 layers
    for before, kept in zip(stats["tokens_before"], stats["tokens_kept"], strict=True):
        assert kept == pytest.approx(0.25 * before, abs=1.0)
    for sample in record["samples"]:  # and per request
        (request,) = sample["requests"]
        layers = request["method_stats"]["tokens_kept"]
        assert layers == [round(0.25 * request["prompt_tokens"])] * 4
    assert record["method"]["describe"] == {}
