"""Key-norm eviction (Devoto et al., 2024, "A simple and effective L2 norm-based strategy for
KV cache compression"): keys with a small L2 norm draw the most attention, so they are kept."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from methods.cache.scorer import ScorerMethod


@dataclass
class KeyNorm(ScorerMethod):
    """Keeps, per KV head, the prompt tokens whose keys have the smallest L2 norm. Needs no
    attention weights (works with any attention implementation); the norm is the same
    before and after RoPE (a rotation), so the cached keys are scored as they are."""

    name: str = "knorm"

    def score(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        kwargs: dict,
    ) -> torch.Tensor:
        return -torch.linalg.vector_norm(keys, dim=-1, dtype=torch.float32)
