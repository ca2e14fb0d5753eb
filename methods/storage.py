"""Where kvbench keeps what it computes once, and where it reads its offline data.

Shared by ``methods/`` (trained weights, training text) and ``harness/`` (dequantised models,
task data); it sits below both and imports neither, so the method layer works without the
runner.

* :func:`cache_root`: ``$KVBENCH_CACHE``, default ``~/.cache/kvbench``.
* :func:`data_dir`: ``$KVBENCH_DATA``, default the ``data/`` folder that ships with kvbench.
* :func:`conf_dir`: the Hydra configs (``conf/``).
* :func:`staging_folder` / :func:`publish`: the one way a folder (a run record, a dequantised
  model, trained weights) appears: assembled under a staging name, then renamed into place,
  safe under concurrent writers; :func:`remove_stale_staging` clears what killed writers left.

In a source checkout ``conf/`` and ``data/`` sit at the repository root; an installed wheel
carries them as ``harness/conf`` and ``harness/data`` (links to the root folders in the
checkout), beside this package in site-packages.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

CACHE_ENV = "KVBENCH_CACHE"
DATA_ENV = "KVBENCH_DATA"


class CacheDirError(ValueError):
    """``$KVBENCH_CACHE`` names a file, or a folder kvbench cannot write."""


def cache_root() -> Path:
    """The folder for dequantised models and trained weights (``$KVBENCH_CACHE``); a path
    that is a file (or lies below one), or a folder that cannot be written, raises
    :class:`CacheDirError` naming it."""
    root = Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "kvbench"))
    fix = f"set ${CACHE_ENV} to a writable folder (default ~/.cache/kvbench)"
    try:
        mode = root.stat().st_mode
    except FileNotFoundError:
        return root  # made when first needed
    except OSError as exc:  # a file on the way (NotADirectoryError), a name too long
        raise CacheDirError(
            f"${CACHE_ENV}={root} cannot be a folder ({exc.strerror}): {fix}"
        ) from None
    if not stat.S_ISDIR(mode):
        raise CacheDirError(f"${CACHE_ENV}={root} is {_file_kind(mode)}, not a folder: {fix}")
    if not os.access(root, os.W_OK | os.X_OK):
        raise CacheDirError(f"${CACHE_ENV}={root} is a folder kvbench cannot write: {fix}")
    return root


def _shipped(name: str) -> Path:
    """``<repo>/<name>`` in a checkout, ``<site-packages>/harness/<name>`` when installed."""
    root = Path(__file__).resolve().parents[1]
    for candidate in (root / name, root / "harness" / name):
        if candidate.is_dir():
            return candidate
    return root / name


def conf_dir() -> Path:
    """The Hydra config folder (``config.yaml`` and the groups model/, method/, task/, ...)."""
    return _shipped("conf")


def data_dir() -> Path:
    """The offline data folder: ``$KVBENCH_DATA`` or the one kvbench ships; never the cwd."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser().resolve()
    return _shipped("data")


def data_file(relative: str) -> Path:
    """The path of ``relative`` inside the data folder; FileNotFoundError if it is missing."""
    root = data_dir()
    if root.exists() and not root.is_dir():
        raise DataFileError(
            f"${DATA_ENV}={root} is {_file_kind(root.stat().st_mode)}, not a folder: set it to "
            "the folder that holds the benchmark data (see data/README.md), or unset it"
        )
    path = root / relative
    if path.exists() and not path.is_file():
        kind = _file_kind(path.stat().st_mode)
        raise NotRegularFileError(
            errno.EINVAL, f"not a regular file but {kind}: {_RESTORE}", str(path)
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"kvbench offline data file {path} is missing: copy the benchmark data into "
            f"{data_dir()} (see data/README.md), or set ${DATA_ENV} to the folder that holds "
            f"{relative}, or use task.source=hub to load lm-eval's stock task from the hub"
        )
    return path


class NotRegularFileError(OSError):
    """A path where a regular file is expected names a FIFO, a device, a socket or a folder."""

    def __str__(self) -> str:
        return f"{self.filename} is {self.strerror}"


class DataFileError(ValueError):
    """An offline data file is empty, cut short or malformed; the message names the line."""


def open_regular(path: Path | str, encoding: str = "utf-8") -> Any:
    """``path`` opened for reading as text, refused (:class:`NotRegularFileError`) unless it is
    a regular file. It is opened non-blocking and checked on the open descriptor, so a FIFO
    or a device named like a record or data file never blocks the reader."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(
                errno.EINVAL,
                f"not a regular file but {_file_kind(mode)}: replace or remove it",
                str(path),
            )
        os.set_blocking(fd, True)
        return os.fdopen(fd, encoding=encoding)
    except BaseException:
        os.close(fd)
        raise


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISREG, "a file"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"))
    kinds += ((stat.S_ISSOCK, "a socket"),)
    kinds += ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    return next((name for test, name in kinds if test(mode)), "a special file")


def read_jsonl(relative: str) -> list[dict[str, Any]]:
    """The records of a JSON-lines file in the data folder: one JSON object a line. An empty
    file, a line cut short or a line that is not an object raises :class:`DataFileError`
    naming the file and the line."""
    path = data_file(relative)
    rows = []
    try:
        with open_regular(path) as fh:
            for number, line in enumerate(fh, start=1):
                if line.strip():
                    rows.append(_jsonl_row(path, number, line))
    except UnicodeDecodeError as exc:
        raise DataFileError(f"{path} is not UTF-8 text ({exc.reason}): {_RESTORE}") from None
    if not rows:
        raise DataFileError(f"{path} holds no records (an empty file): {_RESTORE}")
    return rows


def read_json(relative: str) -> Any:
    """The JSON document of a file in the data folder; :class:`DataFileError` naming the file
    and the line when it is empty, cut short or malformed."""
    path = data_file(relative)
    try:
        with open_regular(path) as fh:
            text = fh.read()
    except UnicodeDecodeError as exc:
        raise DataFileError(f"{path} is not UTF-8 text ({exc.reason}): {_RESTORE}") from None
    if not text.strip():
        raise DataFileError(f"{path} is empty: {_RESTORE}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataFileError(
            f"{path} line {exc.lineno} is not valid JSON ({exc.msg}, column {exc.colno}; "
            f"a file cut short?): {_RESTORE}"
        ) from None


_RESTORE = "restore it from the benchmark data (see data/README.md) or set $KVBENCH_DATA"


def _jsonl_row(path: Path, number: int, line: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataFileError(
            f"{path} line {number} is not valid JSON ({exc.msg}, column {exc.colno}; a file "
            f"cut short?): {_RESTORE}"
        ) from None
    if not isinstance(row, dict):
        raise DataFileError(
            f"{path} line {number} is a {type(row).__name__}, not a JSON object: {_RESTORE}"
        )
    return row


# --- folders written whole: assembled under a staging name, then renamed into place ----------
STAGING_PREFIX = ".staging-"


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows (``os.umask`` sets it,
    which would race with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def staging_folder(target: Path) -> Path:
    """A new empty folder next to ``target`` to assemble it in, named
    ``.staging-<name>-<pid>-<random>`` (the pid lets :func:`remove_stale_staging` tell a dead
    writer's leftovers from a live one's). ``mkdtemp`` creates it 0700; it gets the permissions
    a plain ``mkdir`` would (the user's umask), so the published folder does too."""
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f"{STAGING_PREFIX}{target.name}-{os.getpid()}-"
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    folder.chmod(0o777 & ~current_umask())
    return folder


def publish(
    staging: Path, target: Path, *, complete: Callable[[Path], bool], replace: bool = False
) -> bool:
    """Rename ``staging`` to ``target`` atomically; True if ours is now in place.

    A complete ``target`` (``complete(target)``) already there is kept unless ``replace``; one
    completed by a concurrent writer while we worked is kept too (the loser of that race
    succeeds: same key, same content); an incomplete one is moved aside and replaced.
    ``staging`` is left for the caller to remove when it was not used.
    """
    if not replace and complete(target):
        return False
    moved_aside = False  # with replace: the target found first is replaced, later ones kept
    for _ in range(8):
        try:
            staging.rename(target)
            return True
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        if (moved_aside or not replace) and complete(target):
            return False  # a concurrent writer finished it while we worked: keep theirs
        trash = target.with_name(f".trash-{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            target.rename(trash)
        except FileNotFoundError:  # another writer moved it first
            pass
        else:
            shutil.rmtree(trash, ignore_errors=True)
        moved_aside = True
    raise OSError(f"{target} kept changing under concurrent writers; run again")


def remove_stale_staging(parent: Path, name: str) -> list[Path]:
    """Remove the ``.staging-<name>-<pid>-*`` folders in ``parent`` that writers killed
    mid-write left: those whose process is gone, or older than the process now holding that
    pid (the pid was reused). A live writer's folder is left alone. Returns what was removed."""
    removed = []
    for folder in Path(parent).glob(f"{STAGING_PREFIX}{name}-*"):
        match = re.fullmatch(r"(\d+)-[^-]+", folder.name[len(STAGING_PREFIX + name) + 1 :])
        if match and folder.is_dir() and older_than_process(folder, int(match.group(1))):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def older_than_process(path: Path, pid: int | None = None) -> bool:
    """Whether ``path`` was last changed before process ``pid`` (default: this one) started;
    True when no such process exists."""
    try:
        started = psutil.Process(pid).create_time()
    except psutil.Error:
        return True
    try:
        return path.stat().st_mtime < started
    except FileNotFoundError:
        return False
