"""Check a wheel folder for the GPU machine before it is carried there (bench/gpu/wheels.sh).

    python bench/gpu/check_wheels.py .whl

- every requirement of every wheel (its METADATA ``Requires-Dist``, markers evaluated for the
  machine: CPython 3.12 on Linux x86-64, no extras) is a package on the machine's image
  (bench/gpu/image_packages.txt) or a wheel in the folder: pip installs them there with
  ``--no-deps`` and nothing can be fetched, so a missing one would fail only on the machine;
- one version of each package (two stop the install);
- the folder fits in the device call with the working tree (``--limit-mb``, default 40 of the
  64 MiB a call carries: the working tree is about 13 MiB).

``--pins download|build`` (bench/gpu/wheels.sh): wheels.txt's names with the versions that
``requirements-cuda.txt`` pins for the machine's Python.

Exits 1 and lists the problems, else prints the folder's size and contents.

``--on-machine`` (bench/gpu/run.sh, there): the versions the image actually has, checked against
what the carried wheels ask of them (``pyarrow>=...``); mismatches are printed, not fatal (a
wheel may still work), so the log says where to look when an import fails.
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

HERE = Path(__file__).resolve().parent
MACHINE = {
    **default_environment(),
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "extra": "",
}


def image_packages(path: Path = HERE / "image_packages.txt") -> set[str]:
    lines = path.read_text().splitlines()
    return {canonicalize_name(n) for n in (line.split("#")[0].strip() for line in lines) if n}


def requirements(wheel: Path) -> list[Requirement]:
    """The wheel's requirements that apply on the machine."""
    with zipfile.ZipFile(wheel) as archive:
        meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        text = archive.read(meta).decode()
    found = []
    for line in text.splitlines():
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or req.marker.evaluate(MACHINE):
                found.append(req)
    return found


def problems(folder: Path, limit_mb: float) -> list[str]:
    wheels = sorted(folder.glob("*.whl"))
    names: dict[str, list[str]] = {}
    for wheel in wheels:
        name = canonicalize_name(parse_wheel_filename(wheel.name)[0])
        names.setdefault(name, []).append(wheel.name)
    found = [f"two versions of {n}: {', '.join(v)}" for n, v in names.items() if len(v) > 1]
    available = image_packages() | set(names)
    for wheel in wheels:
        for req in requirements(wheel):
            if canonicalize_name(req.name) not in available:
                found.append(f"{wheel.name} needs {req}, which is neither on the image nor here")
    size = sum(w.stat().st_size for w in wheels) / 2**20
    if size > limit_mb:
        found.append(f"the wheels take {size:.1f} MiB, over the {limit_mb:.0f} MiB allowed")
    if not wheels:
        found.append(f"no wheels in {folder}")
    return found


def on_machine(folder: Path) -> list[str]:
    """Requirements of the carried wheels that the installed (image) versions do not meet."""
    import importlib.metadata

    carried = {canonicalize_name(parse_wheel_filename(w.name)[0]) for w in folder.glob("*.whl")}
    lines = []
    for wheel in sorted(folder.glob("*.whl")):
        for req in requirements(wheel):
            if canonicalize_name(req.name) in carried or not req.specifier:
                continue
            try:
                version = importlib.metadata.version(req.name)
            except importlib.metadata.PackageNotFoundError:
                lines.append(f"{wheel.name}: {req} is not installed")
                continue
            if not req.specifier.contains(version, prereleases=True):
                lines.append(f"{wheel.name}: wants {req}, the image has {version}")
    return lines


def pinned(kind: str, lock: Path = HERE.parents[1] / "requirements-cuda.txt") -> list[str]:
    """wheels.txt's names of one kind (``download``: wheels on PyPI, ``build``: source only)
    as ``name==version``, the version the project's lock holds for the machine's Python."""
    sys.path.insert(0, str(HERE.parents[1]))
    from harness.lock import pins

    locked = pins(lock, MACHINE)
    found, missing = [], []
    for line in (HERE / "wheels.txt").read_text().splitlines():
        name, _, comment = (part.strip() for part in line.partition("#"))
        if name and (kind == "build") == (comment == "build"):
            key = canonicalize_name(name)
            (found if key in locked else missing).append(f"{name}=={locked.get(key)}")
    if missing:
        raise SystemExit(f"bench/gpu/wheels.txt names packages {lock} does not pin: {missing}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, nargs="?")
    parser.add_argument("--pins", choices=["download", "build"], help="print wheels.txt's pins")
    parser.add_argument("--limit-mb", type=float, default=40.0)
    parser.add_argument("--on-machine", action="store_true")
    args = parser.parse_args()
    if args.pins:
        print("\n".join(pinned(args.pins)))
        return
    if args.folder is None:
        parser.error("the wheel folder is required")
    if args.on_machine:
        lines = on_machine(args.folder)
        print("\n".join(lines) or "every carried wheel's requirement is met by the image")
        return
    found = problems(args.folder, args.limit_mb)
    if found:
        print("\n".join(found))
        sys.exit(1)
    wheels = sorted(args.folder.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"{len(wheels)} wheels, {size:.1f} MiB, every requirement on the image or carried:")
    print("\n".join(f"  {w.name}" for w in wheels))


if __name__ == "__main__":
    main()
