"""Where kvbench keeps what it computes once, and where it reads its offline data.

Shared by ``methods/`` (trained weights, training text) and ``harness/`` (dequantised models,
task data); it sits below both and imports neither, so the method layer works without the
runner.

* :func:`cache_root`: ``$KVBENCH_CACHE``, default ``~/.cache/kvbench``.
* :func:`data_dir`: ``$KVBENCH_DATA``, default the ``data/`` folder that ships with kvbench.
* :func:`conf_dir`: the Hydra configs (``conf/``).

In a source checkout ``conf/`` and ``data/`` sit at the repository root; an installed wheel
carries them as ``harness/conf`` and ``harness/data`` (links to the root folders in the
checkout), beside this package in site-packages.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

CACHE_ENV = "KVBENCH_CACHE"
DATA_ENV = "KVBENCH_DATA"


def cache_root() -> Path:
    """The folder for dequantised models and trained weights (``$KVBENCH_CACHE``)."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "kvbench"))


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
    path = data_dir() / relative
    if not path.is_file():
        raise FileNotFoundError(
            f"kvbench offline data file {path} is missing: copy the benchmark data into "
            f"{data_dir()} (see data/README.md), or set ${DATA_ENV} to the folder that holds "
            f"{relative}, or use task.source=hub to load lm-eval's stock task from the hub"
        )
    return path


def read_jsonl(relative: str) -> list[dict[str, Any]]:
    """The records of a JSON-lines file in the data folder."""
    with data_file(relative).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
