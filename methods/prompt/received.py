"""Attention received by every token of a prompt, from one layer's prefill: DAC's column sum.

``A_j = sum over query rows i and query heads h of softmax_j(q_i . k_j * scaling)``, the
column sums of the layer's causal attention matrix (what the authors' code reads from
``output_attentions`` with eager attention, for every layer and head at once). The model
itself runs with sdpa, which never materialises the probabilities; this module recomputes
them block by block, as cheaply as it can while giving the same column sums:

- ``query_chunk`` query rows at a time, and each block only against the keys it can see
  (keys ``0 .. end`` of a causal layer, ``start - window + 1 .. end`` of a sliding-window
  layer): the masked upper triangle is never computed, which halves the work;
- the scaling is folded into the queries (a (q, D) multiply, not a (q, S) one), and only
  the block's diagonal square (and a sliding layer's band) is masked, in place;
- GQA without copies: the ``G`` query heads of a group are stacked against their KV head;
- the queries are the layer's own ``q_proj`` output when the caller captured it (a forward
  hook on ``q_proj``: :class:`methods.prompt.compressor.Compressor`), not a second projection.

Probabilities are float32, as eager attention's softmax. Batch size 1 (the compressor
scores one sequence at a time).
"""

from __future__ import annotations

import torch
from torch import nn

from methods.cache.attention import layer_rope, query_states


def attention_received(
    module: nn.Module,
    hidden_states: torch.Tensor,
    keys: torch.Tensor,
    kwargs: dict,
    query_chunk: int,
    projected: torch.Tensor | None = None,
) -> torch.Tensor:
    """Column sums (S,) float32 of the causal attention of a prefill of S tokens.

    hidden_states (1, S, hidden) is the layer's input, keys (1, H_kv, S, D) its post-RoPE
    keys (from a cache that keeps all S of them), kwargs the layer's call kwargs (for the
    RoPE cos/sin), ``projected`` the layer's ``q_proj`` output if the caller captured it
    (else it is recomputed). Sliding window and logit soft-capping are applied where the
    layer has them.
    """
    cos, sin = layer_rope(module, kwargs)
    queries = query_states(module, hidden_states, cos, sin, projected)  # (1, H_q, S, D)
    _, kv_heads, seq_len, head_dim = keys.shape
    if hidden_states.shape[0] != 1 or hidden_states.shape[1] != seq_len:
        raise ValueError("attention_received scores one prefill: batch 1, all keys are queries")
    groups = queries.shape[1] // kv_heads
    queries = (queries.float() * module.scaling).view(kv_heads, groups, seq_len, head_dim)
    keys_t = keys[0].float().transpose(-1, -2)  # (H_kv, D, S)
    window = getattr(module, "sliding_window", None) or seq_len
    softcap = getattr(module, "attn_logit_softcapping", None)
    total = torch.zeros(kv_heads, groups, seq_len, dtype=torch.float32, device=keys.device)
    for start in range(0, seq_len, query_chunk):
        end = min(start + query_chunk, seq_len)
        low = max(0, start - window + 1)
        size = end - start  # the group's queries stacked: one (G c, D) @ (D, S') per KV head
        block = queries[:, :, start:end].reshape(kv_heads, groups * size, head_dim)
        logits = torch.bmm(block, keys_t[..., low:end]).view(kv_heads, groups, size, end - low)
        if softcap:
            logits.div_(softcap).tanh_().mul_(softcap)
        if end <= window:  # every key up to the diagonal is visible: mask the square only
            square = logits[..., start - low :]
            square.masked_fill_(_future(size, keys.device), float("-inf"))
        else:
            logits.masked_fill_(_hidden(start, end, low, window, keys.device), float("-inf"))
        total[..., low:end] += logits.softmax(dim=-1).sum(dim=-2)
    return total.sum(dim=(0, 1))


def _future(size: int, device: torch.device) -> torch.Tensor:
    """The strict upper triangle of a (size, size) square: keys after their query."""
    return torch.ones(size, size, dtype=torch.bool, device=device).triu(1)


def _hidden(start: int, end: int, low: int, window: int, device: torch.device) -> torch.Tensor:
    """Which keys ``low .. end - 1`` queries ``start .. end - 1`` may not see, (c, end - low)
    bool: those after the query, and those ``window`` or more before it."""
    q_idx = torch.arange(start, end, device=device)[:, None]
    k_idx = torch.arange(low, end, device=device)[None, :]
    return (k_idx > q_idx) | (q_idx - k_idx >= window)
