"""The Triton kernels of :mod:`methods.cache.h2o_kernels` (see there), in their own module
so that they are defined (jitted, or interpreted under ``TRITON_INTERPRET=1``) only when
that module first imports this one."""

import os

import triton
import triton.language as tl

# tl.max and tl.sum reduce with these; the kernels call tl.reduce with them directly (the
# same reduction): tl.max, tl.sum and tl.zeros are themselves jitted, so Triton's
# interpreter cannot run them when triton was imported before TRITON_INTERPRET=1 was set
# (torch imports it), as in the test suite, while tl.reduce and tl.full are interpreted
from triton.language.standard import _elementwise_max, _sum_combine

# whether these kernels were defined for Triton's CPU interpreter
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@triton.jit
def dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b accumulated in float32: float32 inputs in IEEE float32 (not TF32); UPCAST
    (bfloat16 under the interpreter, whose dot does not take it) multiplies the values
    upcast to float32, the products the tensor cores form exactly from bfloat16."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def logits(q, k, scale, cap, SOFTCAP: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """Scaled (soft-capped) logits of a tile, in base 2: (BLOCK_M, BLOCK_N) float32."""
    s = dot(q, k, IEEE, UPCAST) * scale
    if SOFTCAP:  # cap * tanh(s / cap), tanh from exp (odd, stable for large |s|)
        e = tl.exp(-2.0 * tl.abs(s) / cap)
        t = (1.0 - e) / (1.0 + e)
        s = cap * tl.where(s < 0, -t, t)
    return s * 1.4426950408889634


@triton.jit
def forward_tile(
    q, K, V, k_base, v_base, sk_n, sv_n, start, rows, m_i, l_i, acc, scale, cap, offset, S_LEN,
    HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """The online-softmax update of a query block by keys ``start .. start + BLOCK_N``;
    MASKED: the tile crosses the causal diagonal or the last key (else all are visible)."""
    cols = start + tl.arange(0, BLOCK_N)
    dims, vdims = tl.arange(0, HEAD_DIM), tl.arange(0, V_DIM)
    inside = cols < S_LEN
    at = cols.to(tl.int64)
    k_at = K + k_base + at[None, :] * sk_n + dims[:, None]
    v_at = V + v_base + at[:, None] * sv_n + vdims[None, :]
    if MASKED:
        k = tl.load(k_at, mask=inside[None, :], other=0.0)
        v = tl.load(v_at, mask=inside[:, None], other=0.0)
    else:
        k, v = tl.load(k_at), tl.load(v_at)
    s = logits(q, k, scale, cap, SOFTCAP, IEEE, UPCAST)
    if MASKED:
        seen = (cols[None, :] <= offset + rows[:, None]) & inside[None, :]
        s = tl.where(seen, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.reduce(s, 1, _elementwise_max))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.reduce(p, 1, _sum_combine)
    acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, IEEE, UPCAST)
    return m_new, l_i, acc


@triton.jit
def forward(
    Q, K, V, Out, LSE, scale, cap, sq_b, sq_h, sq_m, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
    Q_LEN, S_LEN, H_Q: tl.constexpr, GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr,
    V_DIM: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One (query block, batch x query head): online softmax over the visible keys, the
    keys every query of the block sees first (no mask), then the diagonal's."""
    pid_m, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    b, h = bh // H_Q, bh % H_Q
    k_base = b * sk_b + h // GROUPS * sk_h  # the KV head of the query head's group
    v_base = b * sv_b + h // GROUPS * sv_h
    offset = S_LEN - Q_LEN  # key index of the first query
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims, vdims = tl.arange(0, HEAD_DIM), tl.arange(0, V_DIM)
    q = tl.load(
        Q + b * sq_b + h * sq_h + rows.to(tl.int64)[:, None] * sq_m + dims[None, :],
        mask=rows[:, None] < Q_LEN,
        other=0.0,
    )
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.full((BLOCK_M,), 0.0, tl.float32)
    acc = tl.full((BLOCK_M, V_DIM), 0.0, tl.float32)
    # keys before `lo` are seen by every query of the block; the block's last sees `end - 1`
    lo = tl.minimum(offset + pid_m * BLOCK_M, S_LEN) // BLOCK_N * BLOCK_N
    end = tl.minimum(offset + (pid_m + 1) * BLOCK_M, S_LEN)
    for start in range(0, lo, BLOCK_N):
        m_i, l_i, acc = forward_tile(
            q, K, V, k_base, v_base, sk_n, sv_n, start, rows, m_i, l_i, acc, scale, cap,
            offset, S_LEN, HEAD_DIM, V_DIM, IEEE, UPCAST, SOFTCAP, BLOCK_N, False,
        )  # fmt: skip
    for start in range(lo, end, BLOCK_N):
        m_i, l_i, acc = forward_tile(
            q, K, V, k_base, v_base, sk_n, sv_n, start, rows, m_i, l_i, acc, scale, cap,
            offset, S_LEN, HEAD_DIM, V_DIM, IEEE, UPCAST, SOFTCAP, BLOCK_N, True,
        )  # fmt: skip
    # (B, q, H_q, D_v), the layout transformers' attention functions return
    out_rows = (b * Q_LEN + rows[:, None]) * H_Q + h
    tl.store(
        Out + out_rows * V_DIM + vdims[None, :],
        (acc / l_i[:, None]).to(Out.dtype.element_ty),
        mask=rows[:, None] < Q_LEN,
    )
    tl.store(LSE + bh * Q_LEN + rows, m_i + tl.log2(l_i), mask=rows < Q_LEN)


@triton.jit
def received_tile(
    Q, LSE, k, q_base, sq_m, lse_base, start, cols, total, scale, cap, offset, Q_LEN,
    HEAD_DIM: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """The probabilities queries ``start .. start + BLOCK_M`` give a block of keys, added
    to ``total``; MASKED: some of them do not see some of the keys. Rows past the last
    query read an infinite log-sum-exp: they add 0."""
    rows = start + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(
        Q + q_base + rows.to(tl.int64)[:, None] * sq_m + dims[None, :],
        mask=rows[:, None] < Q_LEN,
        other=0.0,
    )
    lse = tl.load(LSE + lse_base + rows, mask=rows < Q_LEN, other=float("inf"))
    p = tl.exp2(logits(q, k, scale, cap, SOFTCAP, IEEE, UPCAST) - lse[:, None])
    if MASKED:
        p = tl.where(cols[None, :] <= offset + rows[:, None], p, 0.0)
    return total + tl.reduce(p, 0, _sum_combine)


@triton.jit
def received(
    Q, K, LSE, R, scale, cap, sq_b, sq_h, sq_m, sk_b, sk_h, sk_n,
    Q_LEN, S_LEN, H_Q: tl.constexpr, GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One (key block, batch x KV head): the probabilities its keys receive, summed
    over the queries that see them and over the group's query heads."""
    pid_n, kv = tl.program_id(0), tl.program_id(1).to(tl.int64)  # kv: row of (B * H_kv)
    b, kv_head = kv // (H_Q // GROUPS), kv % (H_Q // GROUPS)
    offset = S_LEN - Q_LEN
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    k = tl.load(
        K + b * sk_b + kv_head * sk_h + cols.to(tl.int64)[None, :] * sk_n + dims[:, None],
        mask=cols[None, :] < S_LEN,
        other=0.0,
    )
    total = tl.full((BLOCK_N,), 0.0, tl.float32)
    # the query blocks from `first` see some of these keys, those from `mid` all of them
    first = tl.maximum(pid_n * BLOCK_N - offset, 0) // BLOCK_M * BLOCK_M
    mid = tl.maximum(pid_n * BLOCK_N + BLOCK_N - 1 - offset, 0)
    mid = tl.minimum((mid + BLOCK_M - 1) // BLOCK_M * BLOCK_M, Q_LEN)
    for g in range(GROUPS):
        h = kv_head * GROUPS + g  # the group's query heads follow each other
        q_base, lse_base = b * sq_b + h * sq_h, (b * H_Q + h) * Q_LEN
        for start in range(first, mid, BLOCK_M):
            total = received_tile(
                Q, LSE, k, q_base, sq_m, lse_base, start, cols, total, scale, cap, offset,
                Q_LEN, HEAD_DIM, IEEE, UPCAST, SOFTCAP, BLOCK_M, True,
            )  # fmt: skip
        for start in range(mid, Q_LEN, BLOCK_M):
            total = received_tile(
                Q, LSE, k, q_base, sq_m, lse_base, start, cols, total, scale, cap, offset,
                Q_LEN, HEAD_DIM, IEEE, UPCAST, SOFTCAP, BLOCK_M, False,
            )  # fmt: skip
    tl.store(R + kv * S_LEN + cols, total, mask=cols < S_LEN)
