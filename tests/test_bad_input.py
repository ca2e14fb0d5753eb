"""Every bad input is refused before the model loads: exit status 1, one line on stderr that
names the field, no run folder (and no Hydra output folder) left behind, the model untouched.

The matrix runs the real command line (``harness.run.main``) in this process, with
``ModelSpec.load`` replaced by a recorder; two cases run ``python -m harness.run`` in a child
process, where loading the model would leave a marker file.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from harness import run
from harness.models import ModelSpec

REPO = Path(__file__).resolve().parents[1]
TINY = ["model=tiny_llama_gqa", "task.limit=1", "run.report=false"]

CASES = [
    # values of the wrong type: the field is named (it used to be "could not convert ...")
    (["method=streamingllm", "method.ratio=abc"], "method.ratio"),
    (["method=streamingllm", "method.sinks=abc"], "method.sinks"),
    (["method=snapkv", "method.kernel_size=1.5"], "method.kernel_size"),
    (["method=spindlekv", "method.magnitude=maybe"], "method.magnitude"),
    (["task.limit=abc"], "task.limit"),
    (["task.num_fewshot=abc"], "task.num_fewshot"),
    (["model.max_length=abc"], "model.max_length"),
    (["model.threads=abc"], "model.threads"),
    (["run.max_gen_toks=abc"], "run.max_gen_toks"),
    (["run.seed=abc"], "run.seed"),
    (["run.overwrite=maybe"], "run.overwrite"),
    # values out of range
    (["run.max_gen_toks=0"], "run.max_gen_toks"),
    (["run.bootstrap_iters=-1"], "run.bootstrap_iters"),
    (["method=streamingllm", "method.ratio=1.5"], "method.ratio"),
    (["method=streamingllm", "method.ratio=0"], "method.ratio"),
    (["method=full", "method.ratio=0.5"], "method.ratio"),
    (["method=streamingllm", "method.budget=8", "method.window=16"], "method.budget"),
    (["method=streamingllm", "method.sinks=0"], "method.sinks"),
    (["task.limit=0"], "task.limit"),
    (["task.num_fewshot=-1"], "task.num_fewshot"),
    (["task=bbh", "task.subtask=no_such_task"], "task.subtask"),
    (["task.truncation=right"], "task.truncation"),
    (["task.source=web"], "task.source"),
    (["task.reference_tokens=0"], "task.reference_tokens"),
    (["model.dtype=float64"], "model.dtype"),
    (["model.attn_implementation=flash"], "model.attn_implementation"),
    (["model.max_length=8"], "model.max_length"),
    (["model.threads=0"], "model.threads"),
    (["model.source=local", "model.path=/nonexistent/model"], "model.path"),
    (["model.source=gguf_package", "model.path=not_installed_pkg"], "model.path"),
    (["method=pyramidkv", "model.attn_implementation=eager"], "model.attn_implementation"),
    # the window against the tokens generated (it used to fail after the weights loaded)
    (["model.max_length=16"], "run.max_gen_toks"),
    (["task=bbh_date_understanding", "model.max_length=1000"], "model.max_length=1000"),
    (["task=longbench_qasper", "model.max_length=100"], "model.max_length=100"),
    # unknown fields and options: Hydra's own one-line errors
    (["method.no_such_field=1"], "method.no_such_field"),
    (["method=no_such_method"], "method/no_such_method"),
]


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys):
    """``cli(*args)`` runs ``kvbench *args`` in process; returns (exit status, stderr lines,
    model loads)."""
    loads = []

    def load(self):
        loads.append(self.name)
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(ModelSpec, "load", load)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)

    def invoke(*args: str) -> tuple[int, list[str], list[str]]:
        monkeypatch.setattr(sys, "argv", ["kvbench", *args])
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            run.main()
        err = capsys.readouterr().err
        return exit_info.value.code, [line for line in err.splitlines() if line.strip()], loads

    return invoke


def assert_nothing_left(results: Path) -> None:
    left = sorted(p.relative_to(results) for p in results.rglob("*")) if results.exists() else []
    assert left == [], f"left behind: {left}"


@pytest.mark.parametrize(("overrides", "field"), CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_input_is_refused_before_the_model_loads(cli, tmp_path, overrides, field):
    results = tmp_path / "results"
    status, lines, loads = cli(*TINY, f"run.results_dir={results}", *overrides)
    assert status == 1
    assert any(field in line for line in lines), lines
    assert not any("Traceback" in line for line in lines), lines
    assert loads == []
    assert_nothing_left(results)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible here")
def test_cuda_without_a_gpu_is_refused(cli, tmp_path):
    status, lines, loads = cli(*TINY, f"run.results_dir={tmp_path / 'r'}", "model.device=cuda")
    assert status == 1 and any("model.device" in line for line in lines) and loads == []
    assert_nothing_left(tmp_path / "r")


@pytest.mark.parametrize("where", ["file", "below_a_file", "unwritable"])
def test_results_dir_that_cannot_hold_records_is_one_line(cli, tmp_path, where):
    """It used to end in a raw NotADirectoryError / PermissionError traceback (from Hydra's
    own output folder), or, through the Python API, after the whole run was computed."""
    afile = tmp_path / "results.txt"
    afile.write_text("not a folder")
    results = {
        "file": afile,
        "below_a_file": afile / "results",
        "unwritable": Path("/sys/kvbench-results"),  # refused even to root
    }[where]
    status, lines, loads = cli(*TINY, f"run.results_dir={results}")
    assert status == 1 and loads == []
    assert len(lines) == 1 and "run.results_dir=" in lines[0] and str(results) in lines[0]
    assert afile.read_text() == "not a folder"


def test_results_dir_is_checked_before_loading_from_python(tmp_path, monkeypatch):
    """``harness.api.evaluate`` / ``execute`` check it too, before any weights load."""
    from harness.api import compose_config
    from harness.records import ResultsDirError

    monkeypatch.setattr(ModelSpec, "load", lambda self: pytest.fail("the model was loaded"))
    cfg = compose_config("tiny_llama_gqa", overrides={"run.results_dir": "/sys/kvbench-results"})
    with pytest.raises(ResultsDirError, match="run.results_dir='/sys/kvbench-results'"):
        run.execute(cfg)


def test_each_failed_run_says_its_error_once_and_leaves_no_hydra_folder(cli, tmp_path):
    results = tmp_path / "results"
    status, lines, _ = cli(*TINY, f"run.results_dir={results}", "task.limit=abc")
    assert status == 1
    assert len(lines) == 1 and lines[0].startswith("kvbench: task.limit=abc")
    assert_nothing_left(results)


CHILD = """
import os, sys
from harness.models import ModelSpec

def load(self):  # loading the model is visible from outside
    open(os.environ["KVBENCH_TEST_LOADED"], "w").write(self.name)
    raise SystemExit(99)

ModelSpec.load = load
from harness.run import main
sys.argv = ["kvbench", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["method=streamingllm", "method.ratio=abc"], "method.ratio"),
        (["model.max_length=16"], "model.max_length"),
    ],
)
def test_command_line_in_a_child_process(tmp_path, overrides, field):
    results, marker = tmp_path / "results", tmp_path / "loaded"
    env = {**os.environ, "PYTHONPATH": str(REPO), "KVBENCH_TEST_LOADED": str(marker)}
    env.pop("HYDRA_FULL_ERROR", None)
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(CHILD),
            *TINY,
            f"run.results_dir={results}",
            *overrides,
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1, done.stderr[-3000:]
    assert [line for line in lines if field in line] == lines[-1:], lines
    assert "Traceback" not in done.stderr
    assert not marker.exists()
    assert_nothing_left(results)
    assert not (tmp_path / "outputs").exists()  # nothing in the working directory either
