"""A non-editable install runs: the wheel carries conf/ and data/, the console scripts work,
and kvbench's lm-eval model is reachable from lm-eval's own command line."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.version import Version

from harness import lm_eval_model

REPO = Path(__file__).resolve().parents[1]


def run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """kvbench's wheel, built from this checkout and installed (no deps) into a folder that
    comes first on the path: the checkout itself is not importable from there."""
    tmp = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "-q"]
    built = run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp), str(REPO)], tmp, {}
    )
    assert built.returncode == 0, built.stderr
    [wheel] = tmp.glob("kvbench-*.whl")
    site = tmp / "site"
    done = run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], tmp, {})
    assert done.returncode == 0, done.stderr
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_WAIT_POLICY": "PASSIVE"}
    env.pop("KVBENCH_DATA", None)
    return site, env


def test_the_installed_package_finds_its_configs_and_data(installed, tmp_path):
    site, env = installed
    probe = (
        "import harness, methods.storage as s, methods.cache.codebook_kernels as k; "
        "print(harness.__file__); print(s.conf_dir()); print(s.data_file('gsm8k/test.jsonl')); "
        "print(k.SOURCE)"
    )
    out = run([sys.executable, "-c", probe], tmp_path, env)
    assert out.returncode == 0, out.stderr
    package, conf, data, kernels = out.stdout.split()
    assert all(Path(p).is_relative_to(site) for p in (package, conf, data, kernels))
    assert (Path(conf) / "config.yaml").is_file() and Path(data).is_file()
    assert Path(kernels).is_file()  # SpindleKV's fused kernels' source ships in the wheel


def test_the_installed_kvbench_command_runs_a_task(installed, tmp_path):
    site, env = installed
    args = [
        str(site / "bin" / "kvbench"),
        "model=tiny_llama_gqa",
        "task=gsm8k",
        "task.limit=1",
        "run.max_gen_toks=4",
        f"run.results_dir={tmp_path / 'results'}",
        "run.report=false",
    ]
    out = run(args, tmp_path, env)
    assert out.returncode == 0, out.stderr[-3000:]
    [record] = (tmp_path / "results").glob("*/record.json")
    assert json.loads(record.read_text())["task"]["name"] == "gsm8k"


def test_lm_eval_cli_runs_the_kvbench_model(tmp_path, capsys):
    lm_eval_model.KVBenchEvalLM.instances.clear()
    lm_eval_model.main(
        [
            "--model", "kvbench",
            "--model_args", "model=tiny_llama_gqa,method=streamingllm,ratio=0.25",
            "--tasks", "kvbench_gsm8k",
            "--include_path", str(REPO / "harness" / "tasks"),
            "--limit", "2",
            "--gen_kwargs", "max_gen_toks=4",
            "--output_path", str(tmp_path),
        ]
    )  # fmt: skip
    [lm] = lm_eval_model.KVBenchEvalLM.instances
    lm.close()
    [results] = tmp_path.rglob("results_*.json")
    [ours] = results.parent.glob("kvbench_*.json")
    measured = json.loads(ours.read_text())
    assert measured["method"] == "streamingllm" and measured["params"]["ratio"] == 0.25
    assert measured["measurements"]["requests"] == 2 == len(measured["requests"])
    assert measured["measurements"]["kv_ratio"] == pytest.approx(0.25, abs=0.01)
    assert "kvbench_gsm8k" in json.loads(results.read_text())["results"]
    assert "kv_ratio=" in capsys.readouterr().out


def test_make_compat_covers_both_ends_of_the_transformers_range():
    text = (REPO / "pyproject.toml").read_text()
    low, high = re.search(r'"transformers>=([\d.]+),<([\d.]+)"', text).groups()
    versions = re.search(r"COMPAT_TRANSFORMERS \?= (.+)", (REPO / "Makefile").read_text())
    tested = versions.group(1).split()
    assert Version(tested[0]) == Version(low)
    assert Version(tested[-1]) < Version(high)
    assert Version(tested[-1]) >= Version(importlib.metadata.version("transformers"))
