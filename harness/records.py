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
``record.json`` parses and carries this schema version and the folder's run id
(:func:`is_finished`); anything else there (a truncated file, another schema) is recomputed.

``record.json`` (schema version 1)::

    schema_version  1
    run_id          the folder name
    config          resolved config (model, method, task, run)
    model           {name, num_layers, num_kv_heads, head_dim, dtype (resolved: ``auto`` is
                    bfloat16 on CUDA, float32 on the CPU), dtype_requested, device,
                    attn_implementation, max_length}
    method          {name, kinds, params, describe, stats}: ``describe`` the static facts of
                    the applied method (``Method.describe``: KV-Latent's d_qk/d_vo, trained),
                    ``stats`` what it did, over the requests (``Method.last_stats``: tokens
                    held and kept per layer, compressed layers, ...)
    task            {name, lm_eval_tasks, limit, primary_metric, data_hash}
    metrics         lm-eval's results, per lm-eval task / group
    score           {metric, value}: the task's primary metric
    measurements    per-request values aggregated: {field: {n, mean, p50, p95, min, max, total}}
                    plus totals: kv_ratio (measured), kv_ratio_requested,
                    kv_ratio_reachable, decode_tok_per_s, prefill_tok_per_s
    samples         per-sample outputs with lm-eval's per-sample metrics and the request's
                    own measurements
    provenance      git commit, package versions, device, threads, seed, times, and
                    ``code``: hashes of the methods' and the harness's measuring source
"""

from __future__ import annotations

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

from harness.dtypes import resolve_dtype
from methods.storage import publish, remove_stale_staging, staging_folder

log = logging.getLogger("kvbench")

SCHEMA_VERSION = 1
RECORD_FILE = "record.json"
CONFIG_FILE = "config.yaml"
# run.* fields that change where or whether a run is written, not what it computes
BOOKKEEPING_FIELDS = ("results_dir", "overwrite", "report")


def config_hash(cfg: DictConfig | dict, data_hash: str | None = None) -> str:
    """Stable hash of the resolved config, bookkeeping fields excluded, and of the task's
    data (``data_hash``, when the task has offline data). ``model.dtype: auto`` is hashed as
    the dtype it resolves to (:func:`harness.dtypes.resolve_dtype`, a function of
    ``model.device`` alone), so ``auto`` and that dtype name the same run."""
    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    data = {k: v for k, v in data.items() if k != "hydra"}
    run = {k: v for k, v in (data.get("run") or {}).items() if k not in BOOKKEEPING_FIELDS}
    data["run"] = run
    model = data.get("model")
    if isinstance(model, dict) and "dtype" in model:
        dtype = resolve_dtype(model["dtype"], model.get("device", "cpu"))
        data["model"] = {**model, "dtype": dtype}
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
    """Why ``folder`` does not hold a finished record, or None if it does: ``record.json``
    parses as a JSON object carrying this schema version and the folder's name as run id."""
    path = Path(folder) / RECORD_FILE
    if not path.is_file():
        return "no record.json"
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"unreadable: {type(exc).__name__}: {exc}"
    if not isinstance(record, dict):
        return "not a JSON object"
    if record.get("schema_version") != SCHEMA_VERSION:
        return f"schema_version {record.get('schema_version')!r}, expected {SCHEMA_VERSION}"
    if record.get("run_id") != Path(folder).name:
        return f"run_id {record.get('run_id')!r} is not the folder's name"
    return None


def is_finished(folder: Path, *, warn: bool = True) -> bool:
    """Whether ``folder`` holds a finished run (see :func:`record_problem`). A record.json that
    is there but not finished is named in a warning (it will be recomputed) when ``warn``."""
    problem = record_problem(folder)
    if problem is not None and warn and (Path(folder) / RECORD_FILE).exists():
        log.warning(
            "%s is not a finished record (%s): the run is computed again",
            Path(folder) / RECORD_FILE,
            problem,
        )
    return problem is None


class ResultsDirError(ValueError):
    """``run.results_dir`` is not a folder kvbench can write records into."""


def check_writable(results_dir: Path | str) -> None:
    """Fail with one line naming ``run.results_dir`` unless a record can be written there
    (checked before any model loads: a run computed for minutes is otherwise lost at the end).
    The folder is created if missing."""
    root = Path(results_dir)
    if root.exists() and not root.is_dir():
        raise ResultsDirError(
            f"run.results_dir={str(results_dir)!r} is a file, not a folder: pass a folder "
            "for the records, e.g. run.results_dir=results"
        )
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = Path(tempfile.mkdtemp(prefix=".write-check-", dir=root))
        probe.rmdir()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(root) else ""
        raise ResultsDirError(
            f"run.results_dir={str(results_dir)!r} cannot hold records: {reason}{where}; "
            "pass a writable folder, e.g. run.results_dir=results"
        ) from None


def write_record(folder: Path, record: dict[str, Any], cfg: DictConfig, overwrite: bool) -> Path:
    """Write ``record.json`` and ``config.yaml`` into ``folder`` atomically.

    An existing finished run is replaced only with ``overwrite``; otherwise the record
    already there wins (another worker finished the same config first) and is kept. Folders
    and files get the user's umask. Staging folders of killed writers are cleared first.
    """
    remove_stale_staging(folder.parent, folder.name)
    staging = staging_folder(folder)
    try:
        with open(staging / RECORD_FILE, "w") as f:
            json.dump(record, f, indent=1, default=_json_default)
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
    return folder


def read_record(folder_or_file: Path) -> dict[str, Any]:
    path = Path(folder_or_file)
    if path.is_dir():
        path = path / RECORD_FILE
    with open(path) as f:
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
