"""What every bench script needs: a config group entry built as kvbench builds it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]


def load(group: str, name: str, **overrides: Any) -> Any:
    """``conf/<group>/<name>.yaml`` with ``overrides``, instantiated (a ModelSpec, a method,
    a TaskSpec) without Hydra's composition: one object, nothing loaded yet."""
    cfg = OmegaConf.merge(OmegaConf.load(REPO / "conf" / group / f"{name}.yaml"), overrides)
    return instantiate(cfg, _convert_="all")
