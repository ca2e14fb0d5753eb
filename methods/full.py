"""The reference: no reduction at all."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from methods.base import CacheMethod, MethodConfigError


@dataclass
class FullCache(CacheMethod):
    """Keeps every key and value: the baseline every other method is compared with."""

    chunked_prefill: ClassVar[bool] = True
    name: str = "full"
    ratio: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ratio != 1.0:
            raise MethodConfigError(
                f"method.ratio={self.ratio!r} for the full cache: the full cache keeps "
                "everything (ratio 1.0); pick a reduction method, e.g. method=streamingllm"
            )

    def asks_reduction(self) -> bool:
        return False

    def params(self) -> dict[str, Any]:
        """``ratio`` only: ``compress_sliding`` means nothing for a cache kept whole."""
        return {"ratio": self.ratio}

    @contextmanager
    def hooks(self, model: nn.Module) -> Iterator[None]:
        yield  # no hooks: the model runs untouched
