"""Eviction by score: the base that eviction methods are a few lines on top of."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from methods.base import CacheMethod, MethodConfigError, check_ratio


@dataclass
class ScorerMethod(CacheMethod):
    """Keeps, per KV head, the ``kept_tokens`` highest-scoring tokens of the prompt.

    The first ``sinks`` tokens and the last ``window`` tokens are always kept. The budget
    is ``budget`` tokens when given, else ``round(ratio * prompt_length)``. The kept
    tokens are gathered into new, smaller tensors (B, H_kv, kept, D), in their original
    order; positions are unaffected (the LM adapter passes true positions when decoding).
    A subclass implements :meth:`score`; a chunked prefill scores at its last chunk, every
    prompt key in the cache (``hidden_states``: that chunk's queries, as in ``reduce_kv``).
    """

    chunked_prefill: ClassVar[bool] = True

    ratio: float | None = 0.2
    budget: int | None = None
    sinks: int = 0
    window: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.budget is None:
            check_ratio("ratio", self.ratio)
        elif self.budget < 1:
            raise MethodConfigError(
                f"method.budget={self.budget!r} must be a positive token count "
                "(or null, to use method.ratio)"
            )
        for name in ("sinks", "window"):
            if getattr(self, name) < 0:
                raise MethodConfigError(f"method.{name} must be >= 0, got {getattr(self, name)}")
        if self.budget is not None and self.sinks + self.window > self.budget:
            raise MethodConfigError(
                f"method.sinks + method.window = {self.sinks + self.window} exceed "
                f"method.budget={self.budget}: lower the window or raise the budget"
            )

    def requested_ratio(self) -> float | None:
        return float(self.ratio) if self.budget is None else None

    def min_kept_tokens(self) -> int:
        """The sinks and the window are always kept (at least one token)."""
        return max(1, self.sinks + self.window)

    def fewest_kept(self) -> int:
        """The fewest tokens a ratio's budget may give a prompt: the sinks (a short prompt's
        budget may be smaller than the recent window, which then shrinks)."""
        return max(1, self.sinks)

    def check_prompt_lengths(self, shortest: int, longest: int) -> None:
        if self.budget is not None:
            if self.budget >= longest:
                raise MethodConfigError(
                    f"method.budget={self.budget} keeps every token of these prompts (the "
                    f"longest has {longest}): {self.name} would have no effect; pass a "
                    f"budget below {longest}, or a method.ratio"
                )
            return
        if round(self.ratio * longest) >= longest:
            raise MethodConfigError(
                f"method.ratio={self.ratio} keeps every token of the prompts (the longest "
                f"has {longest} tokens; {self.ratio} x {longest} rounds to {longest}): "
                f"{self.name} would have no effect; pass method.ratio below "
                f"{(longest - 0.5) / longest:.4g}"
            )
        fewest = self.fewest_kept()
        if round(self.ratio * shortest) < fewest:
            raise MethodConfigError(
                f"method.ratio={self.ratio} keeps {round(self.ratio * shortest)} tokens of "
                f"a {shortest}-token prompt, below the {fewest} tokens "
                f"{self.name} always keeps ({self._floor_fields()}): pass method.ratio >= "
                f"{fewest / shortest:.3g}, or a method.budget of at least {fewest}"
            )

    def _floor_fields(self) -> str:
        return f"method.sinks={self.sinks}"

    def kept_tokens(self, seq_len: int) -> int:
        """How many of ``seq_len`` prompt tokens each head keeps."""
        if self.budget is not None:
            return min(self.budget, seq_len)
        return min(seq_len, max(1, round(self.ratio * seq_len)))

    def score(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        kwargs: dict,
    ) -> torch.Tensor:
        """Scores (B, H_kv, S): higher is kept. keys/values (B, H_kv, S, D)."""
        raise NotImplementedError

    def layer_budget(self, module: nn.Module, seq_len: int) -> int:
        """Tokens each KV head of ``module``'s layer keeps of a ``seq_len``-token prompt.
        Default: :meth:`kept_tokens`, the same in every layer (pyramids override it)."""
        return self.kept_tokens(seq_len)

    def recent_tokens(self, n_kept: int) -> int:
        """How many of the last tokens are always kept: ``window``, capped by the budget
        (with ``ratio``, a short prompt's budget may be smaller than the window)."""
        return min(self.window, max(0, n_kept - self.sinks))

    def reduce_kv(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        kwargs: dict,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        seq_len = keys.shape[-2]
        n_kept = self.layer_budget(module, seq_len)
        if n_kept >= seq_len:
            return keys, values
        scores = self.score(module, hidden_states, keys, values, kwargs)
        indices = top_indices(scores, n_kept, self.sinks, self.recent_tokens(n_kept))
        return gather_tokens(keys, indices), gather_tokens(values, indices)


def top_indices(scores: torch.Tensor, n_kept: int, sinks: int, recent: int) -> torch.Tensor:
    """The ``n_kept`` best of scores (B, H, S) per head, always including the first ``sinks``
    and the last ``recent`` tokens: indices (B, H, n_kept), in increasing order.

    Equal scores go to the lower index, on every device. ``topk`` leaves the order of equal
    scores to its kernel, and they are common: SnapKV's max-pooling copies a local maximum
    to its neighbours, so a run of equal scores often straddles the budget's cut, and the
    CPU and CUDA kernels kept different tokens of it (the logits then differ by a few 1e-2).
    A stable sort makes the choice the same everywhere (SpindleKV's ``keep_order`` too)."""
    scores = scores.float().clone()
    scores[..., :sinks] = torch.inf
    if recent:
        scores[..., -recent:] = torch.inf
    order = scores.argsort(dim=-1, descending=True, stable=True)
    return order[..., :n_kept].sort(dim=-1).values


def gather_tokens(states: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """states (B, H, S, D), indices (B, H, n) -> (B, H, n, D), a new contiguous tensor."""
    expanded = indices.unsqueeze(-1).expand(-1, -1, -1, states.shape[-1])
    return states.gather(2, expanded).contiguous()
