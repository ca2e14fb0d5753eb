"""kvbench-report on synthetic records: the table, the skipped records, the files, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib.image
import pandas as pd
import pytest
from omegaconf import OmegaConf

from harness.records import SCHEMA_VERSION, write_record
from harness.report import (
    best_by_kv_ratio,
    distinguishing_params,
    format_params,
    load_records,
    load_report,
    main,
    summary_markdown,
    write_report,
)
from harness.report.plots_methods import layer_fractions
from harness.report.stats import wilson

MODEL, TASK = "tiny_llama", "gsm8k"


def stat(mean: float | None) -> dict[str, Any]:
    """A per-field summary as ``harness.results.aggregate`` writes it (n = 2 requests)."""
    if mean is None:
        return {}
    return {
        "n": 2,
        "mean": mean,
        "p50": mean,
        "p95": mean,
        "min": mean,
        "max": mean,
        "total": 2 * mean,
    }


def make_record(
    run_id: str,
    method: str,
    params: dict,
    score: float,
    kv_ratio: float | None,
    outputs: list[str],
    peak: float | None = 3 * 2**20,
    decode: float | None = 40.0,
) -> dict[str, Any]:
    full = 1_000_000.0
    stored = None if kv_ratio is None else kv_ratio * full
    fields = {
        "prompt_tokens_original": 500.0,
        "prompt_tokens": 500.0,
        "truncated_tokens": 0.0,
        "prompt_method_s": 0.0,
        "prefill_s": 0.25,
        "decode_s": 0.5,
        "decode_steps": 20.0,
        "generated_tokens": 20.0,
        "kv_bytes_prefill": stored,
        "kv_bytes_final": stored,
        "kv_full_bytes_prefill": full,
        "kv_full_bytes_final": full,
        "peak_memory_bytes": peak,
    }
    measurements = {k: stat(v) for k, v in fields.items()}
    measurements.update(
        requests=2,
        kv_ratio=kv_ratio,
        kv_ratio_final=kv_ratio,
        prompt_ratio=1.0,
        prefill_tok_per_s=2000.0,
        decode_tok_per_s=decode,
    )
    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "config": {"model": {"name": MODEL}, "method": {"name": method}, "task": {"name": TASK}},
        "model": {
            "name": MODEL,
            "num_layers": 2,
            "num_kv_heads": 2,
            "head_dim": 16,
            "dtype": "float32",
            "device": "cpu",
            "attn_implementation": "eager",
            "max_length": 2048,
        },
        "method": {"name": method, "kinds": ["cache"], "params": params},
        "task": {
            "name": TASK,
            "lm_eval_tasks": ["kvbench_gsm8k"],
            "limit": 5,
            "primary_metric": "exact_match",
        },
        "metrics": {"kvbench_gsm8k": {"exact_match": score}},
        "score": {"metric": "exact_match", "value": score},
        "measurements": measurements,
        "samples": [
            {
                "task": "kvbench_gsm8k",
                "doc_id": i,
                "filter": "strict-match",
                "target": "1",
                "output": out,
                "filtered_output": out,
                "metrics": {"exact_match": 0.0},
                "prompt_hash": "h",
                "requests": [
                    {
                        "request_type": "generate_until",
                        "prompt_tokens_original": 400.0 + 100 * i,
                        "prompt_tokens": 400.0 + 100 * i,
                        "prefill_s": 0.2 + 0.05 * i,
                        "decode_s": 0.5,
                        "decode_steps": 20,
                        "peak_memory_bytes": peak,
                        "peak_memory_rise_bytes": None if peak is None else peak / 3 + i * 2**20,
                        "kv_bytes_prefill": stored,
                        "kv_full_bytes_prefill": full,
                    }
                ],
            }
            for i, out in enumerate(outputs)
        ],
        "provenance": {
            "git_commit": "abc123",
            "git_dirty": False,
            "packages": {},
            "python": "3.12",
            "platform": "linux",
            "device": "cpu: test",
            "threads": 1,
            "seed": 0,
            "started_at": "2025-01-01T00:00:00+00:00",
            "finished_at": "2025-01-01T00:01:00+00:00",
            "wall_s": 60.0,
        },
    }


def dump(root: Path, record: Any, run_id: str) -> Path:
    folder = root / run_id
    folder.mkdir(parents=True)
    path = folder / "record.json"
    path.write_text(record if isinstance(record, str) else json.dumps(record))
    return path


@pytest.fixture
def results(tmp_path: Path) -> Path:
    root = tmp_path / "results"
    full = make_record("full_run", "full", {"ratio": 1.0}, 0.5, 1.0, ["1", "2"])
    cfg = OmegaConf.create({"model": {"name": MODEL}, "run": {"results_dir": str(root)}})
    write_record(root / "full_run", full, cfg, overwrite=False)
    stream = {"ratio": 0.2, "budget": None, "sinks": 4, "window": 0}
    dump(root, make_record("s02", "streamingllm", stream, 0.25, 0.21, ["1", "3"]), "s02")
    dump(
        root,
        make_record("s04", "streamingllm", {**stream, "ratio": 0.4}, 0.5, 0.41, ["1", "2"]),
        "s04",
    )
    composed = {"llmlingua": {"rate": 0.5, "model": None}, "snapkv": {"ratio": 0.3, "window": 8}}
    dump(
        root,
        make_record(
            "combo", "llmlingua+snapkv", composed, 0.0, None, ["9", "9"], peak=None, decode=None
        ),
        "combo",
    )
    dump(root, "{not json", "corrupt")
    old = make_record("old", "full", {}, 1.0, 1.0, [])
    dump(root, {**old, "schema_version": 0}, "old")
    no_task = make_record("no_task", "full", {}, 1.0, 1.0, [])
    del no_task["task"]
    dump(root, no_task, "no_task")
    return root


def test_format_params_flattens_and_keeps_scalars() -> None:
    assert format_params({"ratio": 0.2, "budget": None, "sinks": 4}) == "ratio=0.2, sinks=4"
    nested = {"snapkv": {"ratio": 0.2, "pool": [1, 2]}, "dac": {"rate": 0.5}}
    assert format_params(nested) == "snapkv.ratio=0.2, dac.rate=0.5"


def test_load_records_rows_values_and_skipped(results: Path) -> None:
    table, skipped = load_records(results)
    assert list(table["run_id"]) == ["full_run", "combo", "s02", "s04"]  # model, task, method
    row = table.set_index("run_id")
    assert row.at["s02", "kv_ratio"] == pytest.approx(0.21)
    assert row.at["s02", "kv_bytes_stored"] == pytest.approx(210_000)
    assert row.at["s02", "kv_bytes_full"] == pytest.approx(1_000_000)
    assert row.at["s02", "prefill_ms"] == pytest.approx(250.0)
    assert row.at["s02", "peak_mem_mb"] == pytest.approx(3.0)
    # the memory a request added over the memory before it, per run: p50 and p95
    assert row.at["s02", "peak_rise_mb_p50"] == pytest.approx(1.5)
    assert row.at["s02", "peak_rise_mb_p95"] == pytest.approx(1.95)
    assert row.at["s02", "decode_tok_s"] == pytest.approx(40.0)
    assert row.at["s02", "method_params"] == "ratio=0.2, sinks=4, window=0"
    assert row.at["s04", "ratio"] == pytest.approx(0.4)
    assert row.at["full_run", "ratio"] == 1.0
    assert (
        row.at["combo", "method_params"] == "llmlingua.ratio=0.5, snapkv.ratio=0.3, snapkv.window=8"
    )
    assert row.at["combo", "ratio"] == pytest.approx(0.3)
    assert row.at["s02", "n_samples"] == 2 and row.at["s02", "limit"] == 5
    assert row.at["s02", "wall_s"] == 60.0 and row.at["s02", "git_commit"] == "abc123"
    # absent measurements stay NaN
    for col in ("kv_ratio", "kv_bytes_stored", "peak_mem_mb", "decode_tok_s"):
        assert math.isnan(row.at["combo", col])
    # fidelity against the full-cache run
    assert row.at["s02", "reference"] == "full_run"
    assert row.at["s02", "score_delta"] == pytest.approx(-0.25)
    assert row.at["s02", "exact_match"] == pytest.approx(0.5)
    assert row.at["s02", "token_f1"] == pytest.approx(0.5)
    assert row.at["s04", "exact_match"] == pytest.approx(1.0)
    assert row.at["full_run", "token_f1"] == 1.0
    assert math.isnan(row.at["s02", "nll_increase"])  # no reference_nll recorded
    reasons = {path.parent.name: reason for path, reason in skipped}
    assert set(reasons) == {"corrupt", "old", "no_task"}
    assert "unreadable" in reasons["corrupt"]
    assert "schema_version 0" in reasons["old"]
    assert "task.name" in reasons["no_task"]


def test_write_report_files(results: Path, tmp_path: Path) -> None:
    table, _ = load_records(results)
    out = tmp_path / "report"
    paths = write_report(table, out)
    assert {"csv", "parquet", "md"} <= set(paths)
    assert len(pd.read_csv(paths["csv"])) == 4
    back = pd.read_parquet(paths["parquet"])
    assert back["kv_ratio"].iloc[2] == pytest.approx(0.21)
    assert "streamingllm" in paths["md"].read_text()
    kinds = ("score_vs_kv_ratio", "paired_difference", "fidelity_vs_kv_ratio", "latency", "memory")
    for kind in kinds:
        png = out / f"{kind}__{MODEL}__{TASK}.png"
        assert paths[png.stem] == png and png.stat().st_size > 0
        image = matplotlib.image.imread(png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert f"]({png.name})" in paths["md"].read_text()  # embedded in report.md
    assert "context__tiny_llama__gsm8k" not in paths  # no per-request table given


def test_summary_shows_only_the_params_that_tell_a_methods_runs_apart() -> None:
    table = pd.DataFrame(
        {
            "method": ["kvlatent_k", "kvlatent_k", "streamingllm"],
            "params_json": [
                json.dumps({"dim": 32, "rope": "standard", "training": {"lr": 0.003}}),
                json.dumps({"dim": 16, "rope": "standard", "training": {"lr": 0.003}}),
                json.dumps({"ratio": 0.2, "sinks": 4, "window": None}),
            ],
        }
    )
    assert list(distinguishing_params(table)) == ["dim=32", "dim=16", "ratio=0.2"]
    # two runs of one method with the same parameters (they differ in task settings): the
    # parameters that set its size are still shown, never a blank cell
    same = pd.DataFrame(
        {
            "method": ["snapkv", "snapkv", "full", "full"],
            "params_json": [json.dumps({"ratio": 0.2, "window": 32})] * 2
            + [json.dumps({"ratio": 1.0})] * 2,
        }
    )
    assert list(distinguishing_params(same)) == ["ratio=0.2"] * 2 + ["ratio=1"] * 2


def test_summary_markdown(results: Path) -> None:
    table, _ = load_records(results)
    text = summary_markdown(table)
    # a heading per model and task with the metric in words, then one row per run
    assert text.splitlines()[0].startswith(f"{MODEL} · {TASK} · exact match")
    assert text.splitlines()[2].startswith("| run")
    assert "streamingllm r=0.2" in text and "0.5 [n/a]" in text  # no interval: said so
    assert "llmlingua+snapkv kept=0.5 r=0.3" in text
    assert "exact_match" not in text  # lm-eval's key is not shown
    # fits a terminal: the long composed label pushes the last column out, named
    assert max(len(line) for line in text.splitlines()) <= 100
    assert "(KV kept: in report.md)" in text.splitlines()[0]
    assert "| KV kept" in summary_markdown(table[table["method"] != "llmlingua+snapkv"])
    assert summary_markdown(table.iloc[0:0]) == "(no finished runs)"


def test_main_prints_table(results: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(results)]) == 0
    captured = capsys.readouterr()
    assert "| run" in captured.out and "streamingllm" in captured.out
    assert str(results / "report" / "report.csv") in captured.out
    assert "skipped" in captured.err
    assert (results / "report" / "report.parquet").is_file()
    # the report folder itself holds no record: a second run reads the same 4 runs
    assert len(load_records(results)[0]) == 4


def test_main_empty_or_missing_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path)]) == 1
    assert "no finished record" in capsys.readouterr().err
    assert main([str(tmp_path / "missing")]) == 1
    assert "not a directory" in capsys.readouterr().err


def test_main_foreign_folder_and_only_old_records(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    foreign = tmp_path / "foreign"
    (foreign / "sub").mkdir(parents=True)
    (foreign / "sub" / "notes.txt").write_text("hello")
    (foreign / "data.json").write_text("{}")
    assert main([str(foreign)]) == 1
    err = capsys.readouterr().err
    assert "no finished record" in err and "2 other file(s)" in err

    old_dir = tmp_path / "old"
    dump(old_dir, {**make_record("old", "full", {}, 1.0, 1.0, []), "schema_version": 0}, "old")
    dump(old_dir, {"hello": "world"}, "alien")
    assert main([str(old_dir)]) == 1
    err = capsys.readouterr().err
    assert "schema_version 0, expected" in err and "older kvbench" in err
    assert "not a kvbench record" in err
    assert "none of the 2 record(s)" in err


def test_full_report_per_request_plots_and_markdown(results: Path, tmp_path: Path) -> None:
    report = load_report(results)
    assert len(report.runs) == 4 and report.found == 7
    assert set(report.requests["run_id"]) == {"full_run", "s02", "s04", "combo"}
    s02 = report.requests[report.requests["run_id"] == "s02"].sort_values("doc_id")
    assert list(s02["prompt_tokens_original"]) == [400.0, 500.0]
    assert s02["decode_tok_s"].iloc[0] == pytest.approx(40.0)
    paths = write_report(report.runs, tmp_path / "rep", report.requests, report.skipped)
    png = paths[f"context__{MODEL}__{TASK}"]
    assert matplotlib.image.imread(png).shape[1] > 500
    md = paths["md"].read_text()
    assert f"]({png.name})" in md
    assert "## Skipped records" in md and "corrupt" in md
    best = pd.read_csv(paths["by_kv_ratio"])
    stream = best[best["method"] == "streamingllm"].iloc[0]
    assert stream["kv≈0.2"] == pytest.approx(0.25) and stream["kv≈0.4"] == pytest.approx(0.5)
    assert stream["runs"] == 2


def test_best_by_kv_ratio_keeps_the_best_run_per_bucket() -> None:
    table = pd.DataFrame(
        {
            "model": ["m"] * 4,
            "task": ["t"] * 4,
            "method": ["a", "a", "a", "b"],
            "kv_ratio": [0.19, 0.21, 0.52, math.nan],
            "score": [0.1, 0.3, 0.5, 0.9],
        }
    )
    best = best_by_kv_ratio(table)
    assert list(best.columns) == ["model", "task", "method", "kv≈0.2", "kv≈0.5", "runs"]
    assert best.iloc[0]["kv≈0.2"] == pytest.approx(0.3) and best.iloc[0]["runs"] == 3
    assert len(best) == 1  # b has no measured ratio


def layer_record(run_id: str, method: str, ratio: float, before: list, kept: list) -> dict:
    rec = make_record(run_id, method, {"ratio": ratio}, 0.3, ratio, ["a", "b"])
    rec["method"]["stats"] = {
        "compressed_layers": [i for i, k in enumerate(kept) if k is not None],
        "tokens_before": before,
        "tokens_kept": kept,
    }
    return rec


def test_method_plots_build_from_a_record_alone(tmp_path: Path) -> None:
    root = tmp_path / "results"
    dump(root, make_record("full", "full", {"ratio": 1.0}, 0.5, 1.0, ["a b", "c"]), "full")
    # a pyramid over 4 layers, and a uniform method that left layer 1 (sliding) alone
    dump(root, layer_record("py", "pyramidkv", 0.2, [500] * 4, [180, 120, 80, 20]), "py")
    dump(
        root, layer_record("sn", "snapkv", 0.2, [500, None, 500, 500], [100, None, 100, 100]), "sn"
    )
    for dim in (8, 16):
        describe = {"d_qk": dim, "d_vo": dim, "rope": "standard", "trained": dim == 8}
        rec = make_record(
            f"kvl{dim}", "kvlatent_kv", {"dim": dim}, dim / 32, dim / 16, ["a b", "d"]
        )
        rec["method"]["describe"] = describe
        rec["metrics"]["kvbench_gsm8k"]["word_perplexity,none"] = 100.0 / dim
        dump(root, rec, f"kvl{dim}")
    report = load_report(root)
    rows = report.runs.set_index("run_id")
    assert rows.at["kvl8", "d_qk"] == 8 and rows.at["kvl8", "d_vo"] == 8
    assert rows.at["kvl8", "trained"] is True and rows.at["kvl16", "trained"] is False
    assert rows.at["kvl8", "perplexity"] == pytest.approx(12.5)
    assert rows.at["kvl8", "token_f1"] == pytest.approx(0.5)  # "a b" == "a b", "d" vs "c"
    assert layer_fractions(json.loads(rows.at["py", "stats_json"])) == [0.36, 0.24, 0.16, 0.04]
    assert layer_fractions(json.loads(rows.at["sn", "stats_json"])) == [0.2, None, 0.2, 0.2]
    assert layer_fractions({"snapkv": {"tokens_before": [4], "tokens_kept": [1]}}) == [0.25]
    paths = write_report(report.runs, tmp_path / "rep", report.requests)
    for kind in ("kv_per_layer", "kvlatent"):
        png = paths[f"{kind}__{MODEL}__{TASK}"]
        assert matplotlib.image.imread(png).shape[0] > 100
        assert f"]({png.name})" in paths["md"].read_text()


def test_a_plot_that_fails_is_left_out_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "results"
    bad = layer_record("sp", "spindlekv", 0.2, [500, 500], [100])  # lists of unequal length
    dump(root, bad, "sp")
    report = load_report(root)
    paths = write_report(report.runs, tmp_path / "rep", report.requests)
    assert f"score_vs_kv_ratio__{MODEL}__{TASK}" in paths
    assert f"kv_per_layer__{MODEL}__{TASK}" not in paths
    assert "kv_per_layer" in caplog.text and "left out" in caplog.text


def test_scores_carry_n_intervals_and_paired_differences(tmp_path: Path) -> None:
    root = tmp_path / "results"
    n = 12
    full = make_record("full", "full", {"ratio": 1.0}, 0.5, 1.0, ["o"] * n)
    worse = make_record("bad", "streamingllm", {"ratio": 0.1}, 0.0, 0.1, ["x"] * n)
    for i, s in enumerate(full["samples"]):
        s["metrics"]["exact_match"] = float(i % 2)  # half right
    full["metrics"]["kvbench_gsm8k"]["exact_match_stderr"] = 0.15
    full["metrics"]["kvbench_gsm8k"]["sample_len"] = n
    dump(root, full, "full")
    dump(root, worse, "bad")  # every sample 0: loses each one the full cache got right
    report = load_report(root)
    rows = report.runs.set_index("run_id")
    # lm-eval's stderr is not used: Wilson for a pass/fail metric, in [0, 1], never of zero
    # width (0 of 12 passed: [0, 0.243], not [0, 0])
    assert rows.at["full", "score_ci"] == "Wilson"
    assert (rows.at["full", "score_lo"], rows.at["full", "score_hi"]) == wilson(0.5, n)
    assert rows.at["bad", "score_ci"] == "Wilson" and rows.at["bad", "score_n"] == n
    assert rows.at["bad", "score_lo"] == 0.0 and rows.at["bad", "score_hi"] > 0.2
    assert rows.at["bad", "n_paired"] == n and rows.at["bad", "score_diff"] == -0.5
    assert rows.at["bad", "score_diff_hi"] < 0 and rows.at["bad", "verdict"] == "lower"
    assert rows.at["full", "verdict"] == "reference"
    # per-request p50 / p95 for the cost bars
    assert rows.at["bad", "prefill_ms_p50"] == pytest.approx(200.0 + 50 * (n - 1) / 2)
    assert rows.at["bad", "prefill_ms_p95"] > rows.at["bad", "prefill_ms_p50"]
    text = summary_markdown(report.runs)
    assert "score [95% CI]" in text and "Δ vs full [95% CI]" in text and "| lower" in text
    assert "0.5 [0.254, 0.746]" in text  # Wilson, 6 of 12
    paths = write_report(report.runs, tmp_path / "rep", report.requests)
    assert f"paired_difference__{MODEL}__{TASK}" in paths
    assert "paired bootstrap" in paths["md"].read_text()


def test_the_report_warns_when_a_comparison_mixes_code_versions(tmp_path: Path) -> None:
    root = tmp_path / "results"
    code = {"methods": {"streamingllm": "aaa"}, "harness": "h1"}
    for run_id, method_code, harness in (("s1", "aaa", "h1"), ("s2", "bbb", "h1")):
        rec = make_record(run_id, "streamingllm", {"ratio": 0.2}, 0.2, 0.2, ["1", "2"])
        rec["provenance"]["code"] = {**code, "methods": {"streamingllm": method_code}}
        rec["provenance"]["code"]["harness"] = harness
        dump(root, rec, run_id)
    full = make_record("full", "full", {}, 0.3, 1.0, ["1", "2"])
    full["provenance"]["code"] = {"methods": {"full": "fff"}, "harness": "h2"}
    dump(root, full, "full")
    report = load_report(root)
    text = "\n".join(report.warnings)
    assert "the 2 runs of streamingllm were written by 2 versions of its code" in text
    assert "2 versions of the harness's generation/measurement code" in text
    paths = write_report(report.runs, tmp_path / "rep")
    assert "## Warnings" in paths["md"].read_text()


def test_the_report_warns_when_a_run_has_no_full_cache_reference_of_its_settings(
    tmp_path: Path,
) -> None:
    """A run whose task config differs from every full-cache run's (here a widened
    `protect_from`, as a config change between two runs of a sweep makes it) has no
    reference: its Δ and fidelity stay empty, and the report says so instead of leaving
    the blank unexplained."""
    root = tmp_path / "results"
    dump(root, make_record("full", "full", {}, 0.5, 1.0, ["1", "2"]), "full")
    paired = make_record("s1", "streamingllm", {"ratio": 0.2}, 0.5, 0.2, ["1", "2"])
    dump(root, paired, "s1")
    alone = make_record("s2", "snapkv", {"ratio": 0.2}, 0.5, 0.2, ["1", "2"])
    alone["config"]["task"]["protect_from"] = "\\nQuestion: "
    dump(root, alone, "s2")
    report = load_report(root)
    rows = report.runs.set_index("run_id")
    assert rows.at["s1", "reference"] == "full" and rows.at["s2", "reference"] is None
    text = "\n".join(report.warnings)
    assert "1 run(s) have no full-cache run with the same settings" in text
    assert "(s2)" in text and "s1" not in text
