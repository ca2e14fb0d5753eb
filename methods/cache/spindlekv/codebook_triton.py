"""SpindleKV's decoding step over its codebook cache as Triton kernels, for GPUs: the attention
(:func:`attend`) and the new key's and value's codebook match (:func:`append`), run by
``decode_attention: fused`` on CUDA and by ``triton`` anywhere Triton runs.

On a GPU the PyTorch-operations path (``methods.cache.spindlekv.codebook_attention.attend_codebook``)
writes a gathered, rotated (U, D) key buffer, the logits and the weights per layer and step,
and the fused C++ kernels (``methods.cache.spindlekv.codebook_kernels``) are CPU-only. The kernels of
``methods.cache.spindlekv.codebook_triton_kernels`` read each slot's ref, position, magnitudes and
query-head flags once, gather its key entry, RoPE row and value entry (shared rows that
mostly stay in cache) and write nothing per slot: the bytes read per step are about the
compressed cache's own, not the full cache's. The slots are split across programs (flash
decoding: a GPU has far more cores than a batch has KV heads), then one small kernel joins
the splits with the newest not-yet-folded tokens. The match reads only each group's own
entries and numbers the new ones as the PyTorch operations do (the same refs).

The same kernels run on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``), which
is how the tests check them against the PyTorch operations and the decoded cache.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from types import ModuleType

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_DIM = 256  # the kernels hold a block of slots' rows in registers
MAX_SPLITS = 64


def interpreting() -> bool:
    """Whether Triton kernels run on the CPU here (its interpreter, ``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes")


def unsupported(device: torch.device, dtype: torch.dtype, dims: set[int]) -> str | None:
    """Why the Triton kernels cannot attend for a model on ``device`` in ``dtype`` whose
    attention heads have dims ``dims`` (None: they can)."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    if device.type == "cpu" and not interpreting():
        return "Triton kernels run on a CPU only under its interpreter (TRITON_INTERPRET=1)"
    if device.type not in ("cuda", "cpu"):
        return f"Triton kernels run on CUDA GPUs, not on {device.type}"
    if dtype not in DTYPES:
        return f"the Triton kernels take float32, float16 or bfloat16, not {dtype}"
    bad = sorted(d for d in dims if d % 2 or not 2 <= d <= MAX_DIM)
    if bad:
        return f"the Triton kernels take even head dims up to {MAX_DIM}, not {bad[0]}"
    return None


def resolve(
    asked: str, device: torch.device, dtype: torch.dtype, dims: set[int]
) -> tuple[str, str | None]:
    """The kernel SpindleKV's decoding steps run for ``decode_attention=asked`` on a model on
    ``device`` in ``dtype`` with head dims ``dims``: ``fused`` (the C++ kernels) on a CPU,
    ``triton`` on a GPU or when asked for, else what was asked; ``codebook`` (the PyTorch
    operations) when that kernel cannot run, with why (None when it runs)."""
    if asked == "fused" and device.type == "cpu":
        if dtype != torch.float32:
            return "codebook", f"the fused C++ kernels take float32 only, not {dtype}"
        return "fused", None
    if asked not in ("fused", "triton"):
        return asked, None
    why = unsupported(device, dtype, dims)
    return ("codebook", why) if why else ("triton", None)


def kernels() -> ModuleType:
    """The jitted kernels (imported on first use, after :func:`unsupported` said yes)."""
    return importlib.import_module("methods.cache.spindlekv.codebook_triton_kernels")


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@functools.cache
def _multiprocessors(index: int | None) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _splits(programs: int, slots: int, block: int, device: torch.device) -> tuple[int, int]:
    """(splits, slots per split, a multiple of ``block``): enough programs to fill the GPU
    (four per streaming multiprocessor) when the batch's KV heads are fewer."""
    cores = 4 * _multiprocessors(device.index) if device.type == "cuda" else 4
    want = max(1, min(MAX_SPLITS, -(-cores // programs), -(-slots // block)))
    per_split = -(-max(slots, 1) // want)
    per_split = -(-per_split // block) * block
    return -(-max(slots, 1) // per_split), per_split


def _strides(t: torch.Tensor | None, n: int) -> list[int]:
    return [0] * n if t is None else list(t.stride()[:n])


def attend(
    query: torch.Tensor,
    key_entries: torch.Tensor,
    key_refs: torch.Tensor,
    key_magnitudes: torch.Tensor | None,
    table: torch.Tensor,
    positions: torch.Tensor,
    heads: torch.Tensor | None,
    value_entries: torch.Tensor,
    value_refs: torch.Tensor,
    value_magnitudes: torch.Tensor | None,
    newest_keys: torch.Tensor,
    newest_values: torch.Tensor,
    softcap: float | None,
    splits: int | None = None,
    block: int | None = None,
) -> torch.Tensor:
    """:func:`methods.cache.spindlekv.codebook_kernels.attend` (same arguments and result: one query
    token (B, H_kv, G, D), already scaled, over the slots and the newest tokens; (B, H_kv,
    G, Dv) float32) by the Triton kernels. ``splits``: how many programs share a KV head's
    slots (by default enough to fill the GPU); ``block``: slots per loop step (a power of 2,
    at least 16: the dots' smallest side; 16 by default)."""
    batch, kv_heads, groups, dim = query.shape
    slots, dv, newest = key_refs.shape[-1], value_entries.shape[-1], newest_keys.shape[-2]
    programs = batch * kv_heads
    g_p, d_p, dv_p = max(16, _pow2(groups)), max(16, _pow2(dim)), max(16, _pow2(dv))
    block = block or 16  # a block's rows stay in registers (head dim 128: 128 per thread)
    if splits is None:
        splits, per_split = _splits(programs, slots, block, query.device)
    else:
        per_split = -(-max(slots, 1) // splits)
        splits = -(-max(slots, 1) // per_split)
    q = query.float().contiguous()
    m = q.new_empty(programs, splits, g_p)
    total = q.new_empty(programs, splits, g_p)
    acc = q.new_empty(programs, splits, g_p, dv_p)
    flags = None if heads is None else heads.view(torch.uint8)
    none = q.new_empty(0)
    k = kernels()
    k.slots_kernel[(programs, splits)](
        q, key_entries.contiguous(), key_refs,
        none if key_magnitudes is None else key_magnitudes, table.contiguous(), positions,
        none if flags is None else flags, value_entries.contiguous(), value_refs,
        none if value_magnitudes is None else value_magnitudes, m, total, acc,
        kv_heads, slots, groups, dim, dv, per_split, float(softcap or 1.0),
        *_strides(key_refs, 2), *_strides(value_refs, 2), *_strides(positions, 2),
        *_strides(key_magnitudes, 2), *_strides(value_magnitudes, 2), *_strides(flags, 3),
        HAS_KMAG=key_magnitudes is not None, HAS_VMAG=value_magnitudes is not None,
        HAS_HEADS=flags is not None, SOFTCAP=bool(softcap), G_P=g_p, D_P=d_p, DV_P=dv_p,
        BLOCK_U=block,
    )  # fmt: skip
    out = q.new_empty(batch, kv_heads, groups, dv)
    k.join_kernel[(programs,)](
        q, newest_keys.contiguous(), newest_values.contiguous(), m, total, acc, out,
        groups, dim, dv, newest, splits, float(softcap or 1.0),
        SOFTCAP=bool(softcap), G_P=g_p, D_P=d_p, DV_P=dv_p, T_P=_pow2(max(newest, 1)),
    )  # fmt: skip
    return out


def append(
    vectors: torch.Tensor,
    table: torch.Tensor | None,
    positions: torch.Tensor | None,
    entries: torch.Tensor,
    owner: torch.Tensor,
    count: int,
    theta: float,
    magnitudes: bool,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """:func:`methods.cache.spindlekv.codebook_kernels.append` (same arguments and result: one new
    vector per group (N, D) joins its group's most similar entry or opens one, written into
    the reserved room of ``entries``/``owner``) by the Triton kernels; ``entries`` may be of
    any dtype the kernels take. Reading back how many entries were made is one host sync."""
    n, dim = vectors.shape
    v = vectors.contiguous()
    scratch = v.new_empty(n, dim, dtype=torch.float32)
    best = v.new_empty(n, dtype=torch.float32)
    ref = v.new_empty(n, dtype=torch.int32)
    norms = v.new_empty(n, dtype=torch.float32)
    refs = v.new_empty(n, dtype=torch.int32)
    made = v.new_zeros(1, dtype=torch.int32)
    none = scratch.new_empty(0)
    k = kernels()
    k.match_kernel[(n,)](
        v, none if table is None else table.contiguous(),
        none if positions is None else positions.contiguous(), entries, owner, best, ref,
        scratch, norms, count, dim,
        HAS_TABLE=table is not None, MAGNITUDES=magnitudes, HALF_P=_pow2(dim // 2), BLOCK_E=32,
    )  # fmt: skip
    k.open_kernel[(1,)](
        best, ref, scratch, entries, owner, refs, made, n, count, dim, float(theta),
        N_P=_pow2(n), D_P=_pow2(dim),
    )  # fmt: skip
    return refs, norms, int(made.item())
