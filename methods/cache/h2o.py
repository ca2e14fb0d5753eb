"""H2O (Zhang et al., 2023): heavy hitters by accumulated attention, plus recent tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from methods.base import MethodConfigError, check_ratio
from methods.cache.attention import accumulated_attention
from methods.cache.scorer import ScorerMethod, gather_tokens, top_indices


@dataclass
class H2O(ScorerMethod):
    """Keeps the heavy hitters, the tokens with the largest accumulated attention (the sum
    over every query so far of the attention each key receives; per KV head, summed over
    the group's query heads under GQA), plus the most recent ``recent_ratio`` of the budget
    (the paper splits the budget evenly) and the first ``sinks`` tokens.

    The budget holds while decoding too: each new token adds its attention row to the
    accumulated scores, and while the cache is over budget the lowest-scoring token outside
    the recent window is evicted. The budget is ``budget`` tokens, or ``ratio`` of the
    tokens seen so far (prompt plus generated), so ``ratio: 1.0`` never evicts. The
    accumulated scores (B, H_kv, kept) float32 per layer are held by the method, not the
    cache, and reset at each prefill. The prompt's attention is computed ``chunk_size``
    queries at a time. Sliding-window layers are left to their own window.
    """

    name: str = "h2o"
    window: int = 0
    recent_ratio: float = 0.5
    chunk_size: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window:
            raise MethodConfigError(
                f"method.window={self.window} is not used by H2O: its recent window is a share "
                "of the budget, set method.recent_ratio (e.g. 0.5) and leave method.window=0"
            )
        if self.recent_ratio != 0:
            check_ratio("recent_ratio", self.recent_ratio)
        if self.chunk_size < 1:
            raise MethodConfigError(f"method.chunk_size={self.chunk_size} must be >= 1 queries")
        self._scores: dict[int, torch.Tensor] = {}  # layer -> accumulated scores (B, H_kv, n)
        self._seen: dict[int, int] = {}  # layer -> tokens seen (prompt + generated)

    def min_kept_tokens(self) -> int:
        """The sinks (its recent window is a share of the budget)."""
        return max(1, self.sinks)

    def recent_tokens(self, n_kept: int) -> int:
        return min(round(self.recent_ratio * n_kept), max(0, n_kept - self.sinks))

    def _keep(
        self, layer: int, scores: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Evict down to the budget of the tokens seen so far; scores (B, H_kv, n)."""
        n_kept = self.kept_tokens(self._seen[layer])
        if n_kept < keys.shape[-2]:
            idx = top_indices(scores, n_kept, self.sinks, self.recent_tokens(n_kept))
            scores, keys, values = (
                scores.gather(2, idx),
                *(gather_tokens(t, idx) for t in (keys, values)),
            )
        self._scores[layer] = scores
        return keys, values

    def compress(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        kwargs: dict,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        layer = module.layer_idx
        self._scores.pop(layer, None)
        if self.budget is None and self.ratio == 1.0:
            return keys, values
        self._seen[layer] = keys.shape[-2]
        scores = accumulated_attention(module, hidden_states, keys, kwargs, self.chunk_size)
        return self._keep(layer, scores, keys, values)

    def compress_decode(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        kwargs: dict,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        layer = module.layer_idx
        if layer not in self._scores:
            return keys, values
        new = hidden_states.shape[1]
        self._seen[layer] += new
        row = accumulated_attention(module, hidden_states, keys, kwargs, self.chunk_size)
        # a sliding-window layer drops its oldest tokens itself: the scores follow
        old = self._scores[layer][
            ..., max(0, self._scores[layer].shape[-1] + new - keys.shape[-2]) :
        ]
        scores = torch.nn.functional.pad(old, (0, new)) + row
        return self._keep(layer, scores, keys, values)
