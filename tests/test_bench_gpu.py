"""The GPU device check without a GPU: bench/gpu/run.sh --dry-run end to end (install step,
cuda-marked tests, the speed table and the model and prompt methods' table on tiny shapes),
the speed table's skip and failure paths, and the wheel folder check."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import zipfile

import pandas as pd
import pytest
import torch

from bench.gpu import check_wheels, methods_speed, op_counts, speed, speed_cells, speed_table
from tests.conftest import REPO

EVICTION = ("streamingllm", "h2o", "snapkv", "knorm", "pyramidkv")


def test_run_sh_dry_run_writes_the_logs_and_the_table(tmp_path):
    env = {
        **os.environ,
        "OUT": str(tmp_path / "out"),
        "PYTHON": sys.executable,
        "KVBENCH_WHEELS": str(tmp_path / "no-wheels"),
        "PYTHONPATH": str(REPO),
    }
    env.pop("KVBENCH_CUDA_TESTS_ON", None)
    done = subprocess.run(
        ["bash", "bench/gpu/run.sh", "--dry-run"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "out"
    for name in ("install.log", "env.txt", "tests.log", "speed.log", "gpu_speed.md", "methods.log"):
        assert (out / name).is_file(), name
    assert "import harness.api ok" in (out / "env.txt").read_text()
    table = pd.read_csv(out / "gpu_speed.csv")
    assert set(table["method"]) == set(speed.METHODS) and "transformers" in speed.METHODS
    assert sorted(set(table["context"])) == [64, 128]
    assert set(table["workload"]) == {"repeat", "new_lengths"}
    assert len(table) == 2 * 2 * len(speed.METHODS)
    assert (table["status"] == "ok").all(), table[table["status"] != "ok"]["status"].tolist()
    full = table[table["method"] == "full"]
    assert (full["prefill vs full"] == 1).all() and (full["KV vs full"] == 1).all()
    kept = table[table["method"].isin(EVICTION)]["KV vs full"]
    assert kept.between(0.17, 0.23).all()  # 20 % of the KV cache, measured
    for column in ("prefill ms", "decode ms/tok", "decode vs floor", "peak MB", "request ms"):
        assert (table[column] > 0).all(), column
    new = table[table["workload"] == "new_lengths"]
    assert (new["requests"] == 2).all() and new["same tokens"].isna().all()  # 8 on a GPU
    baseline = table[(table["method"] == "transformers") & (table["workload"] == "repeat")]
    assert (baseline["KV vs full"] == 1).all()  # the static cache holds every token
    assert baseline["same tokens"].all()  # model.generate decodes what kvbench's full cache does
    # decoding steps: captured (the dry run's replay) unless the method changes the cache as it
    # decodes; full_eager, the full cache's steps not captured, decodes the same tokens
    decode = dict(zip(table["method"], table["decode"], strict=False))
    assert {m for m, how in decode.items() if how == "eager"} == {
        "transformers",
        "full_eager",
        "h2o",
        "spindlekv",
    }
    assert {how for m, how in decode.items()} == {"eager", "replay"}
    eager = table[(table["method"] == "full_eager") & (table["workload"] == "repeat")]
    assert eager["same tokens"].all()
    captured = table[table["decode"] == "replay"]
    assert (captured["capture ms"] > 0).all()
    text = (out / "gpu_speed.md").read_text()
    assert "DRY RUN" in text and "model.sdpa_backend=auto" in text
    ops = pd.read_csv(out / "op_counts.csv")
    assert list(ops["method"]) == list(op_counts.METHODS)
    assert (ops["ops/step"] > 0).all() and (ops["unit"] == "aten ops").all()
    assert ops.set_index("method").loc["full", "ops vs full"] == 1
    assert (table[table["method"] == "full"]["ops vs full"] == 1).all()
    assert table[table["method"] == "transformers"]["ops/step"].isna().all()  # not counted
    check_methods_table(out)


def check_methods_table(out) -> None:
    """bench/gpu/methods_speed.py's rows: every method ran; the model methods store and read
    fewer KV bytes than the full cache (KV-Latent's halved heads, kvheads' 2 -> 1 KV heads);
    each prompt method kept half of the asked tokens, timed against a plain forward pass."""
    table = pd.read_csv(out / "methods_speed.csv")
    assert (table["status"] == "ok").all(), table[table["status"] != "ok"]["status"].tolist()
    assert sorted(set(table["context"])) == [256, 512]
    model = table[table["kind"] == "model"]
    assert sorted(model["method"]) == sorted(["full", *methods_speed.MODEL_METHODS] * 2)
    kv = model.set_index(["method", "context"])["KV vs full"].unstack()
    assert (kv.loc["full"] == 1).all() and (kv.loc["kvlatent_kv"] == 0.5).all()
    assert (kv.loc["kvlatent_k"] == 0.75).all() and (kv.loc["kvlatent_v"] == 0.75).all()
    assert (kv.loc["kvheads"] == 0.5).all()
    assert (model["KV MB"] > 0).all() and (model["decode ms/tok"] > 0).all()
    assert (model["decode vs full"] > 0).all() and (model["weights MB"] > 0).all()
    prompt = table[table["kind"] == "prompt"]
    assert sorted(prompt["method"]) == sorted(["forward", *methods_speed.PROMPT_METHODS] * 2)
    assert (prompt["tokens"] == prompt["context"]).all() and (prompt["ms"] > 0).all()
    shortened = prompt[prompt["method"] != "forward"]
    assert shortened["kept"].between(0.45, 0.55).all() and (shortened["vs forward"] > 0).all()
    assert (prompt[prompt["method"] == "forward"]["vs forward"] == 1).all()
    text = (out / "methods_speed.md").read_text()
    assert "DRY RUN" in text and "Model methods against the full cache" in text
    assert "methods table FAILED" not in (out / "methods.log").read_text()


def test_op_counts_name_the_operators_a_method_adds_per_step():
    steps = {"full": {"aten::mm": 10.0}, "h2o": {"aten::mm": 10.0, "aten::sum": 4.0}}
    frame = op_counts.table(steps, "aten ops").set_index("method")
    assert frame.loc["full", "ops/step"] == 10 and frame.loc["full", "top extra ops"] == ""
    assert frame.loc["h2o", "ops vs full"] == 1.4
    assert frame.loc["h2o", "top extra ops"] == "aten::sum +4"


def test_a_run_is_projected_from_the_methods_smaller_contexts():
    plan = speed_cells.Plan([1, 2], ["full"], 0.2, 2, 1, 1.0, cell_s=10, budget_s=100)
    assert plan.projected_s("full", 2048) is None
    plan.history["full"] = [(1024, 1.0)]
    assert plan.projected_s("full", 4096) == pytest.approx(8.0)  # exponent 1.5 at first
    plan.history["full"].append((4096, 4.0))  # then the growth it showed: linear here
    assert plan.projected_s("full", 16384) == pytest.approx(16.0)


def test_the_table_skips_and_names_what_failed_or_would_not_fit(tiny_gqa, monkeypatch):
    model, tokenizer = tiny_gqa

    def fake_cell(model, tokenizer, name, workload, context, plan):
        if name == "h2o":
            raise torch.OutOfMemoryError("CUDA out of memory")
        if name == "snapkv":
            raise RuntimeError("boom")
        return {"wall_s": 5.0 if name == "pyramidkv" else 0.01}

    monkeypatch.setattr(speed, "run_cell", fake_cell)
    methods = ["full", "h2o", "snapkv", "pyramidkv"]
    plan = speed_cells.Plan([64, 128], methods, 0.2, 2, 1, 1.0, cell_s=10, budget_s=100)
    rows = speed.measure(model, tokenizer, plan, time.perf_counter(), lambda rows: None)
    status = {(r["method"], r["workload"], r["context"]): r["status"] for r in rows}
    assert status[("full", "new_lengths", 128)] == "ok"
    assert status[("h2o", "repeat", 64)] == "out of memory"
    assert status[("h2o", "new_lengths", 64)] == "skipped: out of memory at a smaller context"
    assert status[("snapkv", "repeat", 64)].startswith("failed: RuntimeError: boom")
    assert status[("pyramidkv", "repeat", 128)] == "skipped: projected 14 s > 10 s"
    spent = speed_cells.Plan([64], ["full"], 0.2, 2, 1, 1.0, cell_s=10, budget_s=-1)
    rows = speed.measure(model, tokenizer, spent, time.perf_counter(), lambda rows: None)
    assert all(r["status"].startswith("skipped: the table's") for r in rows)


def test_a_method_failing_its_warm_up_is_named_in_its_rows_and_the_rest_run(tiny_gqa, monkeypatch):
    """SpindleKV's warm-up once raised on a GPU and took the whole table with it."""
    model, tokenizer = tiny_gqa
    real = speed.request

    def request(model, tokenizer, name, ids, plan, graphs):
        if name == "spindlekv":
            raise TypeError("can't convert cuda:0 device type tensor to numpy")
        return real(model, tokenizer, name, ids, plan, graphs)

    monkeypatch.setattr(speed, "request", request)
    plan = speed_cells.Plan([16], ["full", "streamingllm", "spindlekv"], 0.25, 2, 1, 1.0, 60, 600)
    speed.warm_up(model, tokenizer, plan)
    rows = speed.measure(model, tokenizer, plan, time.perf_counter(), lambda rows: None)
    status = {(r["method"], r["workload"]): r["status"] for r in rows}
    failed = "failed at warm-up: TypeError: can't convert cuda:0 device type tensor to numpy"
    assert status[("spindlekv", "repeat")] == status[("spindlekv", "new_lengths")] == failed
    assert {v for k, v in status.items() if k[0] != "spindlekv"} == {"ok"}


def test_new_lengths_are_near_the_context_and_never_repeat():
    lengths = [n for slot in range(len(speed.METHODS)) for n in speed_cells.new_lengths(8192, slot)]
    assert len(set(lengths)) == len(lengths) == 8 * len(speed.METHODS)
    assert min(lengths) > 8192 and max(lengths) <= 1.1 * 8192
    assert speed_cells.new_lengths(64, 0) == list(range(65, 73))


def fake_wheel(folder, name: str, version: str, requires: list[str]) -> None:
    meta = "".join(f"Requires-Dist: {r}\n" for r in requires)
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name}-{version}.dist-info/METADATA", f"Name: {name}\n{meta}")


def test_the_wheel_check_finds_missing_needs_and_double_versions(tmp_path):
    fake_wheel(tmp_path, "alpha", "1.0", ["torch>=2", "beta", "win32only; sys_platform == 'win32'"])
    fake_wheel(tmp_path, "beta", "1.0", ["gamma-not-anywhere>=1", "extra-only; extra == 'x'"])
    fake_wheel(tmp_path, "beta", "2.0", [])
    found = check_wheels.problems(tmp_path, limit_mb=40)
    assert any("two versions of beta" in p for p in found)
    assert any("needs gamma-not-anywhere>=1" in p for p in found)
    assert not any("torch" in p or "win32only" in p or "extra-only" in p for p in found)
    assert check_wheels.problems(tmp_path, limit_mb=0)[-1].startswith("the wheels take")


def test_the_speed_table_takes_the_op_counts_per_method(tmp_path):
    frame = pd.DataFrame({"method": ["full", "h2o", "transformers"], "context": [64] * 3})
    assert list(speed_table.with_op_counts(frame, tmp_path / "none.csv")) == ["method", "context"]
    steps = {"full": {"aten::mm": 10.0}, "h2o": {"aten::mm": 10.0, "aten::sum": 5.0}}
    op_counts.table(steps, "aten ops").to_csv(tmp_path / "op_counts.csv", index=False)
    merged = speed_table.with_op_counts(frame, tmp_path / "op_counts.csv").set_index("method")
    assert merged.loc["h2o", "ops/step"] == 15 and merged.loc["h2o", "ops vs full"] == 1.5
    assert pd.isna(merged.loc["transformers", "ops/step"])
