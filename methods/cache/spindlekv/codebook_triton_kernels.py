"""The Triton kernels of SpindleKV's codebook decode attention (``methods.cache.spindlekv.codebook_triton``
launches them and says when they can run). Imported only once Triton is known to be
importable: the ``@triton.jit`` decorator reads ``TRITON_INTERPRET`` when this module loads.

Flash-decoding over the codebook slots: :func:`slots_kernel` runs one program per (KV head,
split of its slots), each an online softmax over blocks of ``BLOCK_U`` slots (entries and
RoPE rows gathered by ref and position, rotated in registers, scored by the group's query
heads, masked per query head, values gathered by ref); :func:`join_kernel` runs one program
per KV head, scores the newest not-yet-folded tokens and joins them with the splits' partial
softmaxes. :func:`match_kernel` and :func:`open_kernel` are the decoding step's codebook
match. Everything is computed in float32 (dots in IEEE float32, not TF32) whatever the
storage dtype.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _softcap(x, cap):
    """``tanh(x / cap) * cap`` from exp alone (tanh is not in every Triton backend)."""
    return (1.0 - 2.0 / (tl.exp(2.0 * (x / cap)) + 1.0)) * cap


@triton.jit
def _queries(q_ptr, bh, G, D, G_P: tl.constexpr, D_P: tl.constexpr):
    """The G query heads of KV head ``bh`` (B*H_kv, G, D): (G_P, D_P) float32, zero-padded."""
    g = tl.arange(0, G_P)
    d = tl.arange(0, D_P)
    mask = (g < G)[:, None] & (d < D)[None, :]
    return tl.load(q_ptr + bh * G * D + g[:, None] * D + d[None, :], mask=mask, other=0.0)


@triton.jit
def slots_kernel(
    q_ptr, kent_ptr, krefs_ptr, kmag_ptr, table_ptr, pos_ptr, heads_ptr,
    vent_ptr, vrefs_ptr, vmag_ptr, m_ptr, l_ptr, acc_ptr,
    H, U, G, D, DV, per_split, softcap,
    s_kr_b, s_kr_h, s_vr_b, s_vr_h, s_pos_b, s_pos_h,
    s_km_b, s_km_h, s_vm_b, s_vm_h, s_hd_b, s_hd_h, s_hd_g,
    HAS_KMAG: tl.constexpr, HAS_VMAG: tl.constexpr, HAS_HEADS: tl.constexpr,
    SOFTCAP: tl.constexpr, G_P: tl.constexpr, D_P: tl.constexpr, DV_P: tl.constexpr,
    BLOCK_U: tl.constexpr,
):  # fmt: skip
    """Partial softmax of KV head ``program_id(0)`` over its slots in split
    ``program_id(1)``: running max m, sum l (G_P,) and unnormalised values acc (G_P, DV_P).
    A block's keys are rotated in the full-dim layout (dim d pairs with d +- D/2), so that
    scores and values are two float32 dots (G_P, D_P, BLOCK_U at least 16 each)."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // H
    h = bh % H
    half = D // 2
    q = _queries(q_ptr, bh, G, D, G_P, D_P)
    g = tl.arange(0, G_P)
    d = tl.arange(0, D_P)
    dv = tl.arange(0, DV_P)
    first = d < half
    partner = tl.where(first, d + half, d - half)  # rotate-half RoPE's pairs
    sign = tl.where(first, -1.0, 1.0)
    angle = tl.where(first, d, d - half)  # the table row holds [cos | sin] of the first half
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
        rm = um[:, None] & (d < D)[None, :]
        entry = kent_ptr + kr[:, None] * D
        e = tl.load(entry + d[None, :], mask=rm, other=0.0).to(tl.float32)
        pair = tl.load(entry + partner[None, :], mask=rm, other=0.0).to(tl.float32)
        row = table_ptr + pos[:, None] * D + angle[None, :]
        cos = tl.load(row, mask=rm, other=0.0).to(tl.float32)
        sin = tl.load(row + half, mask=rm, other=0.0).to(tl.float32)
        keys = e * cos + sign[None, :] * pair * sin  # (BLOCK_U, D_P), at each slot's position
        logits = tl.dot(q, tl.trans(keys), input_precision="ieee")  # (G_P, BLOCK_U)
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
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        m_i = m_new
    part = bh * tl.num_programs(1) + split
    tl.store(m_ptr + part * G_P + g, m_i)
    tl.store(l_ptr + part * G_P + g, l_i)
    tl.store(acc_ptr + (part * G_P + g[:, None]) * DV_P + dv[None, :], acc)


@triton.jit
def join_kernel(
    q_ptr, tk_ptr, tv_ptr, m_ptr, l_ptr, acc_ptr, out_ptr,
    G, D, DV, T, S, softcap,
    SOFTCAP: tl.constexpr, G_P: tl.constexpr, D_P: tl.constexpr, DV_P: tl.constexpr,
    T_P: tl.constexpr,
):  # fmt: skip
    """KV head ``program_id(0)``: the newest tokens (B*H_kv, T, D) post-RoPE, seen by every
    query head, joined with the S splits' partial softmaxes; (G, DV) float32 written to out
    (0 for a query head that sees nothing, as the C++ kernel reports)."""
    bh = tl.program_id(0)
    q = _queries(q_ptr, bh, G, D, G_P, D_P)
    g = tl.arange(0, G_P)
    d = tl.arange(0, D_P)
    j = tl.arange(0, T_P)
    dv = tl.arange(0, DV_P)
    keys = tk_ptr + bh * T * D + j[:, None] * D + d[None, :]
    k = tl.load(keys, mask=(j < T)[:, None] & (d < D)[None, :], other=0.0).to(tl.float32)
    newest = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # (G_P, T_P): T is small
    if SOFTCAP:
        newest = _softcap(newest, softcap)
    m_i = tl.max(tl.where((j < T)[None, :], newest, float("-inf")), axis=1)
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    p = tl.where((j < T)[None, :], tl.exp(newest - m_safe[:, None]), 0.0)
    l_i = tl.sum(p, axis=1)
    vmask = (j < T)[:, None] & (dv < DV)[None, :]
    values = tl.load(tv_ptr + bh * T * DV + j[:, None] * DV + dv[None, :], mask=vmask, other=0.0)
    acc = tl.sum(p[:, :, None] * values.to(tl.float32)[None, :, :], axis=1)  # (G_P, DV_P)
    for s in range(0, S):  # the splits, one at a time (few registers)
        part = (bh * S + s) * G_P + g
        m_s = tl.load(m_ptr + part)
        m_new = tl.maximum(m_i, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        beta = tl.exp(m_s - m_safe)
        l_i = l_i * alpha + tl.load(l_ptr + part) * beta
        acc_s = tl.load(acc_ptr + part[:, None] * DV_P + dv[None, :])
        acc = acc * alpha[:, None] + acc_s * beta[:, None]
        m_i = m_new
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    omask = (g < G)[:, None] & (dv < DV)[None, :]
    tl.store(out_ptr + (bh * G + g[:, None]) * DV + dv[None, :], out, mask=omask)


@triton.jit
def match_kernel(
    v_ptr, table_ptr, pos_ptr, ent_ptr, owner_ptr, best_ptr, ref_ptr, keep_ptr, norm_ptr,
    count, D,
    HAS_TABLE: tl.constexpr, MAGNITUDES: tl.constexpr, HALF_P: tl.constexpr,
    BLOCK_E: tl.constexpr,
):  # fmt: skip
    """Group ``program_id(0)``'s new vector (row n of (N, D); post-RoPE with its position's
    table row when HAS_TABLE, taken back to pre-RoPE): its norm, the vector an entry would
    keep (its direction when MAGNITUDES, else as it is) and its own group's most similar of
    the first ``count`` entries, cosine and index (the first on ties; -inf: none). Entries
    without magnitudes are compared by direction. Only the group's rows are read."""
    n = tl.program_id(0)
    half = D // 2
    i = tl.arange(0, HALF_P)
    im = i < half
    x1 = tl.load(v_ptr + n * D + i, mask=im, other=0.0).to(tl.float32)
    x2 = tl.load(v_ptr + n * D + half + i, mask=im, other=0.0).to(tl.float32)
    if HAS_TABLE:  # undo RoPE (cos/sin may carry an attention scaling factor)
        pos = tl.load(pos_ptr + n).to(tl.int64)
        cos = tl.load(table_ptr + pos * D + i, mask=im, other=1.0).to(tl.float32)
        sin = tl.load(table_ptr + pos * D + half + i, mask=im, other=0.0).to(tl.float32)
        r = cos * cos + sin * sin
        x1, x2 = (x1 * cos + x2 * sin) / r, (x2 * cos - x1 * sin) / r
    norm = tl.sqrt(tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0))
    u1 = x1 / tl.maximum(norm, 1e-12)
    u2 = x2 / tl.maximum(norm, 1e-12)
    best = tl.full([], -float("inf"), tl.float32)
    ref = tl.full([], 0, tl.int32)
    for start in range(0, count, BLOCK_E):
        e = start + tl.arange(0, BLOCK_E)
        own = tl.load(owner_ptr + e, mask=e < count, other=-1) == n
        rows = ent_ptr + e.to(tl.int64)[:, None] * D + i[None, :]
        rm = own[:, None] & im[None, :]
        e1 = tl.load(rows, mask=rm, other=0.0).to(tl.float32)
        e2 = tl.load(rows + half, mask=rm, other=0.0).to(tl.float32)
        dot = tl.sum(e1 * u1[None, :], axis=1) + tl.sum(e2 * u2[None, :], axis=1)
        if not MAGNITUDES:  # raw centres: by direction
            length = tl.sqrt(tl.sum(e1 * e1, axis=1) + tl.sum(e2 * e2, axis=1))
            dot = dot / tl.maximum(length, 1e-12)
        dot = tl.where(own, dot, -float("inf"))
        top = tl.max(dot, axis=0)
        at = tl.argmax(dot, axis=0, tie_break_left=True)
        ref = tl.where(top > best, start + at, ref)
        best = tl.maximum(best, top)
    tl.store(best_ptr + n, best)
    tl.store(ref_ptr + n, ref)
    tl.store(norm_ptr + n, norm)
    if MAGNITUDES:
        x1, x2 = u1, u2
    tl.store(keep_ptr + n * D + i, x1, mask=im)
    tl.store(keep_ptr + n * D + half + i, x2, mask=im)


@triton.jit
def open_kernel(
    best_ptr, ref_ptr, keep_ptr, ent_ptr, owner_ptr, refs_ptr, made_ptr, N, count, D, theta,
    N_P: tl.constexpr, D_P: tl.constexpr,
):  # fmt: skip
    """One program over the N groups, in order: a vector whose best cosine does not exceed
    ``theta`` opens an entry, numbered from ``count`` in group order (its vector and owner
    written there); each vector's entry (N,) int32 and how many were made."""
    n = tl.arange(0, N_P)
    nm = n < N
    best = tl.load(best_ptr + n, mask=nm, other=float("inf"))
    new = (best <= theta) & nm
    opened = new.to(tl.int32)
    slot = count + tl.cumsum(opened, axis=0) - opened  # entries opened by earlier groups
    ref = tl.where(new, slot, tl.load(ref_ptr + n, mask=nm, other=0))
    tl.store(refs_ptr + n, ref.to(tl.int32), mask=nm)
    d = tl.arange(0, D_P)
    wm = new[:, None] & (d < D)[None, :]
    keep = tl.load(keep_ptr + n[:, None] * D + d[None, :], mask=wm, other=0.0)
    rows = ent_ptr + slot.to(tl.int64)[:, None] * D + d[None, :]
    tl.store(rows, keep.to(ent_ptr.dtype.element_ty), mask=wm)
    tl.store(owner_ptr + slot, n, mask=new)
    tl.store(made_ptr, tl.sum(opened, axis=0))
