"""StreamingLLM (Xiao et al., 2024): attention sinks plus a recent window."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from methods.base import MethodConfigError
from methods.cache.scorer import ScorerMethod


@dataclass
class StreamingLLM(ScorerMethod):
    """Keeps the first ``sinks`` tokens and the most recent ones, up to the budget.

    The budget applies to the prompt at prefill; generated tokens are appended.
    """

    name: str = "streamingllm"
    sinks: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sinks < 1:
            raise MethodConfigError(
                "method.sinks must be >= 1 for StreamingLLM (the paper keeps 4 sink tokens)"
            )

    def fewest_kept(self) -> int:
        """The sinks and the recent window: a budget below them cannot be StreamingLLM's."""
        return self.min_kept_tokens()

    def _floor_fields(self) -> str:
        return f"method.sinks + method.window = {self.sinks} + {self.window}"

    def score(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        kwargs: dict,
    ) -> torch.Tensor:
        batch, heads, seq_len, _ = keys.shape
        recency = torch.arange(seq_len, device=keys.device, dtype=torch.float32)
        return recency.expand(batch, heads, seq_len)
