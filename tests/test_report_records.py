"""The report reads only records that pass the schema: a bad one is skipped and named with
its field, a copy of a run is reported once with a warning, a FIFO never blocks."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest

from harness.report import load_report, main
from tests.test_report import make_record


def dump(root: Path, record: dict, folder: str | None = None) -> Path:
    path = root / (folder or record["run_id"]) / "record.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(record))
    return path


@pytest.fixture
def good(tmp_path: Path) -> Path:
    root = tmp_path / "results"
    dump(root, make_record("full_run", "full", {"ratio": 1.0}, 0.5, 1.0, ["1", "2"]))
    return root


def bad(run_id: str, **changes) -> dict:
    record = make_record(run_id, "streamingllm", {"ratio": 0.2}, 0.25, 0.21, ["1", "3"])
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        target = record
        for key in parents:
            target = target[key]
        target[last] = value
    return record


@pytest.mark.parametrize(
    ("changes", "names"),
    [
        ({"score__value": "0.95"}, "score.value"),
        ({"score__value": None}, "score.value"),
        ({"score__value": 95}, "outside the task's range"),
        ({"score__value": float("nan")}, "score.value"),
        ({"measurements__kv_ratio": "0.2"}, "measurements.kv_ratio"),
        ({"measurements__prefill_s": "fast"}, "measurements.prefill_s"),
        ({"method__params": "ratio=0.2"}, "method.params"),
        ({"samples": "oops"}, "samples"),
        ({"samples": [{"task": "t", "doc_id": "zero"}]}, "samples[0].doc_id"),
    ],
)
def test_a_record_failing_the_schema_is_skipped_naming_the_field(good, changes, names):
    """Each used to be mixed into the report ("0 skipped"); ``samples: "oops"`` lost the whole
    report (AttributeError)."""
    path = dump(good, bad("s02", **changes))
    report = load_report(good)
    assert list(report.runs["run_id"]) == ["full_run"]
    assert [(p, names in why) for p, why in report.skipped] == [(path, True)]


def test_the_ids_alone_are_not_a_record(good):
    dump(good, {"schema_version": 1, "run_id": "ids_only"})
    report = load_report(good)
    assert len(report.runs) == 1 and "model" in report.skipped[0][1]


@pytest.mark.parametrize("where", ["other_name", "old_sweep/full_run", "report/full_run"])
def test_a_copied_run_is_reported_once(good, where, capsys):
    """Copies used to give duplicate rows with the same run id and no warning."""
    shutil.copytree(good / "full_run", good / where)
    report = load_report(good)
    assert list(report.runs["run_id"]) == ["full_run"]
    assert report.runs["path"][0] == str(good / "full_run" / "record.json")
    if where == "other_name":  # another folder's name: not that folder's run
        assert "is not its folder's name" in report.skipped[0][1]
    else:
        assert [w for w in report.warnings if "recorded 2 times" in w and where in w]
    assert main([str(good), "--out", str(good.parent / "out")]) == 0
    assert "full_run" in capsys.readouterr().err


def test_a_fifo_named_record_json_does_not_hang_the_report(good):
    fifo = good / "stuck_run" / "record.json"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    done = []
    thread = threading.Thread(target=lambda: done.append(load_report(good)), daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert done, "the report blocked on a FIFO"
    assert len(done[0].runs) == 1
    assert [(p, "FIFO" in why) for p, why in done[0].skipped] == [(fifo, True)]


def test_out_that_is_a_file_is_one_line(good, capsys):
    """It used to end in a FileExistsError traceback."""
    afile = good.parent / "taken.txt"
    afile.write_text("mine")
    assert main([str(good), "--out", str(afile)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out" in err[0] and str(afile) in err[0]
    assert afile.read_text() == "mine"


@pytest.mark.parametrize("kind", ["folder", "device"])
def test_a_record_json_that_is_a_folder_or_a_device_is_named(good, kind):
    """A folder named record.json used to be read as <it>/record.json (a confusing "No such
    file"); a link to /dev/zero must not be read at all."""
    path = good / "odd_run" / "record.json"
    if kind == "folder":
        path.mkdir(parents=True)
    else:
        path.parent.mkdir()
        os.symlink("/dev/zero", path)
    report = load_report(good)
    expected = "a folder" if kind == "folder" else "a character device"
    assert len(report.runs) == 1
    assert [(p, f"not a regular file but {expected}" in why) for p, why in report.skipped] == [
        (path, True)
    ]
