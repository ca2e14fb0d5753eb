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
def forward(
    Q, K, V, Out, LSE, scale, cap,
    Q_LEN, S_LEN, H_Q: tl.constexpr, GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr,
    V_DIM: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One (query block, batch x query head): online softmax over the visible keys."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H_Q, bh % H_Q
    kv = b * (H_Q // GROUPS) + h // GROUPS  # row of (B * H_kv)
    offset = S_LEN - Q_LEN  # key index of the first query
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims, vdims = tl.arange(0, HEAD_DIM), tl.arange(0, V_DIM)
    q = tl.load(
        Q + (bh * Q_LEN + rows[:, None]) * HEAD_DIM + dims[None, :],
        mask=rows[:, None] < Q_LEN,
        other=0.0,
    )
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.full((BLOCK_M,), 0.0, tl.float32)
    acc = tl.full((BLOCK_M, V_DIM), 0.0, tl.float32)
    end = tl.minimum(offset + (pid_m + 1) * BLOCK_M, S_LEN)
    for start in range(0, end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k = tl.load(
            K + (kv * S_LEN + cols[None, :]) * HEAD_DIM + dims[:, None],
            mask=cols[None, :] < S_LEN,
            other=0.0,
        )
        s = logits(q, k, scale, cap, SOFTCAP, IEEE, UPCAST)
        seen = (cols[None, :] <= offset + rows[:, None]) & (cols[None, :] < S_LEN)
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _elementwise_max))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.reduce(p, 1, _sum_combine)
        v = tl.load(
            V + (kv * S_LEN + cols[:, None]) * V_DIM + vdims[None, :],
            mask=cols[:, None] < S_LEN,
            other=0.0,
        )
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, IEEE, UPCAST)
        m_i = m_new
    # (B, q, H_q, D_v), the layout transformers' attention functions return
    out_rows = (b * Q_LEN + rows[:, None]) * H_Q + h
    tl.store(
        Out + out_rows * V_DIM + vdims[None, :],
        (acc / l_i[:, None]).to(Out.dtype.element_ty),
        mask=rows[:, None] < Q_LEN,
    )
    tl.store(LSE + bh * Q_LEN + rows, m_i + tl.log2(l_i), mask=rows < Q_LEN)


@triton.jit
def received(
    Q, K, LSE, R, scale, cap,
    Q_LEN, S_LEN, H_Q: tl.constexpr, GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One (key block, batch x KV head): the probabilities its keys receive, summed
    over the queries that see them and over the group's query heads."""
    pid_n, kv = tl.program_id(0), tl.program_id(1)
    offset = S_LEN - Q_LEN
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    k = tl.load(
        K + (kv * S_LEN + cols[None, :]) * HEAD_DIM + dims[:, None],
        mask=cols[None, :] < S_LEN,
        other=0.0,
    )
    total = tl.full((BLOCK_N,), 0.0, tl.float32)
    first = tl.maximum(pid_n * BLOCK_N - offset, 0)  # the first query that sees a key
    first = first // BLOCK_M * BLOCK_M
    for g in range(GROUPS):
        bh = kv * GROUPS + g  # row of (B * H_q): the group's query heads follow
        for start in range(first, Q_LEN, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            q = tl.load(
                Q + (bh * Q_LEN + rows[:, None]) * HEAD_DIM + dims[None, :],
                mask=rows[:, None] < Q_LEN,
                other=0.0,
            )
            lse = tl.load(LSE + bh * Q_LEN + rows, mask=rows < Q_LEN, other=float("inf"))
            s = logits(q, k, scale, cap, SOFTCAP, IEEE, UPCAST)
            seen = (cols[None, :] <= offset + rows[:, None]) & (rows[:, None] < Q_LEN)
            p = tl.where(seen, tl.exp2(s - lse[:, None]), 0.0)
            total += tl.reduce(p, 0, _sum_combine)
    tl.store(R + kv * S_LEN + cols, total, mask=cols < S_LEN)
