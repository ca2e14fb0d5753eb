"""kvbench from Python, without the command line: the same configs, the same runs, the same records.

::

    from harness.api import open_session, build, evaluate, load_model

    model, tokenizer = load_model("smollm2_135m")
    method = build("method", "snapkv", ratio=0.2)
    with open_session(method, model, tokenizer) as session:
        out = session.generate(open("paper.txt").read() + "\\nSummary:", max_new_tokens=64)
    print(out.text, out.measurement.kv_bytes_prefill, out.measurement.prefill_s)

    record = evaluate(method="snapkv", task="gsm8k", overrides={"method.ratio": 0.2, "task.limit": 2})
    print(record["score"], record["measurements"]["kv_ratio"])

:func:`build` instantiates one entry of a config group (``conf/<group>/<name>.yaml``) with field
overrides, exactly as the CLI does; :func:`evaluate` composes the full config the CLI would (so it
shares the CLI's run folders, resume and records) and runs it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from harness import records
from harness.compressors import check_compressors
from harness.preflight import BAD_INPUT, check_types
from harness.session import Session, open_session
from methods.base import Method
from methods.storage import conf_dir

# the folder harness.run reads its configs from; this module imports neither the CLI nor lm-eval
CONF_DIR = conf_dir()

__all__ = [
    "CONF_DIR",
    "Session",
    "build",
    "open_session",
    "compose_config",
    "evaluate",
    "load_model",
]


def build(group: str, name: str, **fields: Any) -> Any:
    """``conf/<group>/<name>.yaml`` with ``fields`` overridden, instantiated: a
    :class:`~harness.models.ModelSpec`, a method or a :class:`~harness.taskspec.TaskSpec`
    (validated, nothing loaded yet)."""
    _check_entry(group, name)
    # composed as the CLI composes it, so an entry built on another (``defaults:``) resolves
    base = _compose([f"{group}={name}"])[group]
    unknown = sorted(set(fields) - set(base))
    if unknown:
        known = ", ".join(k for k in base if k != "_target_")
        raise ValueError(f"{group}.{unknown[0]} is not a field of {group}={name}: use {known}")
    cfg = OmegaConf.merge(base, fields)
    check_types(group, cfg)  # `ratio="abc"` is named as method.ratio
    try:
        built = instantiate(cfg, _convert_="all")
    except InstantiationException as exc:
        if isinstance(exc.__cause__, BAD_INPUT):
            raise exc.__cause__ from None  # the class's own one-line message
        raise
    if isinstance(built, Method):
        check_compressors(built)  # method.compressor: a model config open_session will load
    return built


GROUPS = ("model", "method", "task")


def _check_entry(group: Any, name: Any) -> None:
    """``conf/<group>/<name>.yaml`` exists, ``name`` a plain file stem (no path)."""
    if group not in GROUPS:
        raise ValueError(f"{group!r} is not a config group: use one of {', '.join(GROUPS)}")
    options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
    if not isinstance(name, str) or name not in options:
        raise ValueError(
            f"{group}={name!r} is not a config: use one of {', '.join(options)} "
            f"(the files in conf/{group}/)"
        )


def load_model(name: str = "smollm2_135m", **fields: Any) -> tuple[Any, Any]:
    """(model, tokenizer) of ``conf/model/<name>.yaml`` (e.g. ``device="cuda"``)."""
    return build("model", name, **fields).load()


def compose_config(
    model: str = "smollm2_135m",
    method: str = "full",
    task: str = "gsm8k",
    overrides: dict[str, Any] | None = None,
) -> Any:
    """The resolved config the CLI builds for ``kvbench model=.. method=.. task=.. k=v ...``."""
    for group, name in (("model", model), ("method", method), ("task", task)):
        _check_entry(group, name)
    if overrides is None:
        overrides = {}
    if not isinstance(overrides, Mapping):
        raise TypeError(
            f"overrides must be a mapping of dotted fields to values, e.g. "
            f'{{"task.limit": 1}}, not a {type(overrides).__name__} ({overrides!r:.60}): '
            "the command line's key=value strings are for kvbench, not for Python"
        )
    args = [f"model={model}", f"method={method}", f"task={task}"]
    for key, value in overrides.items():
        if not isinstance(key, str) or not re.fullmatch(r"[+~]{0,2}[A-Za-z_][\w.@/-]*", key):
            raise TypeError(f"overrides: key {key!r} is not a dotted field name like 'task.limit'")
        args.append(f"{key}={_override_value(key, value)}")
    return _compose(args)


def _override_value(key: str, value: Any) -> str:
    """``value`` in Hydra's override grammar, as the Python value it is: a string is quoted
    (``"/x,y"`` is a path, not a sweep over two values; ``"0.2"`` stays a string, which the
    field's check then names), lists and mappings as JSON, None as null."""
    if value is None:
        return "null"
    if isinstance(value, str):
        escaped = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)
        escaped = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, escaped)
        return f"'{escaped}'"
    if isinstance(value, bool | list | tuple | dict):
        try:
            return json.dumps(value)
        except TypeError as exc:
            raise TypeError(f"overrides[{key!r}]: {exc}") from None
    if isinstance(value, int | float):
        return str(value)
    raise TypeError(
        f"overrides[{key!r}]={value!r:.60} is a {type(value).__name__}: pass a string, a "
        "number, a bool, None, a list or a dict"
    )


def _compose(overrides: list[str]) -> Any:
    """``conf/config.yaml`` composed with ``overrides`` (inside a running Hydra app too)."""
    if GlobalHydra.instance().is_initialized():
        return compose(config_name="config", overrides=overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def evaluate(
    model: str = "smollm2_135m",
    method: str = "full",
    task: str = "gsm8k",
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run one (model, method, task) as ``kvbench`` would and return its record (a finished
    run with the same config is read back, not recomputed, unless ``run.overwrite``).
    ``overrides`` are dotted config fields, e.g. ``{"method.ratio": 0.2, "task.limit": 5,
    "run.results_dir": "results"}``."""
    from harness.job import (
        execute,  # lm-eval loads here: build/load_model/open_session need none of it
    )

    folder = execute(compose_config(model, method, task, overrides))
    return records.read_record(folder)
