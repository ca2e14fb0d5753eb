"""What a request costs: KV bytes actually stored, the full-cache reference, peak memory, time."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from methods.base import CacheMethod, Method


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in ``obj`` (a tensor, or lists/tuples/dicts of them)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def layer_kv_bytes(layer: Any) -> int:
    """Bytes of one cache layer's key/value storage: ``stored_nbytes()`` when the layer
    stores a compressed form (a codebook, indices, magnitudes), else its ``keys`` and
    ``values`` tensors. Bookkeeping tensors a layer keeps besides (transformers' 0-d
    ``_sliding_window_tensor``, position counters) are not KV storage and are not counted."""
    if hasattr(layer, "stored_nbytes"):
        return int(layer.stored_nbytes())
    return tensor_bytes(getattr(layer, "keys", None)) + tensor_bytes(getattr(layer, "values", None))


def stored_kv_bytes(cache: Any) -> int:
    """Bytes of key/value storage the cache holds, summed over its layers
    (:func:`layer_kv_bytes`); a cache may define ``stored_nbytes()`` for the whole."""
    if cache is None:
        return 0
    if hasattr(cache, "stored_nbytes"):
        return int(cache.stored_nbytes())
    return sum(layer_kv_bytes(layer) for layer in cache.layers)


def allocated_kv_bytes(cache: Any) -> int:
    """Bytes of memory the cache's tensors occupy: every distinct storage referenced by its
    layers, counted once and in full. Unlike :func:`stored_kv_bytes` (the tokens held, what
    ``kv_ratio`` is computed from), this includes the spare room of caches that append in
    place (:mod:`harness.kvcache`) and the unused part of any view a method stores."""
    if cache is None:
        return 0
    storages: dict[int, int] = {}
    for layer in getattr(cache, "layers", ()):
        # a layer with a compressed form (stored_nbytes) may keep any tensors; others K and V
        held = vars(layer) if hasattr(layer, "stored_nbytes") else (layer.keys, layer.values)
        for tensor in _tensors(held):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _tensors(obj: Any) -> Iterable[torch.Tensor]:
    """The tensors in ``obj``: a tensor, dicts/lists/tuples of them, and the fields of
    dataclass instances (e.g. SpindleKV's codebooks)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, list | tuple):
        for value in obj:
            yield from _tensors(value)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        yield from _tensors(vars(obj))


@dataclass(frozen=True)
class KVLayout:
    """The KV cache an unmodified model keeps, per layer: (kv_heads, key_dim, value_dim,
    tokens_kept_at_most or None). Taken from the original config, before any model method."""

    layers: tuple[tuple[int, int, int, int | None], ...]
    dtype_bytes: int

    @classmethod
    def from_config(cls, config: Any, dtype: torch.dtype) -> KVLayout:
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        layer_types = getattr(config, "layer_types", None) or ["full_attention"] * (
            config.num_hidden_layers
        )
        window = getattr(config, "sliding_window", None)
        layers = []
        for kind in layer_types:
            # transformers' sliding-window cache layers keep the last (window - 1) tokens
            kept = window - 1 if kind == "sliding_attention" and window else None
            layers.append((kv_heads, head_dim, head_dim, kept))
        return cls(tuple(layers), torch.finfo(dtype).bits // 8)

    def full_bytes(self, tokens: int) -> int:
        """Bytes a full (uncompressed) cache holds for ``tokens`` tokens."""
        total = 0
        for kv_heads, k_dim, v_dim, kept in self.layers:
            n = tokens if kept is None else min(tokens, kept)
            total += kv_heads * (k_dim + v_dim) * n
        return total * self.dtype_bytes

    def floor_bytes(self, tokens: int, min_tokens: int, compress_sliding: bool = False) -> int:
        """Bytes the cache holds for ``tokens`` tokens when every layer a cache method
        compresses keeps only ``min_tokens`` (the method's minimum) and the layers it leaves
        alone (sliding-window ones, unless ``compress_sliding``) keep their window: the
        lowest KV ratio reachable is this over :meth:`full_bytes`."""
        total = 0
        for kv_heads, k_dim, v_dim, kept in self.layers:
            n = tokens if kept is None else min(tokens, kept)
            if kept is None or compress_sliding:
                n = min(n, min_tokens)
            total += kv_heads * (k_dim + v_dim) * n
        return total * self.dtype_bytes


# field metadata of RequestMeasurement: not a run-level aggregate
KEY = {"aggregate": False}
PER_REQUEST = {"aggregate": False}


@dataclass(kw_only=True)
class ForwardCost:
    """What a request's forward passes cost: the fields of :class:`RequestMeasurement` that a
    generation (:class:`harness.generation.Generation`) and a scoring
    (:class:`harness.generation.Scored`) measure themselves. Byte counts are of the KV cache."""

    prefill_s: float
    decode_s: float = 0.0  # the decoding steps, capture_s left out
    decode_steps: int = 0
    # time spent capturing a decoding step for a new shape (harness.decode_graph): paid once
    # per shape, on the first request that needs it, and kept out of decode_s
    capture_s: float = 0.0
    generated_tokens: int = 0
    kv_bytes_prefill: int
    kv_bytes_final: int
    # memory the cache's tensors occupy (spare room of the in-place appends included); the
    # kv_bytes_* are the tokens held, what kv_ratio is computed from
    kv_allocated_bytes_prefill: int | None = None
    kv_allocated_bytes_final: int | None = None

    def cost_fields(self) -> dict[str, Any]:
        """This cost's fields by name (a subclass's own fields left out)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(ForwardCost)}


@dataclass(kw_only=True)
class RequestMeasurement(ForwardCost):
    """What one request cost: its :class:`ForwardCost` and the fields below, each field named
    here once. ``kv_full_*`` is what an unmodified model's full cache holds for the same
    (uncompressed) prompt. Every field is summed and averaged over a run (:data:`harness.results.MEASURED_FIELDS`) except those
    marked ``KEY`` (which request it was) or ``PER_REQUEST`` (kept with the request only)."""

    task: str = field(metadata=KEY)
    doc_id: int = field(metadata=KEY)
    request_type: str = field(metadata=KEY)
    prompt_tokens_original: int
    prompt_tokens: int
    truncated_tokens: int
    prompt_method_s: float
    kv_full_bytes_prefill: int
    kv_full_bytes_final: int
    peak_memory_bytes: int
    # with a cache method that asks for a reduction: the bytes at the lowest ratio it can
    # reach (the layers it compresses at its minimum, the others at their window)
    kv_floor_bytes_prefill: int | None = None
    # the process's memory just before the request (CPU: resident set; CUDA: allocated) and
    # how far the request's peak rose above it
    memory_before_bytes: int | None = None
    peak_memory_rise_bytes: int | None = None
    # with prompt methods only (None otherwise): the compressible part (demonstrations,
    # context) in the target model's tokens before/after them, the rate of it they were
    # asked to remove, the rate removed (in target tokens), the rate removed in the
    # methods' own (compressor) tokens, the compressor's forward passes, and the chunks
    # (inputs scored apart: 1 while the input fits the compressor's window)
    compressible_tokens_original: int | None = None
    compressible_tokens: int | None = None
    prompt_rate_requested: float | None = None
    prompt_rate_achieved: float | None = None
    compressor_rate_achieved: float | None = None
    compressor_passes: int | None = None
    compressor_chunks: int | None = None
    # with a reference answer only (TaskSpec.reference_field): its mean NLL in nats per
    # token, teacher-forced after the prompt the model saw, under the same cache methods
    reference_nll: float | None = None
    reference_tokens: int | None = None
    # what the methods did on this request (``Method.last_stats``: a cache method's tokens
    # held and kept per layer, a prompt method's rates), None when they say nothing
    method_stats: dict[str, Any] | None = field(default=None, metadata=PER_REQUEST)


def floor_bytes(layout: KVLayout, method: Method, tokens: int) -> int | None:
    """KV bytes at the lowest ratio ``method``'s cache methods can reach for ``tokens``
    tokens (:meth:`KVLayout.floor_bytes` at their ``min_kept_tokens``); None without a cache
    method that asks for a reduction."""
    reducing = [m for m in method.flatten() if isinstance(m, CacheMethod) and m.asks_reduction()]
    if not reducing:
        return None
    return layout.floor_bytes(
        tokens,
        min(m.min_kept_tokens() for m in reducing),
        any(m.compress_sliding for m in reducing),
    )


CUDA_PEAK = "cuda_max_allocated"
CPU_PEAK = "weights_plus_kv_allocated"
# what ``peak_memory_bytes`` measured, in words (records before the kind was written: the
# process's resident-set peak on the CPU)
PEAK_MEMORY_WORDS = {
    CUDA_PEAK: "CUDA allocator peak (weights, KV cache, activations)",
    CPU_PEAK: "weights + KV cache allocated",
    "rss_peak": "process resident-set peak (RSS)",
}


def module_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers, each storage counted once (tied weights)."""
    storages: dict[int, int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


class PeakMemory:
    """Memory of one request: the memory just before it (:meth:`reset`), the peak during it
    and the difference, the rise (:meth:`read`); :attr:`kind` names what was measured.

    CUDA (:data:`CUDA_PEAK`): ``memory_allocated`` before, ``max_memory_allocated`` after
    resetting the peak statistics: weights, KV cache and activations, as the allocator saw
    them. A model spread over several GPUs (``model.device_map=auto``; :meth:`of_model`) sums
    the memory before and the peaks over its devices (each device's own peak: their sum
    bounds what they held at any one time from above). CPU (:data:`CPU_PEAK`): the process's
    resident set does not show a KV cache (its high-water mark is set by the weights' loading
    and the allocator's reuse, and stays flat over a request), so the peak is what can be
    counted: the weights' bytes plus the bytes the request's KV cache had allocated at the
    larger of its two readings (after prefill, at the end); before = the weights, rise = the
    KV cache. Activations are not counted on the CPU.
    """

    def __init__(
        self, device: torch.device, weights_bytes: int = 0, also: Iterable[torch.device] = ()
    ) -> None:
        self.device = device
        self.weights_bytes = int(weights_bytes)
        self.kind = CUDA_PEAK if device.type == "cuda" else CPU_PEAK
        self.devices = [device]
        if device.type == "cuda":
            self.devices += [d for d in also if d.type == "cuda" and d != device]
        self.before = 0

    @classmethod
    def of_model(cls, model: Any) -> PeakMemory:
        """The probe of every device ``model``'s parameters are on, its first one first (its
        weights' bytes for the CPU's count)."""
        first = next(model.parameters()).device
        others = sorted({p.device for p in model.parameters()} - {first}, key=str)
        return cls(first, module_bytes(model) if first.type != "cuda" else 0, others)

    def reset(self) -> None:
        """Start a request: reset the allocator's peak and read the memory before it."""
        if self.device.type == "cuda":
            self.before = 0
            for device in self.devices:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                self.before += int(torch.cuda.memory_allocated(device))
            return
        self.before = self.weights_bytes

    def peak_bytes(self, kv_allocated_bytes: int = 0) -> int:
        """The request's peak: the allocator's (CUDA), else weights + ``kv_allocated_bytes``."""
        if self.device.type == "cuda":
            peak = 0
            for device in self.devices:
                torch.cuda.synchronize(device)
                peak += int(torch.cuda.max_memory_allocated(device))
            return peak
        return self.weights_bytes + int(kv_allocated_bytes)

    def rise_bytes(self, peak: int) -> int:
        """How far ``peak`` rose above the memory before the request (never negative)."""
        return max(0, peak - self.before)

    def read(self, kv_allocated_bytes: int = 0) -> dict[str, int]:
        """The request's ``peak_memory_bytes``, ``memory_before_bytes`` and
        ``peak_memory_rise_bytes`` (read right after the request, before anything else);
        ``kv_allocated_bytes``: the most its KV cache had allocated (used on the CPU)."""
        peak = self.peak_bytes(kv_allocated_bytes)
        return {
            "peak_memory_bytes": peak,
            "memory_before_bytes": self.before,
            "peak_memory_rise_bytes": self.rise_bytes(peak),
        }


def synchronized_clock(device: torch.device) -> float:
    """``perf_counter`` after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def summarize(values: Iterable[float]) -> dict[str, float]:
    """mean, p50, p95, min, max and total of a list of per-request values."""
    data = sorted(float(v) for v in values)
    if not data:
        return {"n": 0}
    p95_index = min(len(data) - 1, max(0, round(0.95 * (len(data) - 1))))
    return {
        "n": len(data),
        "mean": statistics.fmean(data),
        "p50": statistics.median(data),
        "p95": data[p95_index],
        "min": data[0],
        "max": data[-1],
        "total": sum(data),
    }
