"""H2O (Zhang et al., 2023): heavy hitters by accumulated attention, plus recent tokens."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from methods.base import MethodConfigError, attention_modules, check_ratio
from methods.cache import h2o_kernels
from methods.cache.attention import (
    accumulated_attention,
    attention_and_received,
    attention_override,
)
from methods.cache.layers import current_chunk
from methods.cache.scorer import ScorerMethod, gather_tokens, top_indices

log = logging.getLogger(__name__)
PREFILL_KERNELS = ("auto", "triton", "torch")


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
    cache, and reset at each prefill; a chunked prefill adds each chunk's attention to them
    and evicts at its last chunk, keeping what one pass keeps. Sliding-window layers are
    left to their own window (with ``compress_sliding``, their scores are recomputed from
    the layer's projections and their slots stay in position order: the window drops the
    first ones).

    The attention is computed once: while the method is applied, the layers it compresses
    run :func:`~methods.cache.attention.attention_and_received` instead of the model's
    attention function, which returns the layer's output and the attention each key
    received in one pass (the prompt's queries ``chunk_size`` at a time). A decoding step
    that evicts one token moves the new token into the evicted token's slot (per KV head),
    so the cache is not copied; slots are then no longer in position order (attention does
    not depend on it), and the method tracks each slot's position (``positions(layer)``).

    ``prefill_kernel`` picks how a prefill computes that pass: ``triton`` runs the two
    kernels of :mod:`~methods.cache.h2o_kernels` (a flash forward that writes each query's
    log-sum-exp, then the column sums blockwise: no attention matrix in memory), ``torch``
    the PyTorch path, ``auto`` the kernels on CUDA and the PyTorch path elsewhere. Where
    the kernels cannot take a call (no Triton, a dtype or head dim they lack, a padding
    mask) the PyTorch path runs instead, with one logged warning naming why (on CUDA or
    with ``triton``); :meth:`last_stats` records the path (``prefill_kernel``) and the
    reason (``prefill_fallback``). Both keep the same positions (tests/test_h2o_kernels.py).
    """

    acts_while_decoding: ClassVar[bool] = True  # changes the cache as it decodes

    name: str = "h2o"
    window: int = 0
    recent_ratio: float = 0.5
    chunk_size: int = 64
    prefill_kernel: str = "auto"

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
        self._positions: dict[int, torch.Tensor] = {}  # layer -> token index per slot
        self._seen: dict[int, int] = {}  # layer -> tokens seen (prompt + generated)
        self._received: dict[int, torch.Tensor] = {}  # layer -> last forward's attention
        if self.prefill_kernel not in PREFILL_KERNELS:
            raise MethodConfigError(
                f"method.prefill_kernel={self.prefill_kernel!r} is not one of "
                f"{', '.join(PREFILL_KERNELS)}"
            )
        self._kernel: dict[int, str] = {}  # layer -> the path its last prefill ran
        self._fallback: dict[int, str] = {}  # layer -> why its last prefill fell back
        self._warned: set[str] = set()

    def validate_runtime(self, device: Any, dtype: Any, attn_implementation: str) -> None:
        """``prefill_kernel: triton`` needs Triton, and CUDA (or the CPU interpreter)."""
        if self.prefill_kernel != "triton":
            return
        why = h2o_kernels.triton_missing()
        if why is None and torch.device(device).type != "cuda" and not h2o_kernels.interpreted():
            why = f"it runs on CUDA, not {device} (on the CPU only under TRITON_INTERPRET=1)"
        if why is not None:
            raise MethodConfigError(
                f"method.prefill_kernel=triton cannot run: {why}; set method.prefill_kernel=auto"
            )

    @contextmanager
    def hooks(self, model: nn.Module) -> Iterator[None]:
        with super().hooks(model):
            if self.budget is None and self.ratio == 1.0:  # never evicts: the model's attention
                yield
                return
            full = [m for m in attention_modules(model) if not getattr(m, "sliding_window", 0)]
            with attention_override(full, self._attend):
                yield

    def _attend(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        """The layer's attention; keeps what each key received for the hook that follows.
        A chunk of a chunked prefill (one request, no padding) comes with transformers' mask
        of its queries over the cache: the causal mask that both paths apply without one."""
        if current_chunk() is not None:
            attention_mask = None
        layer, scaling = module.layer_idx, module.scaling if scaling is None else scaling
        softcap = getattr(module, "attn_logit_softcapping", None)
        if query.shape[2] > 1 and self._use_kernel(layer, query, key, value, attention_mask):
            output, received = h2o_kernels.attention_and_received(
                query, key, value, scaling=scaling, softcap=softcap
            )
        else:
            output, received = attention_and_received(
                query,
                key,
                value,
                scaling=scaling,
                attention_mask=attention_mask,
                softcap=softcap,
                chunk_size=self.chunk_size,
            )
        self._received[layer] = received
        return output, None

    def _use_kernel(
        self,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
    ) -> bool:
        """Whether this prefill runs the Triton kernels; records the path taken and why it
        fell back, and logs each reason once (on CUDA, or when ``triton`` was asked for)."""
        self._fallback.pop(layer, None)
        if self.prefill_kernel == "torch":
            why = "prefill_kernel: torch"
        elif self.prefill_kernel == "auto" and query.device.type != "cuda":
            why = f"device {query.device.type} (prefill_kernel: auto runs them on CUDA)"
        else:
            why = h2o_kernels.unsupported(query, key, value, attention_mask)
        self._kernel[layer] = "torch" if why else "triton"
        if why is None:
            return True
        auto_on_cuda = self.prefill_kernel == "auto" and query.device.type == "cuda"
        if self.prefill_kernel == "triton" or auto_on_cuda:
            self._fallback[layer] = why
            if why not in self._warned:
                self._warned.add(why)
                log.warning("H2O's prefill runs the PyTorch path, not its Triton kernels: %s", why)
        return False

    def last_stats(self) -> dict[str, Any] | None:
        """The base per-layer stats plus the prefill's path (``prefill_kernel``: triton,
        torch, or both joined by ``+``) and, where it fell back from the kernels,
        ``prefill_fallback``: why."""
        stats = super().last_stats()
        if stats is None or not self._kernel:
            return stats
        stats = dict(stats, prefill_kernel="+".join(sorted(set(self._kernel.values()))))
        if self._fallback:
            stats["prefill_fallback"] = "; ".join(sorted(set(self._fallback.values())))
        return stats

    def _attention_received(
        self, module: nn.Module, hidden_states: torch.Tensor, keys: torch.Tensor, kwargs: dict
    ) -> torch.Tensor:
        """(B, H_kv, S) of this forward: from the attention pass, else recomputed."""
        received = self._received.pop(module.layer_idx, None)
        if received is not None and received.shape[-1] == keys.shape[-2]:
            return received
        return accumulated_attention(module, hidden_states, keys, kwargs, self.chunk_size)

    def positions(self, layer: int) -> torch.Tensor:
        """Token index (position in the sequence) held in each slot of ``layer``, (B, H_kv, n)."""
        return self._positions[layer]

    def min_kept_tokens(self) -> int:
        """The sinks (its recent window is a share of the budget)."""
        return max(1, self.sinks)

    def recent_tokens(self, n_kept: int) -> int:
        return min(round(self.recent_ratio * n_kept), max(0, n_kept - self.sinks))

    def _keep(
        self,
        layer: int,
        scores: torch.Tensor,
        positions: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Evict down to the budget of the tokens seen so far, the slots in position order;
        scores and positions (B, H_kv, n)."""
        n_kept = self.kept_tokens(self._seen[layer])
        if n_kept < keys.shape[-2]:
            idx = top_indices(scores, n_kept, self.sinks, self.recent_tokens(n_kept))
            scores, positions = scores.gather(2, idx), positions.gather(2, idx)
            keys, values = gather_tokens(keys, idx), gather_tokens(values, idx)
        self._scores[layer], self._positions[layer] = scores, positions
        return keys, values

    def last_chunk_tokens(self, config: Any) -> int:
        """With ``compress_sliding``, the model's sliding window: a sliding layer's scores are
        the attention its held tokens get from the queries among them (the prompt's last)."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        window = getattr(text, "sliding_window", None)
        return int(window) if self.compress_sliding and window else 1

    def observe_chunk(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        kwargs: dict,
    ) -> None:
        """A chunk of a chunked prefill: its queries' attention joins the held keys' scores
        (each query's softmax is whole: it sees every earlier key, in the cache)."""
        if self.budget is not None or self.ratio != 1.0:
            self._scores[module.layer_idx] = self._prefill_scores(
                module, hidden_states, keys, kwargs
            )

    def _prefill_scores(
        self, module: nn.Module, hidden_states: torch.Tensor, keys: torch.Tensor, kwargs: dict
    ) -> torch.Tensor:
        """(B, H_kv, S) attention each held key received over the prompt so far: this
        forward's queries, plus the earlier chunks' of a chunked prefill."""
        received = self._attention_received(module, hidden_states, keys, kwargs)
        chunk = current_chunk()
        if chunk is None or chunk.start == 0:
            return received
        return self._carried(module.layer_idx, received, hidden_states.shape[1])

    def _carried(self, layer: int, received: torch.Tensor, new: int) -> torch.Tensor:
        """``received`` (B, H_kv, held) from the last ``new`` queries, plus what the held keys
        had accumulated: they are the last ``held`` of the earlier keys and the ``new`` ones
        (a sliding-window layer drops its oldest tokens itself; the scores follow)."""
        carry = received.shape[-1] - new
        if carry > 0:
            received[..., :carry] += self._scores[layer][..., -carry:]
        return received

    def reduce_kv(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        kwargs: dict,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        layer = module.layer_idx
        if self.budget is None and self.ratio == 1.0:
            self._scores.pop(layer, None)
            return keys, values
        self._seen[layer] = keys.shape[-2]
        scores = self._prefill_scores(module, hidden_states, keys, kwargs)
        positions = torch.arange(keys.shape[-2], device=keys.device).expand_as(scores)
        return self._keep(layer, scores, positions, keys, values)

    def reduce_kv_decode(
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
        seen = self._seen[layer] = self._seen[layer] + new
        received = self._attention_received(module, hidden_states, keys, kwargs)
        dropped = max(0, self._scores[layer].shape[-1] + new - keys.shape[-2])
        scores = self._carried(layer, received, new)
        added = torch.arange(seen - new, seen, device=keys.device).expand(*scores.shape[:2], new)
        positions = torch.cat((self._positions[layer][..., dropped:], added), -1)
        held, n_kept = keys.shape[-2], self.kept_tokens(seen)
        if n_kept >= held:
            self._scores[layer], self._positions[layer] = scores, positions
            return keys, values
        # a sliding-window layer's slots stay in position order (it drops the first ones)
        if new == 1 and n_kept == held - 1 and not getattr(module, "sliding_window", None):
            return self._evict_one(layer, scores, positions, keys, values, seen, n_kept)
        order = positions.argsort(dim=-1)  # slots back in position order, for the plain path
        scores, positions = scores.gather(2, order), positions.gather(2, order)
        keys, values = gather_tokens(keys, order), gather_tokens(values, order)
        return self._keep(layer, scores, positions, keys, values)

    def _evict_one(
        self,
        layer: int,
        scores: torch.Tensor,
        positions: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        seen: int,
        n_kept: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The one-token eviction of a decoding step, in place: per KV head, the lowest score
        outside the sinks and the recent window (what :meth:`_keep` would drop: those are the
        first ``sinks`` and the last ``recent`` positions) is overwritten by the new token,
        held in the last slot, and the last slot is dropped."""
        recent = self.recent_tokens(n_kept)
        protected = positions >= seen - recent
        if self.sinks:
            protected |= positions < self.sinks
        slot = scores.masked_fill(protected, torch.inf).argmin(dim=-1, keepdim=True)
        for held in (scores, positions):
            held.scatter_(2, slot, held[..., -1:].clone())
        for states in (keys, values):
            at = slot.unsqueeze(-1).expand(-1, -1, -1, states.shape[-1])
            states.scatter_(2, at, states[:, :, -1:].clone())
        self._scores[layer], self._positions[layer] = scores[..., :-1], positions[..., :-1]
        return keys[:, :, :-1], values[:, :, :-1]
