"""The GPU device check without a GPU: bench/gpu/run.sh --dry-run end to end (install step,
cuda-marked tests, the speed table on tiny shapes), the table's skip and failure paths, and
the wheel folder check."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import zipfile

import pandas as pd
import pytest
import torch

from bench.gpu import check_wheels, speed
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
    for name in ("install.log", "env.txt", "tests.log", "speed.log", "gpu_speed.md"):
        assert (out / name).is_file(), name
    assert "import harness.api ok" in (out / "env.txt").read_text()
    table = pd.read_csv(out / "gpu_speed.csv")
    assert set(table["method"]) == set(speed.METHODS)
    assert sorted(set(table["context"])) == [64, 128]
    assert (table["status"] == "ok").all()
    full = table[table["method"] == "full"]
    assert (full["prefill vs full"] == 1).all() and (full["KV vs full"] == 1).all()
    kept = table[table["method"].isin(EVICTION)]["KV vs full"]
    assert kept.between(0.17, 0.23).all()  # 20 % of the KV cache, measured
    for column in ("prefill ms", "decode ms/tok", "decode vs floor", "peak MB"):
        assert (table[column] > 0).all(), column
    assert "DRY RUN" in (out / "gpu_speed.md").read_text()


def test_a_run_is_projected_from_the_methods_smaller_contexts():
    plan = speed.Plan([1, 2], ["full"], 0.2, 2, 1, 1.0, cell_s=10, budget_s=100)
    assert plan.projected_s("full", 2048) is None
    plan.history["full"] = [(1024, 1.0)]
    assert plan.projected_s("full", 4096) == pytest.approx(8.0)  # exponent 1.5 at first
    plan.history["full"].append((4096, 4.0))  # then the growth it showed: linear here
    assert plan.projected_s("full", 16384) == pytest.approx(16.0)


def test_the_table_skips_and_names_what_failed_or_would_not_fit(tiny_gqa, monkeypatch):
    model, tokenizer = tiny_gqa

    def fake_cell(model, tokenizer, name, ids, plan):
        if name == "h2o":
            raise torch.OutOfMemoryError("CUDA out of memory")
        if name == "snapkv":
            raise RuntimeError("boom")
        return {"wall_s": 5.0 if name == "pyramidkv" else 0.01}

    monkeypatch.setattr(speed, "run_cell", fake_cell)
    methods = ["full", "h2o", "snapkv", "pyramidkv"]
    plan = speed.Plan([64, 128], methods, 0.2, 2, 1, 1.0, cell_s=10, budget_s=100)
    rows = speed.measure(model, tokenizer, plan, time.perf_counter(), lambda rows: None)
    status = {(r["method"], r["context"]): r["status"] for r in rows}
    assert status[("full", 128)] == "ok"
    assert status[("h2o", 64)] == "out of memory"
    assert status[("h2o", 128)] == "skipped: out of memory at a smaller context"
    assert status[("snapkv", 64)].startswith("failed: RuntimeError: boom")
    assert status[("pyramidkv", 128)] == "skipped: projected 14 s > 10 s"
    spent = speed.Plan([64], ["full"], 0.2, 2, 1, 1.0, cell_s=10, budget_s=-1)
    (row,) = speed.measure(model, tokenizer, spent, time.perf_counter(), lambda rows: None)
    assert row["status"].startswith("skipped: the table's")


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
