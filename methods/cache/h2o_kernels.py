"""H2O's prefill attention as two Triton kernels: the attention matrix is never materialised.

Today's PyTorch path (:func:`~methods.cache.attention.attention_and_received`) computes,
64 queries at a time, the float32 logits of the chunk against every visible key, their
softmax, the column sums and the PV product: O(S^2) float32 bytes through memory per head.
Here the same quantities come from two streaming passes that hold one tile in registers:

1. :func:`_forward`, a causal flash-attention forward (online softmax; GQA by indexing the
   KV head ``h // G``), writes the output (B, q, H_q, D_v) and each query's log-sum-exp of
   its (scaled, soft-capped) logits, float32, in base 2.
2. :func:`_received`, one program per block of keys of a KV head, recomputes those keys'
   logits against every query that sees them (and every query head of the group) and sums
   ``exp2(logit - lse)``, the softmax probability, without a second softmax or any PV
   product: the received attention (B, H_kv, S) float32.

Work: a flash forward, plus the QK^T half of one again (no PV, no second softmax): 1.5x a
flash forward's matrix FLOPs and twice its exponentials, all on the tensor cores in the
model's dtype, with O(S) extra memory (the log-sum-exp and the received attention). Its
speed against the model's own sdpa is to be measured on a GPU (bench/gpu).

Logits and sums are float32 (float32 inputs are multiplied in IEEE float32, not TF32), so
the received attention matches the PyTorch path to float32 rounding and H2O keeps the same
positions. The kernels take the plain causal prefill (no attention mask; queries are the
last q of the S keys) and power-of-two head dims 16..256 in float16, bfloat16 or float32;
:func:`unsupported` names why a call cannot run here, and H2O then runs the PyTorch path.
On the CPU they run only under ``TRITON_INTERPRET=1`` (the tests). Triton is imported on
first use, so the environment variable may be set by then.
"""

from __future__ import annotations

import importlib
import math
import os
from types import ModuleType

import torch

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (16, 32, 64, 128, 256)
# (BLOCK_M queries, BLOCK_N keys) per tile, warps, pipeline stages: forward, received. Not
# tuned on a GPU yet; the small tiles for rows over 256 bytes (head_dim 256, or 128 in
# float32) keep the pipelined tiles within an H100/H200's 228 KiB of shared memory
GPU_BLOCKS = {"forward": (128, 64, 8, 3), "received": (64, 128, 8, 3)}
GPU_BLOCKS_WIDE = {"forward": (64, 32, 4, 2), "received": (32, 64, 4, 2)}
INTERPRETER_BLOCKS = {"forward": (32, 32, 1, 1), "received": (32, 32, 1, 1)}


def interpreted() -> bool:
    """Whether Triton runs its kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_missing() -> str | None:
    """Why Triton cannot be imported here, or None."""
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return f"triton is not importable ({error})"
    return None


def unsupported(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
) -> str | None:
    """Why the kernels cannot compute this call, in a few words, or None when they can."""
    if (missing := triton_missing()) is not None:
        return missing
    if query.device.type != "cuda" and not (query.device.type == "cpu" and interpreted()):
        return f"device {query.device.type} (Triton runs on CUDA; on the CPU only interpreted)"
    if attention_mask is not None:
        return "an attention mask was given (padding): the kernels take plain causal attention"
    if query.dtype not in DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        return f"dtype {query.dtype} (the kernels take float16, bfloat16, float32)"
    for name, dim in (("head_dim", query.shape[-1]), ("value head_dim", value.shape[-1])):
        if dim not in HEAD_DIMS:
            return f"{name} {dim} (the kernels take {', '.join(map(str, HEAD_DIMS))})"
    if key.shape[-1] != query.shape[-1] or query.shape[1] % key.shape[1]:
        return "query and key shapes do not match (head_dim, or H_q not a multiple of H_kv)"
    if query.shape[2] > key.shape[2]:
        return "more queries than keys"
    return None


def attention_and_received(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scaling: float,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What :func:`methods.cache.attention.attention_and_received` returns for a causal
    call without mask, from the two kernels: the output (B, q, H_q, D_v) in the query's
    dtype and the received attention (B, H_kv, S) float32. query (B, H_q, q, D) post-RoPE,
    the queries of the last q of the S keys; key (B, H_kv, S, D), value (B, H_kv, S, D_v).
    Check :func:`unsupported` first."""
    kernels = _kernels()
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads, seq_len, v_dim = key.shape[1], key.shape[2], value.shape[-1]
    groups = q_heads // kv_heads
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    strides = (*query.stride()[:3], *key.stride()[:3])  # any layout with contiguous rows
    output = query.new_empty((batch, q_len, q_heads, v_dim))
    lse = torch.empty((batch, q_heads, q_len), dtype=torch.float32, device=query.device)
    received = torch.empty((batch, kv_heads, seq_len), dtype=torch.float32, device=key.device)
    blocks = GPU_BLOCKS if head_dim * query.element_size() <= 256 else GPU_BLOCKS_WIDE
    blocks = INTERPRETER_BLOCKS if query.device.type == "cpu" else blocks
    shape = dict(
        Q_LEN=q_len,
        S_LEN=seq_len,
        H_Q=q_heads,
        GROUPS=groups,
        HEAD_DIM=head_dim,
        IEEE=query.dtype == torch.float32,
        UPCAST=query.dtype == torch.bfloat16 and query.device.type == "cpu",
        SOFTCAP=bool(softcap),
    )
    scale, cap = float(scaling), float(softcap or 1.0)
    block_m, block_n, warps, stages = blocks["forward"]
    grid = (math.ceil(q_len / block_m), batch * q_heads)
    kernels.forward[grid](
        query, key, value, output, lse, scale, cap, *strides, *value.stride()[:3], V_DIM=v_dim,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **shape,
    )  # fmt: skip
    block_m, block_n, warps, stages = blocks["received"]
    grid = (math.ceil(seq_len / block_n), batch * kv_heads)
    kernels.received[grid](
        query, key, lse, received, scale, cap, *strides,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **shape,
    )  # fmt: skip
    return output, received


def _kernels() -> ModuleType:
    """The kernels' module, imported on first use; imported again where the interpreter
    setting (``TRITON_INTERPRET``) changed since (the tests set it)."""
    module = importlib.import_module("methods.cache.h2o_triton")
    if module.INTERPRETED != interpreted():
        module = importlib.reload(module)
    return module
