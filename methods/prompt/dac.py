"""DAC (Zhao et al., ACL 2025): dynamic attention-aware prompt compression.

As the authors' ``compressor.py`` (method ``dynamic_attn_ppl``, additive fusion) does it:

1. one compressor forward pass over the n tokens gives, for tokens 1..n-1, the
   self-information ``I_t = -log p(x_t | x_<t)`` and the attention received ``A_t`` (summed
   over query rows, heads and layers; :mod:`methods.prompt.compressor`);
2. ``score = alpha * minmax(A) + (1 - alpha) * minmax(I)`` over tokens 1..n-1;
3. the best-scoring tokens are kept, token 0 always, in their original order;
4. steps 1-3 repeat ``T`` times on the compressed sequence (re-scored from scratch each
   time: entropy and attention shift once neighbours are gone), each step removing the
   per-step ratio ``r' = 1 - (1 - r)^(1/T)``.

Choices where the code is loose or silent (documented, exposed where useful):

- Step t keeps ``round(n * (1 - r)^(t/T))`` of the n original tokens: the authors'
  ``int((m - 1) * (1 - r'))`` per step compounds its rounding, this lands every step on
  the per-step ratio and the last exactly on ``round(n * (1 - r))``. The authors' loop
  also re-scores once more after the last step, unused; here T steps take T passes.
- ``iterations: null`` is the authors' default ``T = min(max(1, n // 100), 15)`` per chunk.
- Punctuation is not protected (the authors' ``preserve_punct`` defaults to False).
- Long inputs are compressed ``chunk_size`` tokens at a time (the authors' later code uses
  1024-token chunks cut at "." or newline), each chunk with its own token 0 and its own T.

``alpha = 0`` with ``iterations = 1`` is the self-information baseline (Selective-Context
style; ``conf/method/selfinfo.yaml``): it needs no attention, so no hooks are installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from methods.base import MethodConfigError
from methods.prompt.compressor import minmax
from methods.prompt.tokens import TokenDropMethod


@dataclass
class DAC(TokenDropMethod):
    """Iterative token deletion by fused attention received and self-information.

    Attributes (besides ``rate``, ``compressor``, ``chunk_size``):
        alpha: weight of attention against self-information, in [0, 1] (the paper: 0.8).
        iterations: T, compression steps (re-scoring after each); None: the authors'
            ``min(max(1, n // 100), 15)`` for a chunk of n tokens.
        query_chunk: query rows per attention block when recomputing attention (memory).
    """

    name: str = "dac"
    alpha: float = 0.8
    iterations: int | None = None
    query_chunk: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (0.0 <= float(self.alpha) <= 1.0):
            raise MethodConfigError(
                f"method.alpha={self.alpha!r} is outside [0, 1]: it weighs attention against "
                "self-information (the paper uses 0.8; 0 is self-information only)"
            )
        if self.iterations is not None and int(self.iterations) < 1:
            raise MethodConfigError(
                f"method.iterations={self.iterations!r}: T must be >= 1 compression steps, or "
                "null for the authors' min(max(1, n // 100), 15)"
            )
        if self.query_chunk < 1:
            raise MethodConfigError(f"method.query_chunk={self.query_chunk} must be >= 1")

    def uses_attention(self) -> bool:
        return self.alpha > 0

    def prepare(self, model: nn.Module, tokenizer: Any) -> None:
        super().prepare(model, tokenizer)
        self.scorer.query_chunk = self.query_chunk

    def steps(self, n: int) -> int:
        return int(self.iterations) if self.iterations else min(max(1, n // 100), 15)

    def select(self, ids: list[int]) -> list[int]:
        n = len(ids)
        if self.kept_count(n) >= n:
            return list(range(n))
        # bookkeeping of kept indices on the CPU; the compressor scores on its own device
        kept = torch.arange(n, device="cpu")
        steps = self.steps(n)
        tokens = torch.as_tensor(ids, device="cpu")
        for step in range(1, steps + 1):
            target = max(1, round(n * (1.0 - self.rate) ** (step / steps)))
            if target >= len(kept):
                continue
            score = self.score(tokens[kept].tolist())
            best = score[1:].topk(target - 1).indices.sort().values.cpu() + 1
            kept = kept[torch.cat([kept.new_zeros(1), best])]
        return kept.tolist()

    def score(self, ids: list[int]) -> torch.Tensor:
        """Fused scores of ids (m,): (m,) float32, entry 0 unused (token 0 is always kept)."""
        scores = self.scorer.score(ids, attention=self.alpha > 0)
        fused = (1.0 - self.alpha) * minmax(scores.self_info[1:])
        if scores.attention is not None:
            fused = fused + self.alpha * minmax(scores.attention[1:])
        return torch.cat([fused.new_full((1,), torch.inf), fused])
