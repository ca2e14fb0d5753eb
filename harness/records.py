"""Run records: one folder per run under the results directory, written atomically.

Layout::

    results/<model>__<task>__<method>__<hash>/
        record.json    # the record below
        config.yaml    # the resolved config that produced it

The folder's name ends with a stable hash of the resolved config (``run.*`` bookkeeping
fields and Hydra's own settings excluded) and of the task's data (the content hash of the
data files it reads, ``TaskSpec.data_hash``), so the same config over the same data always
maps to the same folder, and the same config over other data (``$KVBENCH_DATA``) to another.
The folder appears only once the record is complete: it is written into a
staging folder and renamed into place (:func:`methods.storage.publish`), so a killed run
leaves nothing that looks finished, and two writers of one run finishing together both
succeed (the second keeps the first's record). A run is finished only when its
``record.json`` is a regular file that parses and passes the typed schema
(:mod:`harness.record_schema`: every field's type and range, the run id equal to the folder's
name) (:func:`is_finished`); anything else there (a truncated file, another schema, a score
that is not a number, a FIFO) is recomputed, and the report skips it naming the field.

What ``record.json`` holds: :mod:`harness.results` (which assembles it).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from harness import record_schema
from harness.dtypes import resolve_dtype
from methods.storage import open_regular, publish, remove_stale_staging, staging_folder

log = logging.getLogger("kvbench")

SCHEMA_VERSION = record_schema.SCHEMA_VERSION
RECORD_FILE = "record.json"
CONFIG_FILE = "config.yaml"
# run.* fields that change where or whether a run is written, not what it computes
BOOKKEEPING_FIELDS = ("results_dir", "overwrite", "report")
# model fields added after records existed: hashed only when set away from their default, so
# the runs made before them keep their ids (and resume)
MODEL_DEFAULTS = {
    "sdpa_backend": "auto",
    "device_map": None,
    "prefill_chunk": None,
    "decode_capture": "auto",
}


def config_hash(cfg: DictConfig | dict, data_hash: str | None = None) -> str:
    """Stable hash of the resolved config, bookkeeping fields excluded, and of the task's
    data (``data_hash``, when the task has offline data). ``model.dtype: auto`` is hashed as
    the dtype it resolves to (:func:`harness.dtypes.resolve_dtype`, a function of
    ``model.device`` alone), so ``auto`` and that dtype name the same run; the model fields
    of :data:`MODEL_DEFAULTS` are hashed only when they differ from their default."""
    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    data = {k: v for k, v in data.items() if k != "hydra"}
    run = {k: v for k, v in (data.get("run") or {}).items() if k not in BOOKKEEPING_FIELDS}
    data["run"] = run
    model = data.get("model")
    if isinstance(model, dict):
        model = {
            k: v for k, v in model.items() if k not in MODEL_DEFAULTS or v != MODEL_DEFAULTS[k]
        }
        if "dtype" in model:
            model["dtype"] = resolve_dtype(model["dtype"], model.get("device", "cpu"))
        data["model"] = model
    if data_hash is not None:
        data["data_hash"] = data_hash
    canonical = json.dumps(data, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def slug(text: str) -> str:
    """``text`` made safe for a file or folder name."""
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", str(text)).strip("-") or "x"


def run_id(cfg: DictConfig, data_hash: str | None = None) -> str:
    """``<model>__<task>__<method>__<hash>``: readable, and unique per config and data."""
    parts = [cfg.model.name, cfg.task.name, cfg.method.name]
    return "__".join(slug(p) for p in parts) + "__" + config_hash(cfg, data_hash)


def run_dir(cfg: DictConfig, data_hash: str | None = None) -> Path:
    return Path(cfg.run.results_dir) / run_id(cfg, data_hash)


def record_problem(folder: Path) -> str | None:
    """Why ``folder`` does not hold a finished record, or None if it does: ``record.json`` is a
    regular file, parses, and passes the schema (:func:`harness.record_schema.problem`) with
    the folder's name as its run id."""
    path = Path(folder) / RECORD_FILE
    if not path.exists():
        return "no record.json"
    try:
        record = read_record(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"unreadable: {_reason(exc)}"
    return record_schema.problem(record, Path(folder).name)


def load_record(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """``(record, None)`` for a valid record file at ``path`` (its folder's name is its run
    id), else ``(None, why)`` in one line naming the field that failed: the report's reader."""
    try:
        record = read_record(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"unreadable: {_reason(exc)}"
    problem = record_schema.problem(record, Path(path).parent.name)
    return (None, problem) if problem else (record, None)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{type(exc).__name__}: {exc}"


def is_finished(folder: Path, *, warn: bool = True) -> bool:
    """Whether ``folder`` holds a finished run (see :func:`record_problem`). A record.json that
    is there but not finished is named in a warning (it will be recomputed) when ``warn``."""
    problem = record_problem(folder)
    if problem is not None and warn and problem != "no record.json":
        log.warning(
            "%s is not a finished record (%s): the run is computed again",
            Path(folder) / RECORD_FILE,
            problem,
        )
    return problem is None


class RecordError(ValueError):
    """A record that fails the schema (:mod:`harness.record_schema`), or that cannot be
    written (a full disk, a path too long); the message names the field or the path."""


class ResultsDirError(ValueError):
    """``run.results_dir`` is not a folder kvbench can write records into."""


def check_writable(results_dir: Path | str) -> None:
    """Fail with one line naming ``run.results_dir`` unless a record can be written there
    (checked before any model loads: a run computed for minutes is otherwise lost at the end).
    The folder is created if missing."""
    if not str(results_dir).strip():  # Path("") is the cwd, and Hydra's log would go to /.hydra
        raise ResultsDirError(
            "run.results_dir is empty: pass a folder for the records, e.g. run.results_dir=results"
        )
    root = Path(results_dir)
    _check_length(results_dir)
    try:
        is_file = root.exists() and not root.is_dir()
    except OSError as exc:  # a name too long, a loop of links
        raise _not_usable(results_dir, exc) from None
    if is_file:
        raise ResultsDirError(
            f"run.results_dir={str(results_dir)!r} is a file, not a folder: pass a folder "
            "for the records, e.g. run.results_dir=results"
        )
    try:
        root.mkdir(parents=True, exist_ok=True)
        # as long a name as a run folder's staging name (or Hydra's .hydra/<time>-<pid>): a
        # path that only fits without it fails here, not after the run
        probe = Path(tempfile.mkdtemp(prefix=".write-check-" + "x" * PROBE_NAME, dir=root))
        probe.rmdir()
    except OSError as exc:
        raise _not_usable(results_dir, exc) from None


PROBE_NAME = 180  # characters: a run folder's name is about 60 to 120


def _check_length(results_dir: Path | str) -> None:
    """Refuse a path whose folder names or whole length leave no room for the run folders,
    before any folder of it is made."""
    path = os.path.abspath(os.fsencode(str(results_dir)))
    longest = max((len(part) for part in path.split(b"/")), default=0)
    if longest > NAME_MAX or len(path) + PROBE_NAME + 40 > PATH_MAX:
        what = (
            f"a folder name of {longest} bytes (at most {NAME_MAX})"
            if longest > NAME_MAX
            else f"{len(path)} bytes, and the run folders inside need about "
            f"{PROBE_NAME + 40} more (at most {PATH_MAX} in all)"
        )
        raise ResultsDirError(
            f"run.results_dir={_short(results_dir)} is too long: {what}; pass a shorter "
            "path, e.g. run.results_dir=results"
        )


NAME_MAX, PATH_MAX = 255, 4096  # Linux's limits (os.pathconf differs only on exotic mounts)


def _not_usable(results_dir: Path | str, exc: OSError) -> ResultsDirError:
    reason = exc.strerror or type(exc).__name__
    fix = "pass a shorter path" if exc.errno == errno.ENAMETOOLONG else "pass a writable folder"
    where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(results_dir) else ""
    if exc.errno == errno.ENAMETOOLONG:
        where = ""
    return ResultsDirError(
        f"run.results_dir={_short(results_dir)} cannot hold records: {reason}{where}; "
        f"{fix}, e.g. run.results_dir=results"
    )


def _short(path: Path | str) -> str:
    text = repr(str(path))
    return text if len(text) <= 200 else f"{text[:98]}...{text[-98:]}"


def write_record(folder: Path, record: dict[str, Any], cfg: DictConfig, overwrite: bool) -> Path:
    """Write ``record.json`` and ``config.yaml`` into ``folder`` atomically.

    The record must pass the schema as it will be read back (:class:`RecordError` naming the
    field otherwise). An existing finished run is replaced only with ``overwrite``; otherwise
    the record already there wins (another worker finished the same config first) and is
    kept. Folders and files get the user's umask. Staging folders of killed writers are
    cleared first. A write that fails (a full disk, a name too long) is one
    :class:`RecordError` naming the path, and leaves nothing behind.
    """
    text = json.dumps(record, indent=1, default=_json_default)
    problem = record_schema.problem(json.loads(text), folder.name)
    if problem is not None:
        raise RecordError(f"the record of {folder.name} fails its schema: {problem}")
    try:
        _publish_record(folder, text, cfg, overwrite)
    except OSError as exc:
        where = exc.filename or folder
        raise RecordError(
            f"cannot write the record {where}: {exc.strerror or exc}; "
            + _WRITE_FIXES.get(exc.errno, "check run.results_dir")
        ) from None
    return folder


_WRITE_FIXES = {
    errno.ENOSPC: "free space on that disk, or pass run.results_dir on another, and run again",
    errno.EDQUOT: "free space on that disk, or pass run.results_dir on another, and run again",
    errno.ENAMETOOLONG: "pass a shorter run.results_dir (the run folder's name is fixed)",
}


def _publish_record(folder: Path, text: str, cfg: DictConfig, overwrite: bool) -> None:
    remove_stale_staging(folder.parent, folder.name)
    staging = staging_folder(folder)
    try:
        with open(staging / RECORD_FILE, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        OmegaConf.save(cfg, staging / CONFIG_FILE, resolve=True)
        publish(
            staging,
            folder,
            complete=lambda path: is_finished(path, warn=False),
            replace=overwrite,
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_record(folder_or_file: Path) -> dict[str, Any]:
    """The parsed ``record.json`` of a run folder (or at a path). A path that is not a
    regular file (a FIFO, a device) raises :class:`methods.storage.NotRegularFileError`
    without blocking."""
    path = Path(folder_or_file)
    if path.name != RECORD_FILE and path.is_dir():
        path = path / RECORD_FILE
    with open_regular(path) as f:
        return json.load(f)


def find_records(root: Path) -> list[Path]:
    """Every finished record file under ``root`` (staging and trash folders excluded)."""
    return sorted(p for p in Path(root).rglob(RECORD_FILE) if not p.parent.name.startswith("."))


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, set | tuple):
        return list(value)
    return str(value)
