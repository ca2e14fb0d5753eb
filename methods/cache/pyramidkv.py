"""PyramidKV (Cai et al., 2024): SnapKV scores with a pyramid of per-layer budgets."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from torch import nn

from methods.base import MethodConfigError
from methods.cache.budget import allocate, layer_rank, refuse_eager, require_ragged_ok
from methods.cache.snapkv import SnapKV


def pyramid_budgets(target: int, seq_len: int, window: int, layers: int, beta: float) -> list[int]:
    """Tokens kept per layer (window included), shallowest first, averaging ``target``.

    The formula of the PyramidKV release (also kvpress's): with ``k = target - window`` the
    mean number of non-window tokens kept, the deepest layer keeps ``min = k / beta`` and the
    shallowest ``max = 2k - min``, linearly in between (an arithmetic decrease whose mean is
    k). If ``max`` exceeds the ``seq_len - window`` non-window tokens, ``max`` is capped
    there and ``min = 2k - max``. Every layer adds the window.
    """
    window = min(window, target)
    prefix, k = seq_len - window, target - window
    low = k / beta
    high = 2 * k - low
    if high > prefix:
        high, low = prefix, 2 * k - prefix
    step = (high - low) / (layers - 1) if layers > 1 else 0.0
    shares = [high - rank * step for rank in range(layers)]
    return [n + window for n in allocate(shares, k * layers, prefix)]


@dataclass
class PyramidKV(SnapKV):
    """SnapKV's scores (observation window, pooling, GQA group average), with each layer's
    budget from :func:`pyramid_budgets`: more tokens in shallow layers, fewer in deep ones,
    the mean over the compressed layers equal to the target (``ratio`` or ``budget``).
    ``beta`` (20 in the paper) sets the steepness: the deepest layer keeps 1/beta of the
    mean. Sliding-window layers are not counted in the pyramid: left alone by default, with
    ``compress_sliding`` each keeps the target ratio of what it holds. Layers
    end up with different cache lengths, so eager attention is refused (see budget.py).
    """

    name: str = "pyramidkv"
    beta: float = 20.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta < 1:
            raise MethodConfigError(
                f"method.beta={self.beta} must be >= 1: the deepest layer keeps 1/beta of the "
                "mean budget (the paper uses 20)"
            )

    def validate_for(self, config: Any) -> None:
        require_ragged_ok(self.name, config)

    def validate_runtime(self, device: Any, dtype: Any, attn_implementation: str) -> None:
        refuse_eager(self.name, attn_implementation)

    @contextmanager
    def hooks(self, model: nn.Module) -> Iterator[None]:
        self.validate_for(model.config)
        with super().hooks(model):
            yield

    def layer_budget(self, module: nn.Module, seq_len: int) -> int:
        rank, layers = layer_rank(module)
        target = self.kept_tokens(seq_len)
        if layers == 1:  # one layer, or a sliding layer (compress_sliding): no pyramid
            return target
        return pyramid_budgets(target, seq_len, self.window + self.sinks, layers, self.beta)[rank]
