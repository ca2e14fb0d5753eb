"""Where cache methods meet a transformers model: the attention modules they hook, the KV
cache those are called with, sliding-window layers, and a log of what a method kept per layer.

**A sliding-window cache layer after eviction** (``compress_sliding: true``).

transformers' ``DynamicSlidingWindowLayer`` sizes the attention mask from the number of
tokens it has *seen* (``cumulative_length``), assuming it holds the last ``window - 1`` of
them. Once a cache method has evicted some of those, it holds fewer, and a mask sized that
way no longer matches the keys. This layer sizes the mask from what it holds: the kept
tokens are presented to the mask as the most recent ones (all inside the window), which is
what attention over the kept tokens means. It still drops its oldest tokens beyond
``window - 1`` while decoding, as the window does.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers.cache_utils import DynamicSlidingWindowLayer

from methods.errors import MethodConfigError

_BYPASSED: ContextVar[bool] = ContextVar("kvbench_cache_methods_bypassed", default=False)


@contextmanager
def cache_methods_bypassed() -> Iterator[None]:
    """Forward passes inside the block are not requests: the hooks of applied cache methods
    leave them alone. A prompt method's compressor may be the benchmarked model itself, with
    a cache method applied to it for the requests; its scoring passes must see the model as
    it is (and may run without a KV cache, which a cache method otherwise refuses)."""
    token = _BYPASSED.set(True)
    try:
        yield
    finally:
        _BYPASSED.reset(token)


def bypassed() -> bool:
    """Whether the current forward pass runs inside :func:`cache_methods_bypassed`."""
    return _BYPASSED.get()


@dataclass(frozen=True)
class PrefillChunk:
    """One forward pass of a chunked prefill: the prompt's tokens ``start`` onwards (the
    earlier ones are in the cache, uncompressed), and whether it is the ``last`` chunk."""

    start: int
    last: bool


_CHUNK: ContextVar[PrefillChunk | None] = ContextVar("kvbench_prefill_chunk", default=None)


@contextmanager
def prefill_chunk(start: int, last: bool) -> Iterator[None]:
    """The forward pass inside the block is a chunk of a prefill (set by the caller that
    splits the prompt). Cache methods compress once, at the ``last`` chunk, over every
    prompt token then in the cache, and keep what an unchunked prefill keeps: before it they
    only :meth:`~methods.base.CacheMethod.observe_chunk`. Outside such a block a forward
    pass whose queries are all the layer holds is a whole prefill, any other a decoding step."""
    token = _CHUNK.set(PrefillChunk(start, last))
    try:
        yield
    finally:
        _CHUNK.reset(token)


def current_chunk() -> PrefillChunk | None:
    """The chunk of a chunked prefill the current forward pass is, or None (not chunked)."""
    return _CHUNK.get()


def forward_phase(layer: Any, q_len: int) -> str:
    """What a forward pass of ``q_len`` queries is to a cache ``layer``: ``chunk`` (a chunk of
    a chunked prefill before its last), ``prefill`` (a whole prefill, or a chunked one's last
    chunk: the method compresses) or ``decode``."""
    chunk = _CHUNK.get()
    if chunk is not None:
        return "prefill" if chunk.last else "chunk"
    return "prefill" if layer.get_seq_length() == q_len and q_len > 1 else "decode"


def cache_of(kwargs: dict) -> Any:
    """The KV cache (a transformers ``Cache``) an attention module was called with, or None:
    transformers >= 5.24 passes it as ``cache``, earlier versions as ``past_key_values``."""
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


def cache_kwarg(model: nn.Module, cache: Any) -> dict[str, Any]:
    """``model(**cache_kwarg(model, cache), ...)`` passes the KV cache under the name the
    installed transformers takes: ``cache`` since 5.24 (``past_key_values`` still works there
    but warns, FutureWarning, and goes in 5.40), ``past_key_values`` before."""
    return {_cache_name(type(model)): cache}


@functools.cache
def _cache_name(model_class: type) -> str:
    try:
        parameters = inspect.signature(model_class.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of a decoder, in layer order (those with ``layer_idx``)."""
    found = [
        m
        for name, m in model.named_modules()
        if name.endswith("self_attn") and hasattr(m, "layer_idx")
    ]
    if not found:
        raise MethodConfigError(
            f"{type(model).__name__} has no `*.self_attn` modules with a `layer_idx`: "
            "kvbench's cache methods support decoder-only transformers models"
        )
    return sorted(found, key=lambda m: m.layer_idx)


def query_length_of(arg: Any) -> int:
    """The query length a cache layer's ``get_mask_sizes`` is given: transformers < 5.24
    passes the query's ``cache_position`` (a tensor), later versions its length."""
    return int(arg.shape[0]) if hasattr(arg, "shape") else int(arg)


class EvictedSlidingWindowLayer(DynamicSlidingWindowLayer):
    """A ``DynamicSlidingWindowLayer`` whose mask covers exactly the tokens it holds."""

    def get_mask_sizes(self, query_length: Any) -> tuple[int, int]:
        held = self.keys.shape[-2] if self.is_initialized and self.keys is not None else 0
        return held + query_length_of(query_length), max(self.cumulative_length - held, 0)

    @classmethod
    def from_layer(cls, layer: Any) -> EvictedSlidingWindowLayer:
        """The same state (keys, values, counters) in this class."""
        evicted = cls.__new__(cls)
        evicted.__dict__.update(vars(layer))
        return evicted


def is_sliding(layer: Any) -> bool:
    """Whether a cache layer is a sliding-window layer (Gemma-3's local layers)."""
    return bool(getattr(layer, "is_sliding", False)) or hasattr(layer, "sliding_window")


class LayerLog:
    """What a cache method did to each layer on the last request: the tokens a layer held
    when the method compressed it (after prefill) and the tokens it kept. Each prefill
    overwrites its layer's entry, so after a request the log is that request's."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.entries: dict[int, tuple[int, int]] = {}

    def record(self, layer: int, before: int, kept: int) -> None:
        self.entries[layer] = (before, kept)

    def stats(self) -> dict[str, Any] | None:
        """``compressed_layers`` (indices) and, per layer (None where the method left the
        layer alone), ``tokens_before`` and ``tokens_kept``; None before any request."""
        if not self.entries:
            return None
        size = max(self.num_layers, max(self.entries) + 1)
        before: list[int | None] = [None] * size
        kept: list[int | None] = [None] * size
        for layer, (b, k) in self.entries.items():
            before[layer], kept[layer] = b, k
        return {
            "compressed_layers": sorted(self.entries),
            "tokens_before": before,
            "tokens_kept": kept,
        }
