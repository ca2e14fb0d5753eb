"""Run records: stable names, atomic writes, no accidental overwrite; a record is finished
only when it parses and carries its schema version and run id; concurrent writers of one run
all succeed; folders get the user's umask."""

from __future__ import annotations

import json
import logging
import os
import re
import threading

import pytest
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


def record(folder, **values):
    """A minimal finished record of the run in ``folder``: every section the schema needs."""
    return {
        "schema_version": records.SCHEMA_VERSION,
        "run_id": folder.name,
        "model": {"name": "m"},
        "method": {"name": "streamingllm", "kinds": ["cache"], "params": {"ratio": 0.2}},
        "task": {"name": "gsm8k"},
        "score": {"metric": "exact_match,strict-match", "value": 0.5},
        "measurements": {"requests": 1, "kv_ratio": 0.2, "prefill_s": {"n": 1, "mean": 0.1}},
        "samples": [{"task": "gsm8k", "doc_id": 0, "metrics": {"exact_match": 0.5}}],
        **values,
    }


def test_write_is_atomic_and_never_overwrites_by_accident(tmp_path):
    c = cfg(tmp_path)
    folder = records.run_dir(c)
    assert not records.is_finished(folder)
    records.write_record(folder, record(folder, value=1), c, overwrite=False)
    assert records.read_record(folder)["value"] == 1
    assert (folder / records.CONFIG_FILE).is_file()
    records.write_record(folder, record(folder, value=2), c, overwrite=False)
    assert records.read_record(folder)["value"] == 1
    records.write_record(folder, record(folder, value=3), c, overwrite=True)
    assert records.read_record(folder)["value"] == 3
    # no staging or trash folders are left behind
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]
    assert records.find_records(tmp_path) == [folder / records.RECORD_FILE]


def test_unfinished_folder_is_not_a_record(tmp_path):
    c = cfg(tmp_path)
    folder = records.run_dir(c)
    folder.mkdir(parents=True)
    (folder / "partial.json").write_text("{")
    assert not records.is_finished(folder)
    records.write_record(folder, record(folder, ok=True), c, overwrite=False)
    assert json.loads((folder / records.RECORD_FILE).read_text())["ok"] is True
    assert not (folder / "partial.json").exists()


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('{"schema_version": 1, "run_id": "RUN", "score": {"val', "unreadable"),
        ("", "unreadable"),
        ('["not", "an", "object"]', "not a JSON object"),
        ('{"run_id": "RUN"}', "schema_version None"),
        ('{"schema_version": 99, "run_id": "RUN"}', "schema_version 99"),
        # the ids alone used to make a finished run, skipped for ever (the report disagreed)
        ('{"schema_version": 1, "run_id": "RUN"}', "model: missing"),
    ],
)
def test_a_record_that_does_not_parse_or_lacks_its_ids_is_not_finished(
    tmp_path, caplog, text, reason
):
    """A truncated record.json used to mark the run finished for ever (only the report
    warned): now it is recomputed, with a warning naming the file, and replaced."""
    c = cfg(tmp_path)
    folder = records.run_dir(c)
    folder.mkdir(parents=True)
    (folder / records.RECORD_FILE).write_text(text.replace("RUN", folder.name))
    with caplog.at_level(logging.WARNING, logger="kvbench"):
        assert not records.is_finished(folder)
    assert str(folder / records.RECORD_FILE) in caplog.text and reason in caplog.text
    records.write_record(folder, record(folder, value=1), c, overwrite=False)
    assert records.is_finished(folder)
    assert records.read_record(folder)["value"] == 1


def _set(data, dotted, value):
    *parents, last = dotted.split(".")
    for key in parents:
        data = data[int(key)] if isinstance(data, list) else data[key]
    key = int(last) if isinstance(data, list) else last
    if value is DELETE:
        del data[key]
    else:
        data[key] = value


DELETE = object()
# (field, bad value, what the one-line reason names): each used to be reported, or skipped
# as finished, as if it were fine
SCHEMA_CASES = [
    ("score.value", "0.95", "score.value"),
    ("score.value", None, "score.value"),
    ("score.value", 95, "outside the task's range"),
    ("score.value", float("nan"), "score.value"),
    ("score.value", float("inf"), "score.value"),
    ("score.value", -0.1, "outside the task's range"),
    ("score.value", True, "score.value"),
    ("score.value", DELETE, "score.value: missing"),
    ("score.metric", 3, "score.metric"),
    ("score", "high", "score"),
    ("run_id", 7, "run_id"),
    ("schema_version", "1", "schema_version"),
    ("model", DELETE, "model: missing"),
    ("model.name", None, "model.name"),
    ("model.num_layers", 0, "model.num_layers"),
    ("model.num_layers", "4", "model.num_layers"),
    ("method.name", ["x"], "method.name"),
    ("method.params", "ratio=0.2", "method.params"),
    ("method.kinds", "cache", "method.kinds"),
    ("task.name", DELETE, "task.name: missing"),
    ("task.limit", "5", "task.limit"),
    ("task.limit", 0, "task.limit"),
    ("measurements", "fast", "measurements"),
    ("measurements", DELETE, "measurements: missing"),
    ("measurements.kv_ratio", "0.2", "measurements.kv_ratio"),
    ("measurements.kv_ratio", -0.5, "measurements.kv_ratio"),
    ("measurements.requests", 1.5, "measurements.requests"),
    ("measurements.prefill_s", "0.1", "measurements.prefill_s"),
    ("measurements.prefill_s.mean", "0.1", "measurements.prefill_s"),
    ("measurements.prefill_s.n", -1, "measurements.prefill_s"),
    ("measurements.decode_tok_per_s", float("nan"), "measurements.decode_tok_per_s"),
    ("samples", "oops", "samples"),
    ("samples", DELETE, "samples: missing"),
    ("samples.0", "row", "samples[0]"),
    ("samples.0.doc_id", "0", "samples[0].doc_id"),
    ("samples.0.task", None, "samples[0].task"),
    ("samples.0.metrics", [1], "samples[0].metrics"),
    ("samples.0.requests", [{"prefill_s": "slow"}], "samples[0].requests[0].prefill_s"),
    ("config", "model=x", "config"),
    ("provenance", [], "provenance"),
]


@pytest.mark.parametrize(
    ("field", "value", "names"), SCHEMA_CASES, ids=[f"{c[0]}={c[1]!r}" for c in SCHEMA_CASES]
)
def test_a_record_that_fails_the_schema_is_not_finished_and_not_written(
    tmp_path, caplog, field, value, names
):
    c = cfg(tmp_path)
    folder = records.run_dir(c)
    bad = record(folder)
    _set(bad, field, value)
    folder.mkdir(parents=True)
    (folder / records.RECORD_FILE).write_text(json.dumps(bad))
    with caplog.at_level(logging.WARNING, logger="kvbench"):
        assert not records.is_finished(folder)
    assert names in caplog.text and "\n" not in caplog.text.strip()
    _, why = records.load_record(folder / records.RECORD_FILE)
    assert names in why
    with pytest.raises(records.RecordError, match=re.escape(names)):
        records.write_record(folder, bad, c, overwrite=True)


def test_a_record_copied_to_another_folder_is_not_that_folders_run(tmp_path):
    c = cfg(tmp_path)
    folder = records.run_dir(c)
    records.write_record(folder, record(folder), c, overwrite=False)
    copy = tmp_path / "copy_of_run"
    records.shutil.copytree(folder, copy)
    assert records.is_finished(folder) and not records.is_finished(copy, warn=False)
    assert "is not its folder's name" in records.record_problem(copy)


def test_a_declared_score_range_is_honoured(tmp_path):
    c = cfg(tmp_path)
    folder = records.run_dir(c)
    ok = record(folder, score={"metric": "perplexity,none", "value": 12.5})
    ok["task"]["score_range"] = [0, None]
    records.write_record(folder, ok, c, overwrite=False)
    assert records.is_finished(folder)


def test_a_fifo_named_record_json_never_blocks(tmp_path):
    """A FIFO named record.json used to hang the runner's check and the report."""
    folder = tmp_path / "m__gsm8k__full__0123456789ab"
    folder.mkdir()
    os.mkfifo(folder / records.RECORD_FILE)
    assert "not a regular file but a FIFO" in records.record_problem(folder)
    assert records.load_record(folder / records.RECORD_FILE)[0] is None
    with pytest.raises(OSError, match="FIFO"):
        records.read_record(folder)


def test_concurrent_writers_of_one_run_all_succeed(tmp_path):
    """Writers of one run finishing together: the losers of the race to the folder keep the
    winner's record and succeed (they used to raise OSError: Directory not empty)."""
    c = cfg(tmp_path)
    folder = records.run_dir(c)
    writers, trials = 4, 40
    for trial in range(trials):
        barrier = threading.Barrier(writers)
        errors = []

        def write(n, trial=trial, barrier=barrier, errors=errors):
            barrier.wait()
            try:
                records.write_record(folder, record(folder, trial=trial, writer=n), c, False)
            except Exception as exc:  # noqa: BLE001 - every failure is the finding
                errors.append(repr(exc))

        threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [], f"trial {trial}: {errors}"
        assert records.read_record(folder)["trial"] == trial
        assert [p.name for p in tmp_path.iterdir()] == [folder.name]
        records.shutil.rmtree(folder)


def test_a_loser_that_finds_a_finished_record_keeps_it(tmp_path, monkeypatch):
    """The race made deterministic: another writer publishes between our check and our rename."""
    c = cfg(tmp_path)
    folder = records.run_dir(c)
    real_rename = type(folder).rename

    def rival_first(self, target):
        if self.name.startswith(".staging-") and not folder.exists():
            other = tmp_path / "rival"
            other.mkdir()
            (other / records.RECORD_FILE).write_text(json.dumps(record(folder, by="rival")))
            real_rename(other, folder)
        return real_rename(self, target)

    monkeypatch.setattr(type(folder), "rename", rival_first)
    assert records.write_record(folder, record(folder, by="us"), c, overwrite=False) == folder
    assert records.read_record(folder)["by"] == "rival"
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]


def test_run_folders_get_the_users_umask(tmp_path):
    c = cfg(tmp_path)
    folder = records.run_dir(c)
    old = os.umask(0o022)
    try:
        records.write_record(folder, record(folder), c, overwrite=False)
    finally:
        os.umask(old)
    assert folder.stat().st_mode & 0o777 == 0o755
    assert (folder / records.RECORD_FILE).stat().st_mode & 0o777 == 0o644


def test_staging_folders_of_killed_writers_are_removed(tmp_path):
    c = cfg(tmp_path)
    folder = records.run_dir(c)
    dead = tmp_path / f".staging-{folder.name}-999999999-abcd1234"  # no such pid
    live = tmp_path / f".staging-{folder.name}-{os.getpid()}-abcd1234"  # a live writer
    dead.mkdir()
    live.mkdir()
    records.write_record(folder, record(folder), c, overwrite=False)
    assert not dead.exists() and live.exists()


def test_results_dir_that_is_a_file_or_unwritable_is_one_line_naming_it(tmp_path):
    afile = tmp_path / "results.txt"
    afile.write_text("x")
    for bad in (afile, afile / "sub", "/sys/kvbench-not-writable"):
        with pytest.raises(records.ResultsDirError) as excinfo:
            records.check_writable(bad)
        message = str(excinfo.value)
        assert "run.results_dir=" in message and str(bad) in message and "\n" not in message
    records.check_writable(tmp_path / "new" / "folder")
    assert (tmp_path / "new" / "folder").is_dir()


def test_the_run_id_covers_the_task_data(tmp_path):
    a = cfg(tmp_path)
    assert records.run_id(a, "data-one") != records.run_id(a, "data-two")
    assert records.run_id(a, None) == records.run_id(a)
    assert records.run_dir(a, "data-one").name == records.run_id(a, "data-one")


def test_method_code_hash_covers_the_class_its_bases_and_what_they_import():
    from harness.provenance import code_hashes, method_modules
    from methods.cache.pyramidkv import PyramidKV
    from methods.cache.snapkv import SnapKV

    modules = method_modules(PyramidKV())
    assert {
        "methods.cache.pyramidkv",
        "methods.cache.snapkv",  # its base
        "methods.cache.scorer",
        "methods.base",
        "methods.cache.budget",  # imported by pyramidkv
        "methods.cache.attention",  # imported by snapkv
    } <= modules
    hashes = code_hashes([PyramidKV(), SnapKV()])
    assert hashes["methods"]["pyramidkv"] != hashes["methods"]["snapkv"]
    assert hashes == code_hashes([PyramidKV(), SnapKV()])


def test_method_stats_over_requests_average_per_layer_and_keep_what_agrees():
    from harness.results import method_stats

    rows = [
        {"method_stats": {"compressed_layers": [0, 2], "tokens_kept": [10, None, 30]}},
        {"method_stats": {"compressed_layers": [0, 2], "tokens_kept": [20, None, 50]}},
        {"method_stats": None},
    ]
    assert method_stats(rows) == {"compressed_layers": [0, 2], "tokens_kept": [15, None, 40]}
    nested = [{"method_stats": {"snapkv": {"n": 1.0}}}, {"method_stats": {"snapkv": {"n": 3.0}}}]
    assert method_stats(nested) == {"snapkv": {"n": 2.0}}
    assert method_stats([]) is None


def test_model_fields_at_their_default_keep_the_run_ids_made_before_them() -> None:
    """``model.sdpa_backend: auto`` and ``model.device_map: null`` are not hashed: a run made
    before those fields existed keeps its id (and resumes); set otherwise, they are."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    from harness.run import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model=tiny_llama_gqa"])
    before = OmegaConf.to_container(cfg, resolve=True)
    for field in records.MODEL_DEFAULTS:
        before["model"].pop(field)
    assert records.config_hash(cfg) == records.config_hash(before)
    with open_dict(cfg):
        cfg.model.sdpa_backend = "math"
    assert records.config_hash(cfg) != records.config_hash(before)
