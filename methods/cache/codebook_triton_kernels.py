"""The Triton kernels of SpindleKV's codebook decode attention (``methods.cache.codebook_triton``
launches them and says when they can run). Imported only once Triton is known to be
importable: the ``@triton.jit`` decorator reads ``TRITON_INTERPRET`` when this module loads.

Flash-decoding over the codebook slots: :func:`slots_kernel` runs one program per (KV head,
split of its slots), each an online softmax over blocks of ``BLOCK_U`` slots (entries and
RoPE rows gathered by ref and position, rotated in registers, scored by the group's query
heads, masked per query head, values gathered by ref); :func:`join_kernel` runs one program
per KV head, scores the newest not-yet-folded tokens and joins them with the splits' partial
softmaxes. Everything is computed in float32 whatever the storage dtype.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _softcap(x, cap):
    """``tanh(x / cap) * cap`` from exp alone (tanh is not in every Triton backend)."""
    return (1.0 - 2.0 / (tl.exp(2.0 * (x / cap)) + 1.0)) * cap


@triton.jit
def _query_halves(q_ptr, bh, G, D, HALF, G_P: tl.constexpr, HALF_P: tl.constexpr):
    """The G query heads of KV head ``bh`` (B*H_kv, G, D), as halves (G_P, HALF_P) each."""
    g = tl.arange(0, G_P)
    i = tl.arange(0, HALF_P)
    mask = (g < G)[:, None] & (i < HALF)[None, :]
    rows = q_ptr + bh * G * D + g[:, None] * D + i[None, :]
    first = tl.load(rows, mask=mask, other=0.0).to(tl.float32)
    second = tl.load(rows + HALF, mask=mask, other=0.0).to(tl.float32)
    return first, second


@triton.jit
def slots_kernel(
    q_ptr, kent_ptr, krefs_ptr, kmag_ptr, table_ptr, pos_ptr, heads_ptr,
    vent_ptr, vrefs_ptr, vmag_ptr, m_ptr, l_ptr, acc_ptr,
    H, U, G, D, DV, per_split, softcap,
    s_kr_b, s_kr_h, s_vr_b, s_vr_h, s_pos_b, s_pos_h,
    s_km_b, s_km_h, s_vm_b, s_vm_h, s_hd_b, s_hd_h, s_hd_g,
    HAS_KMAG: tl.constexpr, HAS_VMAG: tl.constexpr, HAS_HEADS: tl.constexpr,
    SOFTCAP: tl.constexpr, G_P: tl.constexpr, HALF_P: tl.constexpr, DV_P: tl.constexpr,
    BLOCK_U: tl.constexpr,
):  # fmt: skip
    """Partial softmax of KV head ``program_id(0)`` over its slots in split
    ``program_id(1)``: running max m, sum l (G_P,) and unnormalised values acc (G_P, DV_P)."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // H
    h = bh % H
    half = D // 2
    q1, q2 = _query_halves(q_ptr, bh, G, D, half, G_P, HALF_P)
    g = tl.arange(0, G_P)
    i = tl.arange(0, HALF_P)
    dv = tl.arange(0, DV_P)
    m_i = tl.full((G_P,), float("-inf"), tl.float32)
    l_i = tl.zeros((G_P,), tl.float32)
    acc = tl.zeros((G_P, DV_P), tl.float32)
    lo = split * per_split
    hi = tl.minimum(lo + per_split, U)
    for start in range(lo, hi, BLOCK_U):
        u = start + tl.arange(0, BLOCK_U)
        um = u < hi
        kr = tl.load(krefs_ptr + b * s_kr_b + h * s_kr_h + u, mask=um, other=0).to(tl.int64)
        pos = tl.load(pos_ptr + b * s_pos_b + h * s_pos_h + u, mask=um, other=0).to(tl.int64)
        rm = um[:, None] & (i < half)[None, :]
        entry = kent_ptr + kr[:, None] * D + i[None, :]
        e1 = tl.load(entry, mask=rm, other=0.0).to(tl.float32)
        e2 = tl.load(entry + half, mask=rm, other=0.0).to(tl.float32)
        row = table_ptr + pos[:, None] * D + i[None, :]
        cos = tl.load(row, mask=rm, other=0.0).to(tl.float32)
        sin = tl.load(row + half, mask=rm, other=0.0).to(tl.float32)
        r1 = e1 * cos - e2 * sin  # rotate-half RoPE at each slot's own position
        r2 = e2 * cos + e1 * sin
        logits = tl.sum(q1[:, None, :] * r1[None, :, :], axis=2)
        logits += tl.sum(q2[:, None, :] * r2[None, :, :], axis=2)  # (G_P, BLOCK_U)
        if HAS_KMAG:
            km = tl.load(kmag_ptr + b * s_km_b + h * s_km_h + u, mask=um, other=0.0)
            logits = logits * km.to(tl.float32)[None, :]
        if SOFTCAP:  # before the mask, as the PyTorch operations do
            logits = _softcap(logits, softcap)
        seen = (g < G)[:, None] & um[None, :]
        if HAS_HEADS:
            flags = heads_ptr + b * s_hd_b + h * s_hd_h + g[:, None] * s_hd_g + u[None, :]
            seen = seen & (tl.load(flags, mask=seen, other=0) != 0)
        logits = tl.where(seen, logits, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: no NaN
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(logits - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if HAS_VMAG:
            vm = tl.load(vmag_ptr + b * s_vm_b + h * s_vm_h + u, mask=um, other=0.0)
            p = p * vm.to(tl.float32)[None, :]
        vr = tl.load(vrefs_ptr + b * s_vr_b + h * s_vr_h + u, mask=um, other=0).to(tl.int64)
        vmask = um[:, None] & (dv < DV)[None, :]
        v = tl.load(vent_ptr + vr[:, None] * DV + dv[None, :], mask=vmask, other=0.0)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        m_i = m_new
    part = bh * tl.num_programs(1) + split
    tl.store(m_ptr + part * G_P + g, m_i)
    tl.store(l_ptr + part * G_P + g, l_i)
    tl.store(acc_ptr + (part * G_P + g[:, None]) * DV_P + dv[None, :], acc)


@triton.jit
def join_kernel(
    q_ptr, tk_ptr, tv_ptr, m_ptr, l_ptr, acc_ptr, out_ptr,
    G, D, DV, T, S, softcap,
    SOFTCAP: tl.constexpr, G_P: tl.constexpr, HALF_P: tl.constexpr, DV_P: tl.constexpr,
    T_P: tl.constexpr, S_P: tl.constexpr,
):  # fmt: skip
    """KV head ``program_id(0)``: the newest tokens (B*H_kv, T, D) post-RoPE, seen by every
    query head, joined with the S splits' partial softmaxes; (G, DV) float32 written to out
    (0 for a query head that sees nothing, as the C++ kernel reports)."""
    bh = tl.program_id(0)
    half = D // 2
    q1, q2 = _query_halves(q_ptr, bh, G, D, half, G_P, HALF_P)
    g = tl.arange(0, G_P)
    i = tl.arange(0, HALF_P)
    j = tl.arange(0, T_P)
    s = tl.arange(0, S_P)
    dv = tl.arange(0, DV_P)
    km = (j < T)[:, None] & (i < half)[None, :]
    keys = tk_ptr + bh * T * D + j[:, None] * D + i[None, :]
    k1 = tl.load(keys, mask=km, other=0.0).to(tl.float32)
    k2 = tl.load(keys + half, mask=km, other=0.0).to(tl.float32)
    newest = tl.sum(q1[:, None, :] * k1[None, :, :], axis=2)
    newest += tl.sum(q2[:, None, :] * k2[None, :, :], axis=2)  # (G_P, T_P)
    if SOFTCAP:
        newest = _softcap(newest, softcap)
    newest = tl.where((j < T)[None, :], newest, float("-inf"))
    part = (bh * S + s[None, :]) * G_P + g[:, None]  # (G_P, S_P)
    m_s = tl.load(m_ptr + part, mask=(s < S)[None, :], other=float("-inf"))
    l_s = tl.load(l_ptr + part, mask=(s < S)[None, :], other=0.0)
    top = tl.maximum(tl.max(m_s, axis=1), tl.max(newest, axis=1))
    top = tl.where(top == float("-inf"), 0.0, top)
    w_s = tl.exp(m_s - top[:, None])
    p = tl.exp(newest - top[:, None])
    total = tl.sum(l_s * w_s, axis=1) + tl.sum(p, axis=1)
    acc_mask = (s < S)[None, :, None] & (dv < DV)[None, None, :]
    acc = tl.load(acc_ptr + part[:, :, None] * DV_P + dv[None, None, :], mask=acc_mask, other=0.0)
    out = tl.sum(w_s[:, :, None] * acc, axis=1)  # (G_P, DV_P)
    vmask = (j < T)[:, None] & (dv < DV)[None, :]
    values = tl.load(tv_ptr + bh * T * DV + j[:, None] * DV + dv[None, :], mask=vmask, other=0.0)
    out += tl.sum(p[:, :, None] * values.to(tl.float32)[None, :, :], axis=1)
    out = out / tl.where(total > 0.0, total, 1.0)[:, None]
    omask = (g < G)[:, None] & (dv < DV)[None, :]
    tl.store(out_ptr + (bh * G + g[:, None]) * DV + dv[None, :], out, mask=omask)
