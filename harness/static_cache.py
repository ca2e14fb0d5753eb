"""A KV cache of fixed shapes for a captured decoding step (:mod:`harness.decode_graph`).

A captured step (a CUDA graph, or its CPU stand-in) replays the same kernels on the same
memory with the same arguments every time, so nothing it reads may change shape or live in
Python: each layer's keys and values sit in buffers of a fixed ``capacity`` and how many
tokens it holds is a tensor on the device (``length``). A step writes its token's key and
value at slot ``length``, attends to the slots that are held (a boolean mask computed on the
device: all of ``[0, length]`` for a full-attention layer, the last ``window`` of them for a
sliding-window layer, as transformers' ``DynamicSlidingWindowLayer`` keeps ``window - 1``
and attends with the new token), then adds one to ``length``.

The step is captured once per set of capacities and replayed for every request of that
shape: capacities are rounded up (:func:`capacity`: at most 1/8 more slots than needed, so
the masked slots a step reads cost at most 1/8 more of the cache's bandwidth) and the
buffers stay with the captured step between requests. A request's prefill writes straight
into them where they fit (:func:`harness.kvcache.new_cache` ``buffers``); what a cache method
stored elsewhere is copied in once, after the prefill.

Bytes held are what the dynamic cache would hold (``held(steps)`` tokens per layer), so the
measurements equal the uncaptured run's; ``allocated_nbytes`` is the buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from methods.cache.layers import is_sliding

MIN_CAPACITY_STEP = 256  # tokens: capacities are multiples of this at least


def capacity(tokens: int) -> int:
    """Slots for ``tokens``: rounded up to a multiple of max(256, 2**(bits - 4)), so fewer
    than max(256, tokens / 8) spare slots, and the same for the nearby lengths of requests."""
    step = max(MIN_CAPACITY_STEP, 1 << max(tokens.bit_length() - 4, 0))
    return -(-max(tokens, 1) // step) * step


@dataclass(frozen=True)
class LayerShape:
    """What a layer's buffers are: the key of a captured step, with the other layers'."""

    capacity: int
    window: int | None  # sliding-window layers: the tokens a query sees
    kv_heads: int
    key_dim: int
    value_dim: int
    dtype: torch.dtype

    @classmethod
    def after_prefill(cls, layer: DynamicLayer, reserve: int) -> LayerShape:
        """The shape for a dynamic cache ``layer`` after a prefill, with room for ``reserve``
        more tokens."""
        keys, values = layer.keys, layer.values
        window = layer.sliding_window if is_sliding(layer) else None
        return cls(
            capacity(keys.shape[-2] + reserve),
            window,
            keys.shape[1],
            keys.shape[-1],
            values.shape[-1],
            keys.dtype,
        )


class StaticLayer(DynamicLayer):
    """One layer's buffers, held length and attention mask (see the module docstring)."""

    def __init__(self, shape: LayerShape, device: torch.device) -> None:
        super().__init__()
        self.shape = shape
        self.is_sliding = shape.window is not None
        room = (1, shape.kv_heads, shape.capacity)
        # zeros: a masked slot weighs 0, which is only 0 for a finite value
        self.key_buffer = torch.zeros(*room, shape.key_dim, dtype=shape.dtype, device=device)
        self.value_buffer = torch.zeros(*room, shape.value_dim, dtype=shape.dtype, device=device)
        self.slots = torch.arange(shape.capacity, device=device)
        self.length = torch.zeros((), dtype=torch.long, device=device)
        self.mask: torch.Tensor | None = None
        self.loaded = 0  # tokens held after the prefill (host side, for the measurements)
        self.keys, self.values = self.key_buffer, self.value_buffer
        self.dtype, self.device, self.is_initialized = shape.dtype, device, True

    def load(self, layer: DynamicLayer) -> None:
        """Take what a dynamic cache ``layer`` holds after a prefill (nothing is copied when
        the prefill wrote into these buffers), then drop its tensors."""
        n = layer.keys.shape[-2]
        for held, buffer in ((layer.keys, self.key_buffer), (layer.values, self.value_buffer)):
            if held.data_ptr() != buffer.data_ptr() or held.stride() != buffer.stride():
                if held.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr():
                    held = held.clone()  # a method's view elsewhere in this buffer
                buffer[:, :, :n].copy_(held)
        layer.keys = layer.values = None
        self.length.fill_(n)
        self.loaded = n

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one token at slot ``length``; the buffers whole, with :attr:`mask` set."""
        index = self.length.view(1)
        self.key_buffer.index_copy_(2, index, key_states)
        self.value_buffer.index_copy_(2, index, value_states)
        end = self.length + 1
        visible = self.slots < end
        if self.shape.window is not None:
            visible = visible & (self.slots >= end - self.shape.window)
        self.mask = visible.view(1, 1, 1, -1)
        self.length.add_(1)
        return self.key_buffer, self.value_buffer

    def get_seq_length(self) -> int:
        return self.loaded

    def held(self, steps: int) -> int:
        """Tokens the dynamic layer would hold after ``steps`` decoding steps."""
        tokens = self.loaded + steps
        return tokens if self.shape.window is None else min(tokens, self.shape.window - 1)

    def nbytes(self, tokens: int) -> int:
        s = self.shape
        return tokens * s.kv_heads * (s.key_dim + s.value_dim) * self.key_buffer.element_size()


class StaticCache(DynamicCache):
    """A transformers ``Cache`` of :class:`StaticLayer` s (one per layer of ``shapes``)."""

    def __init__(self, model: nn.Module, shapes: tuple[LayerShape, ...]) -> None:
        super().__init__(config=model.config)
        device = next(model.parameters()).device
        self.layers = [StaticLayer(shape, device) for shape in shapes]

    def load(self, cache: DynamicCache) -> int:
        """Take a prefilled dynamic ``cache``'s tokens; returns its ``get_seq_length()``."""
        seen = cache.get_seq_length()
        for static, layer in zip(self.layers, cache.layers, strict=True):
            static.load(layer)
        return seen

    def stored_nbytes_after(self, steps: int) -> int:
        """Bytes the dynamic cache would hold after ``steps`` decoding steps."""
        return sum(layer.nbytes(layer.held(steps)) for layer in self.layers)

    def allocated_nbytes(self) -> int:
        return sum(layer.nbytes(layer.shape.capacity) for layer in self.layers)

    def buffers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(layer.key_buffer, layer.value_buffer) for layer in self.layers]


def static_attention(cache: StaticCache, cuda: bool):
    """The attention function of a captured step over ``cache``: one query against a layer's
    whole buffers under its mask, the query heads of a KV group packed against their KV head
    (as :func:`harness.kvcache._packed_decode_attention`). On CUDA, flash attention takes no
    mask: the memory-efficient kernel runs it (math as the last resort)."""
    backends = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

    def attend(module, query, key, value, attention_mask, scaling=None, **kwargs):
        mask = cache.layers[module.layer_idx].mask
        batch, q_heads, _, head_dim = query.shape
        packed = query.reshape(batch, key.shape[1], q_heads // key.shape[1], head_dim)
        if cuda:
            with sdpa_kernel(backends):
                out = F.scaled_dot_product_attention(packed, key, value, mask, scale=scaling)
        else:
            out = F.scaled_dot_product_attention(packed, key, value, mask, scale=scaling)
        return out.reshape(batch, 1, q_heads, value.shape[-1]), None

    return attend
