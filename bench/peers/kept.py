"""Which prompt positions a compressed KV cache kept: shared by both sides of a peer
comparison (torch only, so it runs in the project's and in a peer's environment)."""

from __future__ import annotations

import torch


def kept_positions(full_keys: torch.Tensor, kept_keys: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Match every kept key to the full cache's key it is a copy of.

    full_keys (H_kv, S, D) and kept_keys (H_kv, n, D) of one layer -> (positions (H_kv, n),
    sorted per head; the largest distance between a kept key and its match, 0.0 when every
    kept key is an exact copy). Implementation-agnostic: it reads what a cache stores, not
    how a method chose it.
    """
    full, kept = full_keys.float(), kept_keys.float()
    if not kept.numel():
        return torch.zeros(kept.shape[:2], dtype=torch.long), 0.0
    # the fast (matmul) distances find the match; the error is then measured exactly
    nearest = torch.cdist(kept, full).argmin(dim=-1)  # (H, n)
    matched = full.gather(1, nearest.unsqueeze(-1).expand(-1, -1, full.shape[-1]))
    error = float((matched - kept).norm(dim=-1).max())
    return nearest.sort(dim=-1).values, error
