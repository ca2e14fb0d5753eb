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
- values: the softmax weights times the value magnitudes are summed per entry
  (scatter-add into an (H_q, E) matrix), then one small matmul with the value entries.
The plain reading (:func:`attend_materialized`: decode every token, re-apply RoPE with the
model's rotary, sdpa) is kept as ``decode_attention: materialize`` and is what the tests
compare the codebook attention against.
"""

from __future__ import annotations

import functools
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from methods.cache.codebook_layer import CodebookLayer

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
        layer.attending = True
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
    scaling = module.scaling if scaling is None else scaling
    softcap = kwargs.get("softcap")
    if layer.fast and query.shape[2] == 1 and _all_visible(attention_mask):
        return attend_codebook(layer, query, scaling, softcap), None
    return attend_materialized(layer, query, attention_mask, scaling, softcap), None


def _all_visible(mask: torch.Tensor | None) -> bool:
    if mask is None:
        return True
    return bool(mask.all()) if mask.dtype == torch.bool else bool((mask == 0).all())


def attend_codebook(
    layer: CodebookLayer, query: torch.Tensor, scaling: float, softcap: float | None
) -> torch.Tensor:
    """One query token (B, H_q, 1, D) over the codebooks and the newest tokens: (B, 1, H_q, D)."""
    batch, q_heads, _, _ = query.shape
    key_book, value_book = layer.key_book, layer.value_book
    heads = layer.positions.shape[1]
    q = query.reshape(batch, heads, q_heads // heads, query.shape[-1])  # (B, H, g, D)
    logits = key_logits(layer, q)  # (B, H, g, N)
    if key_book.magnitudes is not None:
        logits = logits * key_book.magnitudes.unsqueeze(2)
    new_keys, new_values = layer.tail()
    logits = torch.cat([logits, q @ new_keys.transpose(-1, -2)], dim=-1) * scaling
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    probs = logits.float().softmax(dim=-1).to(value_book.entries.dtype)
    stored = layer.positions.shape[-1]
    weights = probs[..., :stored]
    if value_book.magnitudes is not None:
        weights = weights * value_book.magnitudes.unsqueeze(2)
    per_entry = weights.new_zeros(*weights.shape[:-1], value_book.entries.shape[0])
    refs = value_book.refs.long().unsqueeze(2).expand_as(weights)
    per_entry.scatter_add_(-1, refs, weights)
    out = per_entry @ value_book.entries + probs[..., stored:] @ new_values  # (B, H, g, Dv)
    return out.reshape(batch, q_heads, 1, -1).transpose(1, 2)


def key_logits(layer: CodebookLayer, q: torch.Tensor) -> torch.Tensor:
    """``q . rope(entry, position)`` for every stored token, (B, H, g, N), for queries q
    (B, H, g, D): the tokens' entries and their positions' RoPE rows ``[c | s]`` are gathered;
    with ``[a | b]`` an entry and ``[x | y]`` a query (halves), the logit is
    ``sum c (x a + y b) + s (y a - x b)``, summed over the half dims. One query per stored head
    (head repeat) computes that in place; several (a KV head's group) rotate the entries once
    and share them through a matmul."""
    book = layer.key_book
    refs = book.refs
    entries = book.entries.index_select(0, refs.flatten()).view(*refs.shape, -1)
    rows = layer.table.rows(layer.positions, book.entries, layer.last_position)
    half = entries.shape[-1] // 2
    cos, sin = rows[..., :half], rows[..., half:]
    first, second = entries[..., :half], entries[..., half:]
    if q.shape[2] == 1:
        x, y = q[..., :half], q[..., half:]  # (B, H, 1, D/2): broadcast over the tokens
        along = first * x
        along.addcmul_(second, y)
        across = first * y
        across.addcmul_(second, x, value=-1)
        along.mul_(cos).addcmul_(across, sin)
        return along.sum(dim=-1).unsqueeze(2)
    rotated = torch.empty_like(entries)
    torch.mul(first, cos, out=rotated[..., :half]).addcmul_(second, sin, value=-1)
    torch.mul(second, cos, out=rotated[..., half:]).addcmul_(first, sin)
    return q @ rotated.transpose(-1, -2)


def attend_materialized(
    layer: CodebookLayer,
    query: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None,
) -> torch.Tensor:
    """The plain reading: every stored token decoded (RoPE re-applied with the model's own
    rotary), each stored head's keys given to its query heads, then attention. (B, q, H_q, D)."""
    keys, values = layer.materialized()
    groups = query.shape[1] // keys.shape[1]
    keys = keys.repeat_interleave(groups, dim=1)
    values = values.repeat_interleave(groups, dim=1)
    if softcap:
        logits = query @ keys.transpose(-1, -2) * scaling
        logits = torch.tanh(logits / softcap) * softcap
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attention_mask, float("-inf"))
        elif attention_mask is not None:
            logits = logits + attention_mask
        out = logits.float().softmax(dim=-1).to(values.dtype) @ values
    else:
        out = F.scaled_dot_product_attention(
            query, keys, values, attn_mask=attention_mask, scale=scaling
        )
    return out.transpose(1, 2).contiguous()
