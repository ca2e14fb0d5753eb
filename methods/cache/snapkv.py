"""SnapKV (Li et al., 2024): the prompt's last queries vote for the keys worth keeping."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from methods.base import MethodConfigError
from methods.cache.attention import pool, window_attention
from methods.cache.scorer import ScorerMethod

POOLINGS = ("max", "avg", "none")


@dataclass
class SnapKV(ScorerMethod):
    """Scores each prompt key by the attention the last ``window`` queries (the observation
    window) pay it, after a softmax over all keys, summed over the window's queries and
    smoothed along the tokens by a 1-D pooling (``pooling`` ``max`` or ``avg``, kernel
    ``kernel_size``: the defaults of the authors' release are window 32, max-pool, kernel 7).
    GQA: the scores of a group's query heads are averaged, and each KV head keeps its own
    top tokens. The window is always kept; the budget (``ratio`` or ``budget``) counts it.
    Sliding-window layers (Gemma-3's local layers) are left to their own window.
    """

    name: str = "snapkv"
    window: int = 32
    kernel_size: int = 7
    pooling: str = "max"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 1:
            raise MethodConfigError(
                f"method.window={self.window} must be >= 1: the observation window's queries "
                "score the keys (the authors use 32)"
            )
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise MethodConfigError(
                f"method.kernel_size={self.kernel_size} must be an odd number >= 1 (a same-length "
                "pooling; 1 disables it), e.g. method.kernel_size=7"
            )
        if self.pooling not in POOLINGS:
            raise MethodConfigError(
                f"method.pooling={self.pooling!r} is unknown: use one of {', '.join(POOLINGS)}"
            )

    def last_chunk_tokens(self, config: Any) -> int:
        """The observation window: a chunked prefill's last chunk holds all its queries."""
        return self.window

    def window_scores(
        self, module: nn.Module, hidden_states: torch.Tensor, keys: torch.Tensor, kwargs: dict
    ) -> torch.Tensor:
        """Per query head: the window's attention summed over its queries, (B, H_kv, G, S)."""
        window = min(self.window, keys.shape[-2])
        return window_attention(module, hidden_states, keys, kwargs, window).sum(dim=-2)

    def score(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        kwargs: dict,
    ) -> torch.Tensor:
        scores = self.window_scores(module, hidden_states, keys, kwargs)
        prefix = keys.shape[-2] - min(self.window, keys.shape[-2])
        scores[..., :prefix] = pool(scores[..., :prefix], self.kernel_size, self.pooling)
        return scores.mean(dim=2)
