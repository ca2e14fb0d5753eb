"""One ratio convention: every method kind takes ``ratio``, the fraction kept. Prompt
methods' old ``rate`` (fraction removed) warns and converts; both fail in one line; no config
or named sweep says ``rate``; the report reads an old record as the new one; a multirun over
prompt methods takes ``method.ratio``."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from harness import records
from harness.report.labels import run_label
from harness.report.ratios import normalise_params, prompt_kept
from harness.report.tables import run_row
from harness.run import CONF_DIR
from methods.base import MethodConfigError
from methods.prompt.dac import DAC
from methods.prompt.random_deletion import RandomDeletion
from tests.test_sweeps import ENV, TINY, kvbench


def test_rate_alone_warns_naming_ratio_and_converts() -> None:
    with pytest.warns(
        FutureWarning, match=r"method\.rate=0\.3 is deprecated: pass method\.ratio=0\.7"
    ):
        method = DAC(rate=0.3)
    assert method.ratio == 0.7 and method.rate is None
    assert method.params()["ratio"] == 0.7  # the record carries the new name
    assert DAC(ratio=0.7).step_sizes(460) == method.step_sizes(460)


def test_rate_and_ratio_together_fail_in_one_line_naming_both() -> None:
    with pytest.raises(MethodConfigError) as info:
        RandomDeletion(ratio=0.5, rate=0.5)
    message = str(info.value)
    assert "\n" not in message and "method.ratio" in message and "method.rate" in message


def test_ratio_keeps_what_the_old_rate_kept() -> None:
    with pytest.warns(FutureWarning):
        old = RandomDeletion(rate=0.3)
    new = RandomDeletion(ratio=0.7)
    assert [old.kept_count(n) for n in range(1, 200)] == [new.kept_count(n) for n in range(1, 200)]


def test_no_method_config_or_named_sweep_says_rate() -> None:
    for path in sorted((CONF_DIR / "method").glob("*.yaml")):
        assert "rate" not in (yaml.safe_load(path.read_text()) or {}), path.name
    for path in sorted((CONF_DIR / "sweep").glob("*.yaml")):
        assert "method.rate" not in path.read_text(), path.name


def _record(params: dict) -> dict:
    return {
        "run_id": "same",
        "model": {"name": "tiny"},
        "method": {"name": "dac", "kinds": ["prompt"], "params": params},
        "task": {"name": "gsm8k", "limit": 2},
        "config": {"task": {}},
        "measurements": {},
        "samples": [],
    }


def test_an_old_record_reads_as_a_new_one_of_the_same_setting() -> None:
    old = {"rate": 0.3, "alpha": 0.8, "compressor": None}
    new = {"ratio": 0.7, "rate": None, "alpha": 0.8, "compressor": None}
    assert (
        normalise_params(old)
        == normalise_params(new)
        == {"ratio": 0.7, "alpha": 0.8, "compressor": None}
    )
    assert prompt_kept(old) == prompt_kept(new) == 0.7
    composed = {"dac": old, "snapkv": {"ratio": 0.2, "window": 8}}
    assert prompt_kept(composed) == 0.7
    rows = [run_row(_record(p), "x") for p in (old, new)]
    assert rows[0]["params_json"] == rows[1]["params_json"]
    assert rows[0]["run_id"] == rows[1]["run_id"]  # the same run: one is a duplicate

    class Row:
        method = "dac"

    labels = []
    for row in rows:
        r = Row()
        r.__dict__.update({k: v for k, v in row.items() if k != "method"})
        labels.append(run_label(r))
    assert labels[0] == labels[1] == "dac kept=0.7"


def test_a_multirun_over_prompt_methods_takes_method_ratio(tmp_path: Path) -> None:
    """``kvbench -m method=random_deletion,selfinfo method.ratio=0.5``: the override reaches
    the prompt methods (the primary config's method is ``full``, which has a ratio too)."""
    tiny = [a for a in TINY if not a.startswith("task.num_fewshot")] + ["task.num_fewshot=2"]
    args = ["-m", *tiny, "method=random_deletion,selfinfo", "method.ratio=0.5"]
    done = subprocess.run(
        kvbench(*args, f"run.results_dir={tmp_path}", "run.report=false"),
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = [records.read_record(p) for p in records.find_records(tmp_path)]
    prompt = {
        r["method"]["name"]: r["method"]["params"] for r in found if r["method"]["name"] != "full"
    }
    assert sorted(prompt) == ["random_deletion", "selfinfo"]
    assert all(p["ratio"] == 0.5 and p["rate"] is None for p in prompt.values())
