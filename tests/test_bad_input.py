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
    # list entries are type-checked (they used to give "invalid literal for int()" and leave
    # a .hydra folder behind)
    (["task=ruler_niah_single_1", "task.lengths=[abc]"], "task.lengths"),
    (["task=ruler_niah_single_1", "task.depths=[abc]"], "task.depths"),
    (["task=ruler_niah_single_1", "task.lengths=[1.5]"], "task.lengths"),
    (["task=ruler_niah_single_1", "task.depths=[true]"], "task.depths"),
    (["task.score_range=[1,0]"], "task.score_range"),
    (["task.score_range=[0]"], "task.score_range"),
    # a ratio the window cannot honour: below the sinks it promises, or keeping everything
    (["method=streamingllm", "method.ratio=1e-9"], "method.sinks + method.window"),
    (["method=streamingllm", "method.ratio=0.00001"], "method.ratio=1e-05"),
    (["method=streamingllm", "method.window=8", "method.ratio=0.0009"], "method.ratio=0.0009"),
    (["method=snapkv", "method.budget=100000"], "method.budget=100000"),
    (["method=streamingllm", "method.ratio=0.99999999"], "would have no effect"),
    # run.* values of the wrong type or range that used to pass
    (["run.add_bos_token=maybe"], "run.add_bos_token"),
    (["run.bootstrap_iters=1.5"], "run.bootstrap_iters"),
    (["run.max_gen_toks=1.5"], "run.max_gen_toks"),
    (["run.seed=1.5"], "run.seed"),
    (["model.max_length=-5"], "model.max_length"),
    (["method=snapkv", "method.ratio=-0.2"], "method.ratio"),
    (["method=snapkv", "method.ratio=nan"], "method.ratio"),
    (["method=snapkv", "method.ratio=inf"], "method.ratio"),
    # an empty results folder used to write into the cwd and Hydra's log into /.hydra
    (["run.results_dir="], "run.results_dir is empty"),
    (["run.results_dir=' '"], "run.results_dir is empty"),
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


def test_a_results_dir_with_too_long_a_name_is_one_line(cli, tmp_path):
    """It used to be a raw OSError: [Errno 36] from Hydra's output folder."""
    for long in (tmp_path / ("a" * 256), tmp_path.joinpath(*["b" * 200] * 20)):
        status, lines, loads = cli(*TINY, f"run.results_dir={long}")
        assert status == 1 and loads == [] and len(lines) == 1, lines
        assert "run.results_dir=" in lines[0] and "too long" in lines[0]
    assert list(tmp_path.iterdir()) == []  # nothing made on the way


@pytest.mark.parametrize("kind", ["file", "below_a_file"])
def test_a_cache_folder_that_is_a_file_is_one_line(cli, tmp_path, monkeypatch, kind):
    """It used to be a NotADirectoryError traceback once the model was loading."""
    afile = tmp_path / "cache.txt"
    afile.write_text("not a folder")
    monkeypatch.setenv("KVBENCH_CACHE", str(afile if kind == "file" else afile / "sub"))
    status, lines, loads = cli(*TINY, f"run.results_dir={tmp_path / 'r'}")
    assert status == 1 and loads == [] and len(lines) == 1, lines
    assert "$KVBENCH_CACHE=" in lines[0] and str(afile) in lines[0]


def _data_copy(root: Path, test_text: str | None) -> Path:
    (root / "gsm8k").mkdir(parents=True)
    (root / "gsm8k" / "train.jsonl").write_text((REPO / "data/gsm8k/train.jsonl").read_text())
    if test_text is None:
        os.mkfifo(root / "gsm8k" / "test.jsonl")
    else:
        (root / "gsm8k" / "test.jsonl").write_text(test_text)
    return root


@pytest.mark.parametrize(
    ("content", "names"),
    [
        ("cut", "line 3 is not valid JSON"),  # a file cut mid-line
        ("", "holds no records"),  # it used to be IndexError: 0 is out of bounds
        ('{"question": "q", "answer": "a"}\n[1, 2]\n', "line 2 is a list, not a JSON object"),
        ("\xff\xfe", "not UTF-8"),
        (None, "not a regular file but a FIFO"),  # it used to block
    ],
)
def test_a_broken_data_file_is_named_with_its_line(cli, tmp_path, monkeypatch, content, names):
    text = REPO.joinpath("data/gsm8k/test.jsonl").read_text()
    if content == "cut":
        lines = text.splitlines(keepends=True)
        content = "".join(lines[:2]) + lines[2][:40]
    if content == "\xff\xfe":
        data = _data_copy(tmp_path / "data", "")
        (data / "gsm8k" / "test.jsonl").write_bytes(b"\xff\xfe{}\n")
    else:
        data = _data_copy(tmp_path / "data", content)
    monkeypatch.setenv("KVBENCH_DATA", str(data))
    status, lines, loads = cli(*TINY, f"run.results_dir={tmp_path / 'r'}")
    assert status == 1 and loads == [] and len(lines) == 1, lines
    assert str(data / "gsm8k" / "test.jsonl") in lines[0] and names in lines[0]


def test_a_full_disk_while_writing_the_record_is_one_line(tmp_path, monkeypatch):
    """It used to be OSError: [Errno 28] plus a "--- Logging error ---" block per line."""
    import errno

    from harness import records
    from tests.test_records import cfg, record

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(records, "_publish_record", full)
    c = cfg(tmp_path)
    folder = records.run_dir(c)
    with pytest.raises(records.RecordError, match="No space left on device; free space") as info:
        records.write_record(folder, record(folder), c, overwrite=False)
    assert "\n" not in str(info.value) and not folder.exists()


def test_the_job_log_on_a_full_disk_stops_quietly(capsys):
    import logging

    from harness.logfile import LogFile

    handler = LogFile("/dev/full")  # every write fails with ENOSPC
    logger = logging.getLogger("kvbench-test-full-disk")
    logger.propagate = False  # this handler alone (earlier tests leave root handlers)
    logger.addHandler(handler)
    try:
        for n in range(8):
            logger.warning("line %d", n)
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert handler.broken and "Logging error" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("ratio", "names"),
    [("0.0005", "below the 4 tokens streamingllm always keeps"), ("0.9999", "no effect")],
)
def test_a_ratio_the_prompts_cannot_honour_is_refused_before_the_first_request(
    tmp_path, monkeypatch, ratio, names
):
    """0.0005 used to keep 1 token a head although sinks=4 (kv_ratio below its own
    kv_ratio_reachable); 0.9999 failed only after the whole run (NoEffectError)."""
    from harness.api import compose_config
    from harness.session import Session
    from methods.base import MethodConfigError

    requests = []
    monkeypatch.setattr(Session, "generate", lambda *a, **k: requests.append(a))
    overrides = {"run.results_dir": str(tmp_path), "task.limit": 1, "method.ratio": float(ratio)}
    cfg = compose_config("tiny_llama_gqa", "streamingllm", overrides=overrides)
    with pytest.raises(MethodConfigError, match=names):
        run.execute(cfg)
    assert requests == [] and list(tmp_path.iterdir()) == []


def test_kvbench_data_that_is_a_file_is_one_line(cli, tmp_path, monkeypatch):
    afile = tmp_path / "data.txt"
    afile.write_text("not a folder")
    monkeypatch.setenv("KVBENCH_DATA", str(afile))
    status, lines, loads = cli(*TINY, f"run.results_dir={tmp_path / 'r'}")
    assert status == 1 and loads == [] and len(lines) == 1, lines
    assert f"$KVBENCH_DATA={afile} is a file, not a folder" in lines[0]
