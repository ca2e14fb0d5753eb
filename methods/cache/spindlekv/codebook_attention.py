"""Attention over SpindleKV's codebook cache, as an attention implementation of transformers.

transformers picks each attention module's kernel by name from its ``AttentionInterface``
(``config._attn_implementation``); :func:`register` adds ``kvbench_codebook_over_<base>``,
which attends over a :class:`CodebookLayer` where one is bound to the module for the current
call (:func:`bind`, from SpindleKV's pre-forward hook) and hands every other call, unchanged,
to the model's own kernel (``base``, e.g. sdpa), with the base's masks. Nothing of
transformers is replaced; SpindleKV selects the implementation with
``model.set_attn_implementation`` while it is applied and restores the previous one after.

Decoding one token (:func:`attend_codebook`), no decoded token is kept:
- keys (:func:`key_logits`): each stored token's entry and its position's tabulated RoPE row
  are gathered and scored against the query without applying the magnitude, then scaled by
  it (RoPE is linear: ``q . rope(m c) = m (q . rope(c))``);
- values (:func:`weighted_entries`): the softmax weights times the value magnitudes are
  summed into their entries' rows and multiplied by them in one fused kernel.
That is ``decode_attention: codebook``; ``fused`` (the default) does the same in one C++
pass per KV head on a CPU (:func:`attend_fused`, ``methods.cache.spindlekv.codebook_kernels``) and by
Triton kernels on a GPU (``methods.cache.spindlekv.codebook_triton``; the layer's ``kernel`` is then
``triton``, as SpindleKV resolved it when applied). The plain
reading (:func:`attend_materialized`: decode every token, re-apply RoPE with the model's
rotary, sdpa) is kept as ``decode_attention: materialize`` and is what the tests compare
the other two against.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from methods.cache.spindlekv import codebook_kernels, codebook_triton
from methods.cache.spindlekv.codebook_layer import CodebookLayer

PREFIX = "kvbench_codebook_over_"
_BOUND: weakref.WeakKeyDictionary[nn.Module, CodebookLayer] = weakref.WeakKeyDictionary()


def register(base: str) -> str:
    """The name of the codebook attention over the ``base`` implementation (registered with
    transformers' attention and mask interfaces on first use)."""
    if base.startswith(PREFIX):
        return base
    name = PREFIX + base
    if name not in ALL_ATTENTION_FUNCTIONS:
        fallback = ALL_ATTENTION_FUNCTIONS[base]
        AttentionInterface.register(name, functools.partial(codebook_attention, fallback=fallback))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def bind(module: nn.Module, layer: CodebookLayer | None) -> None:
    """Make ``module``'s next attention read ``layer`` (None: the model's own kernel)."""
    previous = _BOUND.pop(module, None)
    if previous is not None:
        previous.attending = False
    if layer is not None:
        layer.attending, layer.served = True, False
        _BOUND[module] = layer


def codebook_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    *,
    fallback,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature; ``key``/``value`` are the newest tokens only when
    a codebook layer is bound (the layer's ``update`` returned just those)."""
    layer = _BOUND.get(module)
    if layer is None or not layer.attending:
        return fallback(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    layer.served = True
    scaling = module.scaling if scaling is None else scaling
    softcap = kwargs.get("softcap")
    visible = _all_visible(attention_mask)
    if layer.kernel != "materialize" and query.shape[2] == 1 and visible:
        book = layer.key_book.entries
        if layer.kernel == "triton":
            return attend_fused(layer, query, scaling, softcap, codebook_triton.attend), None
        if layer.kernel == "fused" and codebook_kernels.supported(query, book):
            return attend_fused(layer, query, scaling, softcap), None
        return attend_codebook(layer, query, scaling, softcap), None
    mask = None if visible else attention_mask  # (a mask sized for another layer's cache)
    return attend_materialized(layer, query, mask, scaling, softcap), None


def _all_visible(mask: torch.Tensor | None) -> bool:
    if mask is None:
        return True
    return bool(mask.all()) if mask.dtype == torch.bool else bool((mask == 0).all())


def attend_codebook(
    layer: CodebookLayer, query: torch.Tensor, scaling: float, softcap: float | None
) -> torch.Tensor:
    """One query token (B, H_q, 1, D) over the codebooks and the newest tokens: (B, 1, H_q, D).
    Query head h reads KV head ``h // G``'s slots, those its copy keeps (``layer.heads``)."""
    batch, q_heads, _, dim = query.shape
    key_book, value_book = layer.key_book, layer.value_book
    kv_heads, slots = layer.positions.shape[1:]
    q = query.reshape(batch, kv_heads, q_heads // kv_heads, dim) * scaling  # (B, H_kv, G, D)
    logits = key_logits(layer, q)  # (B, H_kv, G, U)
    if key_book.magnitudes is not None:
        logits = logits * key_book.magnitudes.unsqueeze(2)
    logits = torch.cat([logits, q @ layer.keys.transpose(-1, -2)], dim=-1)
    if softcap:  # before the mask: tanh(-inf) would make a hidden slot visible
        logits = torch.tanh(logits / softcap) * softcap
    if layer.heads is not None:  # a query head sees only the tokens its copy keeps
        logits[..., :slots] = torch.where(layer.heads, logits[..., :slots], float("-inf"))
    probs = logits.float().softmax(dim=-1).to(value_book.entries.dtype)
    weights = probs[..., :slots]
    if value_book.magnitudes is not None:
        weights = weights * value_book.magnitudes.unsqueeze(2)
    out = weighted_entries(value_book.refs, weights, value_book.entries)  # (B, H_kv, G, Dv)
    out = out + probs[..., slots:] @ layer.values
    return out.reshape(batch, q_heads, 1, -1).transpose(1, 2)


def attend_fused(
    layer: CodebookLayer,
    query: torch.Tensor,
    scaling: float,
    softcap: float | None,
    kernel: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """:func:`attend_codebook` by a fused kernel, (B, 1, H_q, Dv): the C++ one
    (:func:`methods.cache.spindlekv.codebook_kernels.attend`) or ``kernel``, which takes the same
    arguments (:func:`methods.cache.spindlekv.codebook_triton.attend`)."""
    batch, q_heads, _, dim = query.shape
    key_book, value_book = layer.key_book, layer.value_book
    kv_heads = layer.positions.shape[1]
    q = query.reshape(batch, kv_heads, q_heads // kv_heads, dim) * scaling  # (B, H_kv, G, D)
    kernel = codebook_kernels.attend if kernel is None else kernel
    out = kernel(
        q, key_book.entries, key_book.refs, key_book.magnitudes,
        layer.table.upto(layer.last_position, key_book.entries), layer.positions, layer.heads,
        value_book.entries, value_book.refs, value_book.magnitudes, layer.keys, layer.values,
        softcap,
    )  # fmt: skip
    return out.to(query.dtype).reshape(batch, q_heads, 1, -1).transpose(1, 2)


def key_logits(layer: CodebookLayer, q: torch.Tensor) -> torch.Tensor:
    """``q . rope(entry, position)`` for every slot, (B, H_kv, G, U), for queries q
    (B, H_kv, G, D): the slots' entries and their positions' RoPE rows ``[c | s]`` are
    gathered, the entries rotated (``[a c - b s, b c + a s]`` for halves ``[a | b]``) into one
    buffer, then one matmul with the G query heads that share the KV head."""
    book = layer.key_book
    refs = book.refs
    entries = book.entries.index_select(0, refs.flatten()).view(*refs.shape, -1)
    rows = layer.table.rows(layer.positions, book.entries, layer.last_position)
    half = entries.shape[-1] // 2
    cos, sin = rows[..., :half], rows[..., half:]
    first, second = entries[..., :half], entries[..., half:]
    rotated = torch.empty_like(entries)
    torch.mul(first, cos, out=rotated[..., :half]).addcmul_(second, sin, value=-1)
    torch.mul(second, cos, out=rotated[..., half:]).addcmul_(first, sin)
    return q @ rotated.transpose(-1, -2)


def weighted_entries(
    refs: torch.Tensor, weights: torch.Tensor, entries: torch.Tensor
) -> torch.Tensor:
    """``sum_j weights[..., j] * entries[refs[..., j]]`` for refs (B, H, U) and weights
    (B, H, G, U): (B, H, G, D). The softmax weights are summed into the codebook rows and
    multiplied by them in one fused kernel (``embedding_bag``, one bag per query head), so
    no (U, D) tensor is written; the profile (BENCHMARKS.md) showed a scatter-add into an
    (H_q, E) matrix followed by a matmul cost 20x more on this 2-core CPU."""
    batch, heads, groups, n = weights.shape
    index = refs.unsqueeze(2).expand(batch, heads, groups, n).reshape(-1)
    offsets = torch.arange(0, index.numel(), n, dtype=index.dtype, device=index.device)
    out = F.embedding_bag(
        index, entries, offsets, mode="sum", per_sample_weights=weights.reshape(-1)
    )
    return out.view(batch, heads, groups, -1)


def attend_materialized(
    layer: CodebookLayer,
    query: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None,
) -> torch.Tensor:
    """The plain reading: every slot decoded (RoPE re-applied with the model's own rotary),
    each KV head's keys given to its query heads, each query head masked to the tokens its
    copy keeps, then attention. (B, q, H_q, D)."""
    keys, values, heads = layer.materialized()
    groups = query.shape[1] // keys.shape[1]
    keys = keys.repeat_interleave(groups, dim=1)
    values = values.repeat_interleave(groups, dim=1)
    mask = attention_mask
    if mask is not None and mask.dtype != torch.bool:
        mask = mask == 0
    if heads is not None:  # (B, H_kv, G or 1, U+t): 1 when all copies see the same slots
        heads = heads.expand(-1, -1, groups, -1)
        visible = heads.flatten(1, 2).unsqueeze(2)  # (B, H_q, 1, U+t)
        mask = visible if mask is None else mask & visible
    if softcap:
        logits = query @ keys.transpose(-1, -2) * scaling
        logits = torch.tanh(logits / softcap) * softcap
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        out = logits.float().softmax(dim=-1).to(values.dtype) @ values
    else:
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous()
