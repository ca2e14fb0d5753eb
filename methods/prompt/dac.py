"""DAC (Zhao et al., ACL 2025): dynamic attention-aware prompt compression.

As the authors' ``compressor.py`` (QQQ-yi/DAC, ``PromptCompressor.compress`` with
``method="dynamic_attn_ppl"``, additive fusion) does it:

1. one compressor forward pass over the m tokens gives, for tokens 1..m-1, the
   self-information ``I_t = -log p(x_t | x_<t)`` and the attention received ``A_t`` (summed
   over query rows, heads and layers; :mod:`methods.prompt.compressor`);
2. ``score = alpha * minmax(A) + (1 - alpha) * minmax(I)`` over tokens 1..m-1;
3. the best-scoring tokens are kept, token 0 always, in their original order;
4. steps 1-3 repeat ``T`` times on the compressed sequence, re-scored from scratch each time
   (entropy and attention shift once neighbours are gone).

Which choice is whose:

- **The paper's:** the fused score and ``alpha = 0.8``; iterative re-scoring; the per-step
  ratio ``r' = 1 - (1 - r)^(1/T)`` for a total removal ratio ``r``.
- **The authors' code's** (the defaults here): step t keeps ``1 + int((m - 1) * (1 - r'))``
  of the m tokens left (``schedule: authors``; at least one token besides token 0), so the
  floors compound and the final count falls a little below ``n (1 - r)``;
  ``T = min(max(1, n // 100), 15)`` (``iterations: null``); no chunking (the whole input in
  one pass); punctuation not protected (their ``preserve_punct`` defaults to False);
  ``alpha = 0`` with ``T = 1`` is their ``method="ppl"`` (here ``conf/method/selfinfo.yaml``).
- **Ours:** ``schedule: exact_rate``, an option, keeps ``round(n (1 - r)^(t/T))`` of the n
  original tokens after step t (every step on the per-step ratio, the last exactly on
  ``n (1 - r)``); T steps take T passes (the authors' loop makes one more pass after the
  last step, and one before the first, whose results it does not use); a step that would
  remove nothing is skipped; an input longer than the compressor's window (or than
  ``chunk_size``) is cut into chunks at line or sentence ends, each compressed as a whole
  input with its own T (recorded as ``compressor_chunks`` in :meth:`last_stats`); the
  attention column sums are recomputed blockwise from sdpa's inputs
  (:mod:`methods.prompt.received`) instead of materialising eager attention for every
  layer and head; same sums to float32 rounding.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from methods.base import MethodConfigError
from methods.prompt.compressor import minmax
from methods.prompt.tokens import TokenDropMethod

SCHEDULES = ("authors", "exact_rate")


@dataclass
class DAC(TokenDropMethod):
    """Iterative token deletion by fused attention received and self-information.

    Attributes (besides ``ratio``, ``compressor``, ``chunk_size``):
        alpha: weight of attention against self-information, in [0, 1] (the paper: 0.8).
        iterations: T, compression steps (re-scoring after each); None: the authors'
            ``min(max(1, n // 100), 15)`` for an input (or chunk) of n tokens.
        schedule: how many tokens each step keeps: ``authors`` (their code:
            ``1 + int((m - 1) * (1 - r'))`` of the m left) or ``exact_rate``
            (``round(n * (1 - r)^(t/T))`` of the n original ones).
        query_chunk: query rows per attention block when recomputing attention (memory).
    """

    name: str = "dac"
    alpha: float = 0.8
    iterations: int | None = None
    schedule: str = "authors"
    query_chunk: int = 128

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
        if self.schedule not in SCHEDULES:
            raise MethodConfigError(
                f"method.schedule={self.schedule!r} is unknown: use authors (their code's "
                "per-step counts) or exact_rate"
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

    def step_sizes(self, n: int) -> list[int]:
        """Tokens kept after each of the T steps, for an input of n tokens."""
        steps = self.steps(n)
        if self.schedule == "exact_rate":
            return [max(1, round(n * self.ratio ** (t / steps))) for t in range(1, 1 + steps)]
        per_step = 1 - self.ratio ** (1.0 / steps)  # the authors' `real_ratio`
        sizes, m = [], n
        for _ in range(steps):
            if m > 1:  # their direct_compress_attn: k = max(1, int(total * (1 - ratio)))
                m = 1 + max(1, int((m - 1) * (1 - per_step)))
            sizes.append(m)
        return sizes

    def select(self, ids: list[int]) -> list[int]:
        steps = list(self.iterate(ids))
        return steps[-1] if steps else list(range(len(ids)))

    def iterate(self, ids: list[int]) -> Iterator[list[int]]:
        """The kept indices into ids (n,) after each step that removes tokens, in order."""
        n = len(ids)
        if self.ratio == 1 or n < 2:
            return
        # bookkeeping of kept indices on the CPU; the compressor scores on its own device
        kept, tokens = torch.arange(n, device="cpu"), torch.as_tensor(ids, device="cpu")
        for target in self.step_sizes(n):
            if target >= len(kept):
                continue
            score = self.importance(tokens[kept].tolist())
            best = score[1:].topk(target - 1).indices.sort().values.cpu() + 1
            kept = kept[torch.cat([kept.new_zeros(1), best])]
            yield kept.tolist()

    def importance(self, ids: list[int]) -> torch.Tensor:
        """Fused scores of ids (m,): (m,) float32, entry 0 unused (token 0 is always kept)."""
        scores = self.scorer.token_scores(ids, attention=self.alpha > 0)
        fused = (1.0 - self.alpha) * minmax(scores.self_info[1:])
        if scores.attention is not None:
            fused = fused + self.alpha * minmax(scores.attention[1:])
        return torch.cat([fused.new_full((1,), torch.inf), fused])
