"""kvbench from Python, without the command line: the same configs, the same runs, the same records.

::

    from harness.api import apply, build, evaluate, load_model

    model, tokenizer = load_model("smollm2_135m")
    method = build("method", "snapkv", ratio=0.2)
    with apply(method, model, tokenizer) as session:
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
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

from harness import records
from harness.preflight import check_types
from harness.session import Session, apply
from methods.storage import conf_dir

CONF_DIR = conf_dir()  # the same folder as harness.run.CONF_DIR, without importing lm-eval

__all__ = ["CONF_DIR", "Session", "apply", "build", "compose_config", "evaluate", "load_model"]


def build(group: str, name: str, **fields: Any) -> Any:
    """``conf/<group>/<name>.yaml`` with ``fields`` overridden, instantiated: a
    :class:`~harness.models.ModelSpec`, a method or a :class:`~harness.taskspec.TaskSpec`
    (validated, nothing loaded yet)."""
    path = CONF_DIR / group / f"{name}.yaml"
    if not path.is_file():
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        raise ValueError(f"{group}={name!r} is not a config: use one of {', '.join(options)}")
    # composed as the CLI composes it, so an entry built on another (``defaults:``) resolves
    cfg = OmegaConf.merge(_compose([f"{group}={name}"])[group], fields)
    check_types(group, cfg)  # `ratio="abc"` is named as method.ratio
    return instantiate(cfg, _convert_="all")


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
    args = [f"model={model}", f"method={method}", f"task={task}"]
    for key, value in (overrides or {}).items():
        text = (
            json.dumps(value) if isinstance(value, list | dict | bool) or value is None else value
        )
        args.append(f"{key}={'null' if value is None else text}")
    return _compose(args)


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
    from harness.run import execute  # lm-eval loads here: build/load_model/apply need none of it

    folder = execute(compose_config(model, method, task, overrides))
    return records.read_record(folder)
