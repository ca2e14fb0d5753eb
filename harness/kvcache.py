"""What kvbench decodes with: transformers' ``DynamicCache`` whose full-attention layers
append in place instead of concatenating, and (sdpa models) a decoding step's attention with
each KV group's query heads packed (:func:`decode_attention`).

transformers' ``DynamicLayer`` appends each step's key and value with ``torch.cat``, which
allocates a new tensor and copies the whole cache into it every step (on a CPU at 8k tokens,
the profile in BENCHMARKS.md's decode-scaling section). :class:`InPlaceLayer` keeps its keys
and values as prefix views of buffers with room for ``reserve`` more tokens, as transformers'
static cache layers do: a decoding step writes one row; only when the room runs out are the
buffers reallocated (and the kept tokens copied once).

Cache methods see ordinary tensors: ``layer.keys``/``layer.values`` are the views of the tokens
held. A method that stores smaller tensors (``layer.keys = kept``) hands ownership over:
the layer drops its buffers and, at the next append, copies the kept tokens into new ones with
room for ``reserve`` more. A method that writes inside the tensors it was given and stores a
prefix of them (``keys[:, :, :n]``, as H2O's decode eviction does) keeps the buffers.

Bytes: ``stored_nbytes()`` is what the layer holds (the used tokens, what the methods keep and
what ``kv_ratio`` is computed from); the spare room is allocated memory, counted by
:func:`harness.measure.allocated_kv_bytes` (every distinct storage the layer references) and
recorded as ``kv_allocated_bytes_*``.

Both change how the numbers are computed, not which: logits equal transformers' own
(DynamicCache, sdpa) within float32 rounding (tests/test_fast_paths.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from methods.cache.attention import attention_override


def _is_prefix(tensor: torch.Tensor | None, buffer: torch.Tensor | None) -> bool:
    """Whether ``tensor`` is ``buffer[:, :, :n]`` for some n (same memory, same layout)."""
    return (
        tensor is not None
        and buffer is not None
        and tensor.dim() == 4
        and tensor.data_ptr() == buffer.data_ptr()
        and tensor.stride() == buffer.stride()
        and tensor.shape[:2] == buffer.shape[:2]
        and tensor.shape[-1] == buffer.shape[-1]
        and tensor.shape[-2] <= buffer.shape[-2]
    )


class InPlaceLayer(DynamicLayer):
    """A ``DynamicLayer`` that appends into pre-allocated room (see the module docstring).

    ``reserve``: tokens of room left after each (re)allocation; the generation loop passes the
    tokens it may still append, so decoding never copies the cache. ``None`` (unknown) grows
    geometrically (room of half the tokens held): amortised O(1) copies per token.
    ``prompt``: the first allocation holds at least this many tokens (plus the room), so the
    chunks of a chunked prefill append without copying.
    """

    def __init__(
        self,
        reserve: int | None = None,
        prompt: int = 0,
        buffers: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        self.reserve = reserve
        self.prompt_tokens = prompt
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None
        super().__init__()
        self._given = buffers  # a captured decoding step's, written into if the prompt fits

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        given, self._given = self._given, None
        if given is not None and all(
            b.shape[:2] == s.shape[:2] and b.shape[-1] == s.shape[-1] and b.dtype == s.dtype
            for b, s in zip(given, (key_states, value_states), strict=True)
        ):
            self._key_buffer, self._value_buffer = given

    @property
    def keys(self) -> torch.Tensor | None:
        return self._keys

    @keys.setter
    def keys(self, tensor: torch.Tensor | None) -> None:
        self._keys = tensor
        if not _is_prefix(tensor, self._key_buffer):
            self._key_buffer = None  # a method stored its own tensor: the buffer is not used

    @property
    def values(self) -> torch.Tensor | None:
        return self._values

    @values.setter
    def values(self, tensor: torch.Tensor | None) -> None:
        self._values = tensor
        if not _is_prefix(tensor, self._value_buffer):
            self._value_buffer = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.get_seq_length()
        end = start + key_states.shape[-2]
        if self._key_buffer is None or self._value_buffer is None or end > self.capacity():
            self._reallocate(key_states, value_states, start, end)
        self._key_buffer[:, :, start:end].copy_(key_states)
        self._value_buffer[:, :, start:end].copy_(value_states)
        self.keys = self._key_buffer[:, :, :end]
        self.values = self._value_buffer[:, :, :end]
        return self.keys, self.values

    def capacity(self) -> int:
        """Tokens the buffers hold room for (0 without buffers)."""
        if self._key_buffer is None or self._value_buffer is None:
            return 0
        return min(self._key_buffer.shape[-2], self._value_buffer.shape[-2])

    def _reallocate(
        self, key_states: torch.Tensor, value_states: torch.Tensor, start: int, end: int
    ) -> None:
        room = self.reserve if self.reserve is not None else end // 2
        size, self.prompt_tokens = max(end, self.prompt_tokens) + room, 0
        buffers = []
        for held, new in ((self.keys, key_states), (self.values, value_states)):
            buffer = new.new_empty((*new.shape[:2], size, new.shape[-1]))
            if start:
                buffer[:, :, :start].copy_(held)
            buffers.append(buffer)
        self._key_buffer, self._value_buffer = buffers

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        super().reset()

    def stored_nbytes(self) -> int:
        """Bytes of the tokens held (the views), not of the spare room."""
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values) if t is not None)


def new_cache(
    model: nn.Module,
    reserve: int | None = None,
    prompt: int = 0,
    buffers: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None,
) -> DynamicCache:
    """A ``DynamicCache`` for ``model`` whose full-attention layers are :class:`InPlaceLayer`
    with ``reserve`` tokens of room (the tokens the caller may still append after the prompt)
    and, from the first chunk of a chunked prefill, room for its ``prompt`` tokens;
    sliding-window layers keep transformers' own (bounded by their window). ``buffers``:
    per layer, (keys, values) buffers to fill first where they have the room (a captured
    decoding step's, :mod:`harness.decode_graph`)."""
    cache = DynamicCache(config=model.config)
    given = buffers or [None] * len(cache.layers)
    cache.layers = [
        InPlaceLayer(reserve, prompt, kv) if type(layer) is DynamicLayer else layer
        for layer, kv in zip(cache.layers, given, strict=True)
    ]
    return cache


def _packed_decode_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention, except a decoding step's (one query, no mask): the query
    heads of each KV group packed against their KV head, as transformers itself packs them
    when a mask is given, instead of ``enable_gqa``."""
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads = key.shape[1]
    if q_len != 1 or attention_mask is not None or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    packed = query.view(batch, kv_heads, q_heads // kv_heads, head_dim)
    out = F.scaled_dot_product_attention(packed, key, value, scale=kwargs.get("scaling"))
    return out.reshape(batch, 1, q_heads, value.shape[-1]), None


@contextmanager
def decode_attention(model: nn.Module) -> Iterator[None]:
    """Inside the block, decoding steps of an sdpa model run :func:`_packed_decode_attention`
    (where a cache method has not installed its own attention); other models are unchanged.

    Why: with one query and no mask, transformers calls torch's sdpa with ``enable_gqa``,
    whose CPU kernel is several times slower than one read of the keys and values, and the
    gap grows with the context (BENCHMARKS.md, decode scaling); the packed call is the same
    kernel on the same numbers.
    """
    modules = [m for name, m in model.named_modules() if name.endswith("self_attn")]
    if getattr(model.config, "_attn_implementation", None) != "sdpa" or not modules:
        yield
        return
    with attention_override(modules, _packed_decode_attention):
        yield
