"""Run records: stable names, atomic writes, no accidental overwrite."""

from __future__ import annotations

import json

from omegaconf import OmegaConf

from harness import records


def cfg(tmp_path, **run):
    return OmegaConf.create(
        {
            "model": {"name": "m"},
            "method": {"name": "streamingllm", "ratio": 0.2},
            "task": {"name": "gsm8k", "limit": 2},
            "run": {"results_dir": str(tmp_path), "overwrite": False, "seed": 1, **run},
        }
    )


def test_hash_is_stable_and_ignores_bookkeeping(tmp_path):
    a = cfg(tmp_path)
    b = cfg(tmp_path / "elsewhere", overwrite=True, report=False)
    assert records.config_hash(a) == records.config_hash(b)
    c = cfg(tmp_path)
    c.method.ratio = 0.4
    assert records.config_hash(a) != records.config_hash(c)
    d = cfg(tmp_path, seed=2)
    assert records.config_hash(a) != records.config_hash(d)
    assert records.run_id(a).startswith("m__gsm8k__streamingllm__")


def test_write_is_atomic_and_never_overwrites_by_accident(tmp_path):
    c = cfg(tmp_path)
    folder = records.run_dir(c)
    assert not records.is_finished(folder)
    records.write_record(folder, {"value": 1}, c, overwrite=False)
    assert records.read_record(folder) == {"value": 1}
    assert (folder / records.CONFIG_FILE).is_file()
    records.write_record(folder, {"value": 2}, c, overwrite=False)
    assert records.read_record(folder) == {"value": 1}
    records.write_record(folder, {"value": 3}, c, overwrite=True)
    assert records.read_record(folder) == {"value": 3}
    # no staging or trash folders are left behind
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]
    assert records.find_records(tmp_path) == [folder / records.RECORD_FILE]


def test_unfinished_folder_is_not_a_record(tmp_path):
    c = cfg(tmp_path)
    folder = records.run_dir(c)
    folder.mkdir(parents=True)
    (folder / "partial.json").write_text("{")
    assert not records.is_finished(folder)
    records.write_record(folder, {"ok": True}, c, overwrite=False)
    assert json.loads((folder / records.RECORD_FILE).read_text()) == {"ok": True}
    assert not (folder / "partial.json").exists()
