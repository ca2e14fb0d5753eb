"""Attention probabilities recomputed from a layer's own projections, for scoring methods.

The attention implementation the model runs (sdpa, flash) never materialises the
probabilities, so the scorers recompute only the rows they need: the queries come from the
layer's ``q_proj`` (and ``q_norm`` where the model has one, e.g. Gemma-3, Qwen-3), RoPE from
the ``position_embeddings`` (cos, sin) the model passed to the layer, the keys from the
cache. Probabilities are computed in float32 with the layer's own ``scaling`` (Gemma-3's
``query_pre_attn_scalar``), soft-capping and sliding window where the layer has them.

GQA is handled without copying keys: the ``G = H_q / H_kv`` query heads of a group are
stacked against their shared KV head, and results are returned per group, (B, H_kv, G, ...).
RoPE is the rotate-half form of Llama, Mistral, Qwen and Gemma (the full head dim rotated).

A method that needs the attention of every query (H2O) does not recompute it: inside
:func:`attention_override` the layers run :func:`attention_and_received`, which produces the
layer's output and the attention each key received in one pass.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface

from methods.base import MethodConfigError


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., N, D) rotated by cos/sin broadcastable to it."""
    return x * cos + rotate_half(x) * sin


def undo_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`apply_rope` (also where cos/sin carry an attention scaling factor)."""
    return (x * cos - rotate_half(x) * sin) / (cos * cos + sin * sin)


def layer_rope(module: nn.Module, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The (cos, sin) this layer applies: its own, when it defines ``position_embeddings``
    (KV-Latent's reduced-dim attention), else the model's shared ``position_embeddings``."""
    own = getattr(module, "position_embeddings", None)
    if callable(own) and kwargs.get("position_ids") is not None:
        shared_cos, _ = kwargs["position_embeddings"]
        return own(kwargs["position_ids"], shared_cos.dtype)
    return kwargs["position_embeddings"]


def query_states(
    module: nn.Module,
    hidden_states: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    projected: torch.Tensor | None = None,
) -> torch.Tensor:
    """Post-RoPE queries (B, H_q, q, D) of hidden_states (B, q, hidden); cos/sin (B, q, D).
    ``projected``: ``module.q_proj(hidden_states)`` when the caller captured it already."""
    if not hasattr(module, "q_proj"):
        raise MethodConfigError(
            f"{type(module).__name__} has no `q_proj`: the attention-scoring cache methods need "
            "a Llama-style attention module (separate q/k/v projections)"
        )
    batch, q_len, _ = hidden_states.shape
    if projected is None:
        projected = module.q_proj(hidden_states)
    queries = projected.view(batch, q_len, -1, module.head_dim).transpose(1, 2)
    if hasattr(module, "q_norm"):
        queries = module.q_norm(queries)
    if cos.shape[-1] != queries.shape[-1]:
        raise MethodConfigError(
            f"{type(module).__name__} applies RoPE to {cos.shape[-1]} of {queries.shape[-1]} "
            "dims (partial rotary): not supported by the attention-scoring cache methods"
        )
    return apply_rope(queries, cos.unsqueeze(1), sin.unsqueeze(1))


def attention_probs(
    module: nn.Module,
    hidden_states: torch.Tensor,
    keys: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    first_query: int,
) -> torch.Tensor:
    """Causal attention probabilities of q queries over S keys, (B, H_kv, G, q, S), float32.

    hidden_states (B, q, hidden) and position_embeddings (cos, sin), each (B, q, D), belong to
    the queries at key indices ``first_query .. first_query + q - 1``; keys (B, H_kv, S, D) are
    post-RoPE (as cached). Key j is visible to query i when j <= i (and i - j < window on a
    sliding-window layer, as long as key indices are positions, i.e. before eviction).
    """
    cos, sin = position_embeddings
    queries = query_states(module, hidden_states, cos, sin)
    batch, kv_heads, seq_len, head_dim = keys.shape
    q_len = hidden_states.shape[1]
    groups = queries.shape[1] // kv_heads
    queries = queries.reshape(batch, kv_heads, groups * q_len, head_dim).float()
    logits = queries @ keys.float().transpose(-1, -2) * module.scaling
    softcap = getattr(module, "attn_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits.view(batch, kv_heads, groups, q_len, seq_len)
    q_idx = torch.arange(first_query, first_query + q_len, device=keys.device).unsqueeze(1)
    k_idx = torch.arange(seq_len, device=keys.device).unsqueeze(0)
    hidden = k_idx > q_idx
    window = getattr(module, "sliding_window", None)
    if window:
        hidden |= q_idx - k_idx >= window
    return logits.masked_fill(hidden, float("-inf")).softmax(dim=-1)


def window_attention(
    module: nn.Module, hidden_states: torch.Tensor, keys: torch.Tensor, kwargs: dict, window: int
) -> torch.Tensor:
    """Attention of the prompt's last ``window`` queries over all its S keys (prefill):
    (B, H_kv, G, window, S). hidden_states (B, S, hidden), keys (B, H_kv, S, D)."""
    cos, sin = layer_rope(module, kwargs)
    seq_len = keys.shape[-2]
    return attention_probs(
        module,
        hidden_states[:, -window:],
        keys,
        (cos[:, -window:], sin[:, -window:]),
        first_query=seq_len - window,
    )


def accumulated_attention(
    module: nn.Module,
    hidden_states: torch.Tensor,
    keys: torch.Tensor,
    kwargs: dict,
    chunk_size: int,
) -> torch.Tensor:
    """Attention each key receives, summed over the q queries of hidden_states (B, q, hidden)
    and over the query heads of its group: (B, H_kv, S), float32. The queries are the last q
    of the S keys (all of the prompt at prefill, the new tokens when decoding); they are
    processed ``chunk_size`` at a time, so memory stays O(chunk_size * S * H_q).

    A sliding-window layer holds fewer keys than the prompt has queries (its last
    ``window - 1``): the queries before the held keys see none of them and are skipped."""
    cos, sin = layer_rope(module, kwargs)
    seq_len, q_len = keys.shape[-2], hidden_states.shape[1]
    total = keys.new_zeros(keys.shape[:-1], dtype=torch.float32)
    for start in range(max(0, q_len - seq_len), q_len, chunk_size):
        end = min(start + chunk_size, q_len)
        probs = attention_probs(
            module,
            hidden_states[:, start:end],
            keys,
            (cos[:, start:end], sin[:, start:end]),
            first_query=seq_len - q_len + start,
        )
        total += probs.sum(dim=(2, 3))
    return total


def pool(scores: torch.Tensor, kernel_size: int, mode: str) -> torch.Tensor:
    """Smooth scores (..., S) along the tokens with a stride-1, same-length 1-D pooling
    (SnapKV's clustering step); ``mode`` is ``max``, ``avg`` or ``none``."""
    if mode == "none" or kernel_size <= 1 or scores.shape[-1] == 0:
        return scores
    shape = scores.shape
    flat = scores.reshape(-1, 1, shape[-1])
    pad = kernel_size // 2
    if mode == "max":
        flat = F.max_pool1d(flat, kernel_size, stride=1, padding=pad)
    else:
        flat = F.avg_pool1d(flat, kernel_size, stride=1, padding=pad)
    return flat.reshape(shape)


def attention_and_received(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scaling: float,
    attention_mask: torch.Tensor | None = None,
    softcap: float | None = None,
    chunk_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's attention output and the attention each key received, in one pass.

    query (B, H_q, q, D) post-RoPE, the queries of the last q of the S keys; key (B, H_kv, S,
    D) and value (B, H_kv, S, D_v) as cached. Returns the output (B, q, H_q, D_v), the layout
    transformers' attention functions return, and (B, H_kv, S) float32: the probabilities
    each key gets, summed over the q queries and the G query heads of its group (what
    :func:`accumulated_attention` recomputes from the layer's projections). Probabilities are
    float32. Without ``attention_mask`` attention is causal (key j visible to query i when
    j <= S - q + i) and a chunk of ``chunk_size`` queries reads only the keys it can see; with
    one (boolean, True = attend, or additive; (B or 1, 1, q, >= S)) it is applied as given.
    """
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads, seq_len = key.shape[1], key.shape[2]
    groups = q_heads // kv_heads
    keys, values = key.float(), value.float()
    if q_len == 1 and attention_mask is None:  # a decoding step: one row per query head
        grouped = query.reshape(batch, kv_heads, groups, head_dim).float() * scaling
        probs = _capped(grouped @ keys.transpose(-1, -2), softcap).softmax(-1)  # (B, H_kv, G, S)
        output = (probs @ values).to(query.dtype).view(batch, 1, q_heads, -1)
        return output, probs.sum(dim=2)
    grouped = query.view(batch, kv_heads, groups, q_len, head_dim)
    output = query.new_empty((batch, q_len, kv_heads, groups, value.shape[-1]))
    received = torch.zeros((batch, kv_heads, seq_len), dtype=torch.float32, device=key.device)
    offset = seq_len - q_len  # key index of the first query
    for start in range(0, q_len, chunk_size):
        end = min(start + chunk_size, q_len)
        size, visible = end - start, offset + end if attention_mask is None else seq_len
        chunk = grouped[:, :, :, start:end].reshape(batch, kv_heads, groups * size, head_dim)
        logits = _capped(
            (chunk.float() * scaling) @ keys[:, :, :visible].transpose(-1, -2), softcap
        )
        logits = logits.view(batch, kv_heads, groups, size, visible)
        if attention_mask is not None:
            mask = attention_mask[:, :, start:end, :visible].unsqueeze(1)
            if mask.dtype == torch.bool:
                logits.masked_fill_(~mask, float("-inf"))
            else:
                logits += mask
        elif size > 1:  # the diagonal block: query i sees the keys up to its own index
            hidden = torch.ones(size, size, dtype=torch.bool, device=key.device).triu_(1)
            logits[..., offset + start :].masked_fill_(hidden, float("-inf"))
        probs = logits.view(batch, kv_heads, groups * size, visible).softmax(dim=-1)
        received[..., :visible] += probs.sum(dim=2)
        out = (probs @ values[:, :, :visible]).view(batch, kv_heads, groups, size, -1)
        output[:, start:end] = out.permute(0, 3, 1, 2, 4)
    return output.view(batch, q_len, q_heads, -1), received


def _capped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Gemma-2-style soft-capping of the logits, where the layer has it (before any mask)."""
    return torch.tanh(logits / softcap) * softcap if softcap else logits


AttentionFunction = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
_OVERRIDE = "kvbench_override"
_overrides: dict[nn.Module, AttentionFunction] = {}


def _dispatch(module: nn.Module, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    return _overrides[module](module, *args, **kwargs)


@contextmanager
def attention_override(
    modules: list[nn.Module], attend: AttentionFunction, replace: bool = False
) -> Iterator[None]:
    """Inside the block, the attention modules in ``modules`` call ``attend(module, query,
    key, value, attention_mask, scaling=..., **kwargs) -> (output (B, q, H_q, D_v), None)``
    instead of the model's attention function (sdpa, eager, ...); restored on exit.

    transformers looks the function up by name (``module.config._attn_implementation``) in
    its :class:`AttentionInterface`, the documented extension point: kvbench registers one
    dispatching entry there (nothing existing is replaced) and gives each of these modules a
    copy of its config naming it. The model's own config, masks and other layers are left
    as they are. A module that is already overridden keeps its function (the first wins: a
    method's own attention over a generic one), unless ``replace`` (a captured decoding
    step's own attention, :mod:`harness.decode_graph`): then it is restored on exit.
    """
    AttentionInterface.register(_OVERRIDE, _dispatch)
    saved = []
    replaced = []
    try:
        for module in modules:
            if module in _overrides:
                if replace:
                    replaced.append((module, _overrides[module]))
                    _overrides[module] = attend
                continue
            config = copy.copy(module.config)
            config._attn_implementation_internal = _OVERRIDE
            saved.append((module, module.config))
            module.config = config
            _overrides[module] = attend
        yield
    finally:
        for module, config in saved:
            module.config = config
            _overrides.pop(module, None)
        for module, previous in replaced:
            _overrides[module] = previous
