"""The two ceilings a GPU table is read against, measured in the same run, and the floors they
give: device memory bandwidth (a device-to-device copy, bytes read + written) and the dense
matrix rate (a square product in the model's dtype), both on random data, timed with CUDA
events (``perf_counter`` on the CPU), median of several after warm-ups.

Floors (a method cannot beat them, METHOD.md's "two numbers"):

- decode, per token: every weight and every stored KV byte read once, ``(weights + KV) /
  bandwidth`` (the KV cache read is what a KV reduction can save);
- prefill: the larger of ``FLOPs / matrix rate`` (the linear layers on every prompt token plus
  causal attention, ``2 * H * D * S^2`` per layer for QK^T and PV together) and ``(weights +
  KV written) / bandwidth``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def timed(fn: Callable[[], Any], device: torch.device, repeats: int = 10, warmup: int = 3) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            start_s = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start_s)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, megabytes: int) -> float:
    """Bytes per second (read + written) of a device-to-device copy of ``megabytes``."""
    source = torch.empty(megabytes * 2**20 // 2, dtype=torch.bfloat16, device=device).normal_()
    target = torch.empty_like(source)
    seconds = timed(lambda: target.copy_(source), device)
    return 2 * source.numel() * source.element_size() / seconds


def matmul_rate(device: torch.device, size: int, dtype: torch.dtype) -> float:
    """FLOP per second of a ``size``-cubed matrix product in ``dtype`` on random data."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = timed(lambda: a @ b, device)
    return 2 * size**3 / seconds


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct parameters (tied embeddings counted once)."""
    seen = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    return sum(seen.values())


def prefill_flops(config: Any, tokens: int) -> float:
    """FLOPs of one full-cache prefill of ``tokens`` tokens, logits for the last one only."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_dim = config.num_key_value_heads * head_dim
    per_layer = hidden * (2 * heads * head_dim + 2 * kv_dim) + 3 * hidden * config.intermediate_size
    linear = 2 * tokens * per_layer * layers + 2 * hidden * config.vocab_size
    attention = 2 * heads * head_dim * tokens * (tokens + 1) * layers  # causal QK^T + PV
    return float(linear + attention)


def prefill_floor_s(flops: float, moved_bytes: int, rate: float, bandwidth: float) -> float:
    return max(flops / rate, moved_bytes / bandwidth)


def decode_floor_s(weights: int, kv_bytes: int, bandwidth: float) -> float:
    return (weights + kv_bytes) / bandwidth
