"""A non-editable install runs: the wheel carries conf/ and data/, the console scripts work,
and kvbench's lm-eval model is reachable from lm-eval's own command line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

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
        "import harness, methods.storage as s, methods.cache.spindlekv.codebook_kernels as k; "
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


def test_the_installed_lm_eval_command_finds_kvbenchs_tasks_outside_the_checkout(
    installed, tmp_path
):
    """No --include_path: the tasks come from the installed package's own folder."""
    site, env = installed
    args = [
        str(site / "bin" / "kvbench-lm-eval"),
        "--model", "kvbench",
        "--model_args", "model=tiny_llama_gqa,method=streamingllm,ratio=0.5",
        "--tasks", "kvbench_gsm8k",
        "--limit", "1",
        "--gen_kwargs", "max_gen_toks=2",
        "--output_path", str(tmp_path / "out"),
    ]  # fmt: skip
    out = run(args, tmp_path, env)
    assert out.returncode == 0, out.stderr[-3000:]
    [results] = (tmp_path / "out").rglob("results_*.json")
    assert "kvbench_gsm8k" in json.loads(results.read_text())["results"]
    assert "Custom kwargs can be passed" not in out.stderr + out.stdout  # lm-eval's noise


def test_include_path_adds_folders_beside_kvbenchs_tasks(tmp_path):
    extra = tmp_path / "tasks"
    extra.mkdir()
    (extra / "mine.yaml").write_text(
        f"include: {REPO / 'harness' / 'tasks' / 'gsm8k.yaml'}\ntask: my_gsm8k\n"
    )
    manager = lm_eval_model.KVBenchTaskManager(include_path=str(extra), include_defaults=False)
    assert {"my_gsm8k", "kvbench_gsm8k", "kvbench_ruler_niah_single_1"} <= set(manager.all_tasks)
    # simple_evaluate's default TaskManager is this one once the module is imported
    import lm_eval.evaluator

    assert lm_eval.evaluator.TaskManager is lm_eval_model.KVBenchTaskManager
    assert lm_eval_model.include_paths(None) == [str(REPO / "harness" / "tasks")]


def test_make_compat_covers_both_ends_of_the_transformers_range():
    """The lowest end is pyproject's own bound; the newest is resolved by `make compat` itself
    (a venv without the lock), so no test depends on what PyPI serves today."""
    text = (REPO / "Makefile").read_text()
    assert "COMPAT_LOW := $(shell sed" in text and "transformers>=" in text
    low = re.search(r'"transformers>=([\d.]+),', (REPO / "pyproject.toml").read_text()).group(1)
    done = subprocess.run(
        ["make", "-s", "-n", "compat"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert f"transformers=={low}" in done.stdout
    assert "--upgrade --upgrade-strategy eager" in done.stdout  # the newest, without the lock
    assert "harness.lock" in done.stdout  # it says which versions differ from the lock
