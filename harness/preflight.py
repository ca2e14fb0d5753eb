"""What kvbench checks before a model loads, so that bad input costs seconds, not a run.

Each config group's classes validate their own values (``__post_init__``); this module adds
what they cannot see: the type of every value against the field's annotation (Hydra passes
``method.ratio=abc`` through as a string), the ``run.*`` fields, and whether the model's
window leaves room for the prompt once the task's generation is reserved. Every failure is
one line that names the field and the fix (:data:`BAD_INPUT` lists the exception classes).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from hydra.utils import get_class
from omegaconf import DictConfig, ListConfig, OmegaConf

from harness.model_cache import ModelCacheError
from harness.models import ModelConfigError
from harness.records import RecordError, ResultsDirError
from harness.taskspec import TaskConfigError
from methods.base import CacheMethod, Method, MethodConfigError
from methods.storage import CacheDirError, DataFileError, NotRegularFileError

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's, for a task that sets no max_gen_toks


def generation_limit(task_limit: int | None, cap: int | None) -> int:
    """The most tokens a request generates: the task's own ``max_gen_toks`` (lm-eval's 256
    when it sets none), capped by ``run.max_gen_toks`` (``cap``; None: no cap)."""
    limit = DEFAULT_MAX_GEN_TOKS if task_limit is None else int(task_limit)
    return limit if cap is None else min(limit, int(cap))


class ConfigError(ValueError):
    """A config value is not what kvbench expects; the message names the field and the fix."""


BAD_INPUT = (
    ConfigError,
    ModelConfigError,
    TaskConfigError,
    MethodConfigError,
    ResultsDirError,
    RecordError,  # a record that fails its schema, or a full disk / too long a path
    DataFileError,  # an offline data file empty, cut short or malformed (names the line)
    NotRegularFileError,  # a FIFO or device where a record or data file is expected
    CacheDirError,  # $KVBENCH_CACHE a file, or not writable
    ModelCacheError,  # a model cache that cannot be written (a full disk)
)

# run.* fields: (annotation, lowest allowed value or None)
RUN_FIELDS: dict[str, tuple[Any, int | None]] = {
    "results_dir": (str, None),
    "overwrite": (bool, None),
    "report": (bool, None),
    "seed": (int, None),
    "max_gen_toks": (int | None, 1),
    "bootstrap_iters": (int, 0),
    "add_bos_token": (bool | None, None),
}


def check_types(group: str, section: DictConfig | Mapping[str, Any]) -> None:
    """Fail unless every value of a config group entry fits its field's annotation (the
    dataclass named by ``_target_``); entries of a list of methods are checked in turn."""
    for key, annotation, value, default in _fields(group, section):
        if not _accepts(annotation, value):
            fix = f"pass {_describe(annotation)}"
            if default is not None and _accepts(annotation, default):
                fix += f", e.g. {key}={_yaml(default)} (the default)"
            raise ConfigError(f"{key}={_yaml(value)} is not {_describe(annotation)}: {fix}")


def check_run(run: DictConfig | Mapping[str, Any]) -> None:
    """The ``run.*`` fields kvbench reads: types and ranges."""
    for name, (annotation, lowest) in RUN_FIELDS.items():
        if name not in run:
            continue
        value = run[name]
        if not _accepts(annotation, value):
            raise ConfigError(
                f"run.{name}={_yaml(value)} is not {_describe(annotation)}: "
                f"pass {_describe(annotation)}"
            )
        if lowest is not None and value is not None and value < lowest:
            raise ConfigError(
                f"run.{name}={value} must be >= {lowest}"
                + (": or null, for each task's own limit" if name == "max_gen_toks" else "")
            )


def generation_limits(task_manager: Any, names: Sequence[str], cap: int | None) -> dict[str, int]:
    """The most tokens each generating lm-eval task among ``names`` may generate: its own
    ``max_gen_toks`` (from lm-eval's loaded task config) capped by ``run.max_gen_toks``.
    The tasks are built (their data read) once more than the run needs; lm-eval's per-task
    log lines are held back for that extra build."""
    quiet = logging.getLogger("lm_eval")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        if hasattr(task_manager, "load"):  # lm-eval >= 0.4.10
            tasks = list(task_manager.load(list(names))["tasks"].values())
        else:
            tasks = list(_leaf_tasks(task_manager.load_task_or_group(list(names))))
    finally:
        quiet.setLevel(level)
    limits = {}
    for task in tasks:
        config = task.config
        if config.output_type != "generate_until":
            continue
        kwargs = dict(config.generation_kwargs or {})
        own = next(
            (kwargs[k] for k in ("max_gen_toks", "max_new_tokens", "max_tokens") if k in kwargs),
            None,
        )
        limits[config.task] = generation_limit(own, cap)
    return limits


def check_window(
    window: int, limits: Mapping[str, int], cap: int | None, max_length: int | None
) -> None:
    """Fail unless the model's ``window`` (``model.max_length`` capped by the model's own)
    exceeds what every generating task may generate, so that a prompt still fits."""
    if not limits:
        return
    task, most = max(limits.items(), key=lambda item: item[1])
    if window > most:
        return
    where = (
        f"model.max_length={max_length}"
        if max_length is not None and max_length <= window
        else f"the model's own window of {window} tokens (model.max_length={_yaml(max_length)})"
    )
    raise ConfigError(
        f"{where} leaves no room for the prompt: {task} generates up to {most} tokens "
        f"(its own limit, or lm-eval's {DEFAULT_MAX_GEN_TOKS}, capped by "
        f"run.max_gen_toks={_yaml(cap)}): raise model.max_length above {most}, or lower "
        f"run.max_gen_toks below {window} (e.g. run.max_gen_toks={max(1, window // 2)})"
    )


def check_prompt_lengths(method: Method, lengths: Sequence[int]) -> None:
    """Refuse a cache method that the prompts' lengths (tokens reaching the model) cannot
    honour (:meth:`methods.base.CacheMethod.check_prompt_lengths`): one that would keep every
    token (no effect: refused after the run otherwise), or fewer than it always keeps. Called
    with the model's window before the weights load, and with the task's prompts before the
    first request."""
    lengths = [n for n in lengths if n > 0]
    if not lengths:
        return
    for m in method.flatten():
        if isinstance(m, CacheMethod) and m.asks_reduction():
            m.check_prompt_lengths(min(lengths), max(lengths))


# --- annotations --------------------------------------------------------------------------
def _fields(group: str, section: Any) -> Iterator[tuple[str, Any, Any, Any]]:
    """(dotted key, annotation, value, default) of every checkable field of ``section``."""
    target = section.get("_target_") if isinstance(section, Mapping | DictConfig) else None
    if not target:
        return
    try:
        cls = get_class(str(target))
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - an unimportable target is reported by build()
        return
    if not dataclasses.is_dataclass(cls):
        return
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, value in section.items():
        if name == "_target_" or name not in fields or name not in hints:
            continue
        key = f"{group}.{name}"
        if isinstance(value, ListConfig | list) and any(_is_target(v) for v in value):
            for i, entry in enumerate(value):
                yield from _fields(f"{key}[{i}]", entry)
            continue
        default = fields[name].default
        yield key, hints[name], _plain(value), None if default is dataclasses.MISSING else default


def _is_target(value: Any) -> bool:
    return isinstance(value, DictConfig | dict) and "_target_" in value


def _plain(value: Any) -> Any:
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _accepts(annotation: Any, value: Any) -> bool:
    """Whether ``value`` (a plain YAML value) fits ``annotation``; anything not a plain type
    (a class, ``Any``) is left to the class's own validation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(arg, value) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str | int | float) and not isinstance(value, bool)
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if annotation is list or origin in (list, tuple, Sequence):
        args = typing.get_args(annotation) if origin in (list, Sequence) else ()
        return isinstance(value, list | tuple) and all(_accepts(args[0], v) for v in value if args)
    if annotation is dict or origin in (dict, Mapping):
        return isinstance(value, dict)
    return True


def _describe(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        parts = [_describe(a) for a in typing.get_args(annotation) if a is not type(None)]
        nullable = type(None) in typing.get_args(annotation)
        return " or ".join(parts) + (" (or null)" if nullable else "")
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if annotation in names:
        return names[annotation]
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(annotation)))
    if annotation is list or origin in (list, tuple, Sequence):
        args = typing.get_args(annotation) if origin in (list, Sequence) else ()
        if args and args[0] in (int, float, str):
            return "a list of " + {int: "integers", float: "numbers", str: "strings"}[args[0]]
        return "a list"
    if annotation is dict or origin in (dict, Mapping):
        return "a mapping"
    return str(annotation)


def _yaml(value: Any) -> str:
    """``value`` as it is written on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str) and re.fullmatch(r"\s*([-+.\d]|true|false|null).*", value):
        return f"'{value}' (a string)"  # "0.2" from Python: not the number it looks like
    if isinstance(value, list):
        return "[" + ",".join(_yaml(v) for v in value) + "]"
    return str(value)


def _leaf_tasks(task_dict: Mapping[str, Any]) -> Iterator[Any]:
    for value in task_dict.values():
        if isinstance(value, Mapping):
            yield from _leaf_tasks(value)
        elif hasattr(value, "config"):
            yield value
