"""Named sweeps, launchers and resume: every sweep in conf/sweep composes into valid runs,
the launcher configs resolve, submitit's local mode runs a two-job multirun through the
SLURM code path, a sweep killed mid-way resumes with only the missing run, and an unknown
method fails before anything runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser

from harness import records
from harness.job import prepare
from harness.run import CONF_DIR
from hydra_plugins.kvbench_sweeper.kvbench_sweeper import KVBenchSweeper, with_references

SWEEPS = sorted(p.stem for p in (CONF_DIR / "sweep").glob("*.yaml") if p.stem != "none")
# the tiny random model, two short prompts, a few tokens: seconds per run
TINY = [
    "model=tiny_llama_gqa",
    "task=gsm8k",
    "task.limit=2",
    "task.num_fewshot=0",
    "run.max_gen_toks=8",
]
ENV = {**os.environ, "HYDRA_FULL_ERROR": "1", "PYTHONUNBUFFERED": "1"}


def kvbench(*args: str) -> list[str]:
    return [sys.executable, "-m", "harness.run", *args]


def sweep_jobs(name: str) -> list[list[str]]:
    """The override lists of every job that ``kvbench sweep=<name>`` launches (the full-cache
    references first)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"sweep={name}"], return_hydra_config=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN", f"sweep={name} is not a multirun"
    params = [f"{key}={value}" for key, value in cfg.hydra.sweeper.params.items()]
    parsed = OverridesParser.create().parse_overrides(params)
    (batch,) = KVBenchSweeper(max_batch_size=None).split_arguments(parsed, None)
    return [[f"sweep={name}", *job] for job in batch]


@pytest.mark.parametrize("name", SWEEPS)
def test_every_job_of_a_named_sweep_composes_and_validates(name: str) -> None:
    jobs = sweep_jobs(name)
    assert len(jobs) >= 2
    ids = set()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for overrides in jobs:
            cfg = compose(config_name="config", overrides=overrides)
            prepare(cfg)  # instantiates and validates model, method and task; loads nothing
            ids.add(records.run_id(cfg))
    assert len(ids) == len(jobs)  # every job is a different run
    assert any("method=full" in job for job in jobs)  # with its reference


def test_a_sweep_runs_the_full_cache_once_as_the_reference_of_its_settings() -> None:
    parsed = OverridesParser.create().parse_overrides(
        ["method=full,streamingllm", "method.ratio=0.1,0.2", "task=gsm8k,bbh", "model=m"]
    )
    (jobs,) = KVBenchSweeper(max_batch_size=None).split_arguments(parsed, None)
    assert jobs[:2] == [
        ["task=gsm8k", "model=m", "method=full"],
        ["task=bbh", "model=m", "method=full"],
    ]
    rest = [j for j in jobs[2:] if "method=streamingllm" in j]
    assert len(rest) == len(jobs) - 2 == 4  # 2 ratios x 2 tasks, no full job with a ratio
    # a job that is its own reference is not run twice; a model method gets one too
    assert with_references([["method=full", "task=x"], ["method=kvlatent_k", "task=x"]]) == [
        ["task=x", "method=full"],
        ["method=kvlatent_k", "task=x"],
    ]
    assert with_references([["+method.foo=1", "method=h2o"]]) == [
        ["method=full"],
        ["+method.foo=1", "method=h2o"],
    ]


def test_the_readme_sweep_runs_its_own_reference(tmp_path: Path) -> None:
    """`kvbench -m method=full,streamingllm method.ratio=...` (the README's form): the full
    cache runs once, without the ratio it takes none of, and the report has its reference."""
    args = ["-m", *TINY, "method=full,streamingllm", "method.ratio=0.25,0.5"]
    done = subprocess.run(
        kvbench(*args, f"run.results_dir={tmp_path}"),
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = [records.read_record(p) for p in records.find_records(tmp_path)]
    assert sorted(r["method"]["name"] for r in found) == ["full", "streamingllm", "streamingllm"]
    assert "2 full-cache references" not in done.stderr  # one reference: one task setting
    assert "sweep: 3 jobs, 1 of them full-cache references" in done.stderr + done.stdout


def test_a_sweep_whose_reference_cannot_run_fails_before_any_job(tmp_path: Path) -> None:
    args = [
        "-m",
        "model=tiny_llama_gqa",
        "model.max_length=512",
        "task=ruler_niah_single_1",
        "task.lengths=[1024]",
        "task.samples_per_length=1",
        "method=snapkv,streamingllm",
        f"run.results_dir={tmp_path}",
    ]
    done = subprocess.run(
        kvbench(*args), capture_output=True, text=True, env={**ENV, "HYDRA_FULL_ERROR": "0"}
    )
    assert done.returncode != 0
    assert "the sweep's full-cache reference" in done.stderr and "method=full" in done.stderr
    assert "exceed the model's window of 512" in done.stderr
    assert records.find_records(tmp_path) == []


def test_prompt_sweep_compares_dac_with_the_baselines_on_gsm8k_and_one_bbh_subtask() -> None:
    jobs = sweep_jobs("prompt_gsm8k_bbh")
    flat = {item for job in jobs for item in job}
    assert {"method=dac", "method=selfinfo", "method=llmlingua", "method=random_deletion"} <= flat
    assert {"method.ratio=0.7", "method.ratio=0.5", "task=bbh_date_understanding"} <= flat
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        named = compose(config_name="config", overrides=["task=bbh_date_understanding"])
        plain = compose(
            config_name="config", overrides=["task=bbh", "task.subtask=date_understanding"]
        )
    assert records.run_id(named) == records.run_id(plain)  # the same run, the same record


def test_launcher_configs() -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        slurm = compose(
            config_name="config",
            overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
            return_hydra_config=True,
        ).hydra.launcher
        joblib = compose(
            config_name="config", overrides=["hydra/launcher=joblib"], return_hydra_config=True
        ).hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher")
    assert slurm.partition == "gpu" and slurm.gpus_per_node == 1
    assert slurm.timeout_min > 0 and slurm.cpus_per_task > 0 and slurm.mem_gb > 0
    assert joblib._target_.endswith("JoblibLauncher")


def test_submitit_local_runs_a_two_job_multirun_and_reports(tmp_path: Path) -> None:
    """The SLURM code path (submitit pickles each job and runs it in its own process),
    with submitit's local executor; the report runs once, in the submitting process."""
    done = subprocess.run(
        kvbench("-m", "hydra/launcher=submitit_local", *TINY, "method=full,streamingllm")
        + [f"run.results_dir={tmp_path}"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = records.find_records(tmp_path)
    assert len(found) == 2
    assert {records.read_record(p)["method"]["name"] for p in found} == {"full", "streamingllm"}
    assert "Submitit 'local' sweep output dir" in done.stderr + done.stdout
    assert list(tmp_path.glob(".hydra/multirun-*/.submitit/*/*_log.out"))  # submitit's logs
    assert "| streamingllm" in done.stdout and (tmp_path / "report" / "report.md").is_file()


def _wait_for(condition, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"kvbench exited early ({proc.returncode})")
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)


def test_a_killed_sweep_resumes_with_only_the_missing_run(tmp_path: Path) -> None:
    """SIGKILL while the second run generates, then the same command again."""
    # 24 new tokens per sample (seconds): the second run is still generating when killed
    args = ["-m", *TINY, "run.max_gen_toks=24", "method=full,streamingllm", "run.report=false"]
    args.append(f"run.results_dir={tmp_path}")
    log = tmp_path.parent / f"{tmp_path.name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            kvbench(*args), stdout=out, stderr=subprocess.STDOUT, env=ENV, start_new_session=True
        )
        try:
            _wait_for(lambda: len(records.find_records(tmp_path)) == 1, 240, proc)

            def second_generates() -> bool:
                logs = list(tmp_path.glob(".hydra/multirun-*/1/*.log"))
                return bool(logs) and "Running generate_until" in logs[0].read_text()

            _wait_for(second_generates, 120, proc)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    (first,) = records.find_records(tmp_path)
    # nothing that is not a complete record looks like a finished run
    for folder in tmp_path.iterdir():
        if folder.is_dir() and not folder.name.startswith("."):
            assert folder == first.parent or folder.name == "report", folder
            assert records.is_finished(folder)
    stamp = first.stat().st_mtime_ns

    done = subprocess.run(kvbench(*args), capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"skipping {first.parent}" in done.stderr + done.stdout
    assert len(records.find_records(tmp_path)) == 2
    assert first.stat().st_mtime_ns == stamp  # the finished run was not recomputed


def test_a_sweep_over_an_unknown_method_fails_before_any_run(tmp_path: Path) -> None:
    done = subprocess.run(
        kvbench("-m", *TINY, "method=full,nope", f"run.results_dir={tmp_path}"),
        capture_output=True,
        text=True,
        env={**ENV, "HYDRA_FULL_ERROR": "0"},
        timeout=120,
    )
    assert done.returncode != 0
    assert "Could not find 'method/nope'" in done.stderr
    assert "Available options" in done.stderr and "streamingllm" in done.stderr
    assert records.find_records(tmp_path) == []  # the valid job did not run either


def test_a_method_whose_code_is_not_installed_is_named(tmp_path: Path) -> None:
    from harness.run import ConfigError, execute

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[*TINY, f"run.results_dir={tmp_path}", "method._target_=nopkg.Method"],
        )
    with pytest.raises(ConfigError, match=r"method=full: .*nopkg.Method.* cannot be imported"):
        execute(cfg)
    assert list(tmp_path.iterdir()) == []


def test_a_failing_job_is_reported_at_once_and_the_sweep_goes_on(tmp_path: Path) -> None:
    """Jobs #0 and #1 are the full-cache references of the two attention implementations;
    #2 fails when it checks the loaded model's (PyramidKV refuses eager attention), #3 runs:
    the failure is logged when it happens, not only when Hydra raises it after the sweep."""
    args = ["-m", *TINY, "method=pyramidkv", "model.attn_implementation=eager,sdpa"]
    done = subprocess.run(
        kvbench(*args, "run.report=false", f"run.results_dir={tmp_path}"),
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert done.returncode != 0
    text = done.stdout + done.stderr
    failed = text.index("run failed (method=pyramidkv, task=gsm8k), no record written")
    assert "eager" in text[failed : failed + 500]
    assert failed < text.index("#3 :")
    assert len(records.find_records(tmp_path)) == 3


def test_a_sweep_with_a_bad_job_config_fails_before_any_job(tmp_path: Path) -> None:
    """A budget below the window is refused by the config: no job of the sweep starts."""
    args = ["-m", *TINY, "method=streamingllm", "method.window=16", "method.budget=8,64"]
    done = subprocess.run(
        kvbench(*args, f"run.results_dir={tmp_path}"),
        capture_output=True,
        text=True,
        env={**ENV, "HYDRA_FULL_ERROR": "0"},
        timeout=120,
    )
    assert done.returncode != 0
    assert "the sweep's job" in done.stderr and "method.budget=8" in done.stderr
    assert "exceed method.budget=8" in done.stderr
    assert records.find_records(tmp_path) == []
