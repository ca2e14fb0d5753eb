"""KV-Latent surgery: attention modules with smaller query/key and value/output heads.

:func:`latent_surgery` replaces every decoder layer's ``self_attn`` by a
:class:`LatentAttention` built from the original module's weights by strided down-sampling
(KV-Latent, no SVD), with ``r_qk = head_dim / d_qk`` and ``r_vo = head_dim / d_vo``:

    q_proj.weight[::r_qk]  k_proj.weight[::r_qk]  v_proj.weight[::r_vo]  o_proj.weight[:, ::r_vo]

(biases likewise; Gemma-3's per-head ``q_norm``/``k_norm`` weights ``[::r_qk]``). Since
``head_dim`` is a multiple of ``r``, this keeps every r-th channel inside each head and the
rotate-half RoPE pairs together. With ``rope: frequency_matched`` (ours) the query/key rows
kept are instead the channels :func:`methods.model.rope.key_channels` picks in each head.
The module keeps ``layer_idx`` and writes its smaller keys (B, H_kv, S, d_qk) and values
(B, H_kv, S, d_vo) through ``past_key_values.update``, so the
cache stores the smaller heads and kvbench's measurements and cache hooks see them as they are.
Nothing in transformers is patched: only the model instance's modules are replaced.
"""

from __future__ import annotations

import copy
import importlib
import math
from collections.abc import Callable

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama import modeling_llama

from methods.base import MethodConfigError
from methods.model.layers import HeadShape, decoder_layers, layer_rope, new_linear
from methods.model.rope import key_channels, reduced_inv_freq, rope_cos_sin


def _eager_for(module: nn.Module) -> Callable:
    """The eager attention function of the module's own model family (Llama's otherwise)."""
    family = importlib.import_module(type(module).__module__)
    return getattr(family, "eager_attention_forward", modeling_llama.eager_attention_forward)


def _picked_norm(norm: nn.Module, channels: torch.Tensor) -> nn.Module:
    """A copy of a per-head RMSNorm keeping the weights of ``channels``."""
    norm = copy.deepcopy(norm)
    norm.weight = nn.Parameter(norm.weight.detach()[channels].clone(), requires_grad=False)
    return norm


def _head_rows(linear: nn.Linear, head_dim: int, channels: torch.Tensor) -> nn.Linear:
    """A copy of a q/k projection keeping the output rows ``channels`` of every head."""
    heads = linear.out_features // head_dim
    rows = (torch.arange(heads, device="cpu")[:, None] * head_dim + channels.cpu()[None]).reshape(
        -1
    )
    rows = rows.to(linear.weight.device)
    bias = None if linear.bias is None else linear.bias[rows]
    return new_linear(linear.weight[rows], bias)


class LatentAttention(nn.Module):
    """Self-attention with d_qk channels per query/key head and d_vo per value head.

    hidden (B, S, hidden) -> q (B, H, S, d_qk), k (B, H_kv, S, d_qk), v (B, H_kv, S, d_vo)
    -> attention (B, S, H * d_vo) -> o_proj -> (B, S, hidden). RoPE is computed here from the
    module's own ``inv_freq`` (d_qk/2,) and the ``position_ids`` the decoder layer passes
    (the model's shared rotary embedding has the full head dim). The attention scale is the
    original one times ``sqrt(head_dim / d_qk)``: 1/sqrt(d_qk) for the Llama family.
    ``key_channels`` (d_qk,): the query/key channels kept in each head (default ``[::r_qk]``).
    """

    def __init__(
        self,
        original: nn.Module,
        shape: HeadShape,
        d_qk: int,
        d_vo: int,
        inv_freq: torch.Tensor,
        rope_scaling: float,
        key_channels: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        r_qk, r_vo = shape.head_dim // d_qk, shape.head_dim // d_vo
        if key_channels is None:
            key_channels = torch.arange(0, shape.head_dim, r_qk, device="cpu")
        self.config = original.config
        self.layer_idx = original.layer_idx
        self.num_heads, self.num_key_value_heads = shape.num_heads, shape.num_kv_heads
        self.num_key_value_groups = shape.num_heads // shape.num_kv_heads
        self.d_qk, self.d_vo, self.head_dim = d_qk, d_vo, d_qk
        self.scaling = float(original.scaling) * math.sqrt(shape.head_dim / d_qk)
        self.is_causal = getattr(original, "is_causal", True)
        self.attention_dropout = getattr(original, "attention_dropout", 0.0)
        if hasattr(original, "sliding_window"):
            self.sliding_window = original.sliding_window
        else:  # Mistral-style: the window is in the config
            self.sliding_window = getattr(self.config, "sliding_window", None)
        if hasattr(original, "layer_type"):
            self.layer_type = original.layer_type

        def cut(linear: nn.Linear, stride: int, dim: int) -> nn.Linear:
            if dim == 0:
                bias = None if linear.bias is None else linear.bias[::stride]
                return new_linear(linear.weight[::stride], bias)
            return new_linear(linear.weight[:, ::stride], linear.bias)

        self.q_proj = _head_rows(original.q_proj, shape.head_dim, key_channels)
        self.k_proj = _head_rows(original.k_proj, shape.head_dim, key_channels)
        self.v_proj = cut(original.v_proj, r_vo, 0)
        self.o_proj = cut(original.o_proj, r_vo, 1)
        for name in ("q_norm", "k_norm"):  # per-head norms (Gemma-3), only where the model has them
            if getattr(original, name, None) is not None:
                setattr(self, name, _picked_norm(getattr(original, name), key_channels))
        self.register_buffer("inv_freq", inv_freq.float().clone(), persistent=False)
        self.rope_attention_scaling = rope_scaling
        self._eager = _eager_for(original)

    def position_embeddings(
        self, position_ids: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This module's RoPE (cos, sin), each (B, S, d_qk), for position_ids (B, S): what the
        model's shared ``position_embeddings`` are for an unmodified layer."""
        return rope_cos_sin(self.inv_freq, position_ids, self.rope_attention_scaling, dtype)

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, d_qk={self.d_qk}, d_vo={self.d_vo}"

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        position_ids: torch.Tensor | None = None,
        cache=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        cache = past_key_values if cache is None else cache  # `cache` since transformers 5.24
        batch, seq = hidden_states.shape[:2]
        queries = self.q_proj(hidden_states).view(batch, seq, -1, self.d_qk).transpose(1, 2)
        keys = self.k_proj(hidden_states).view(batch, seq, -1, self.d_qk).transpose(1, 2)
        values = self.v_proj(hidden_states).view(batch, seq, -1, self.d_vo).transpose(1, 2)
        if hasattr(self, "q_norm"):
            queries = self.q_norm(queries)
        if hasattr(self, "k_norm"):
            keys = self.k_norm(keys)
        if position_ids is None:
            start = 0 if cache is None else cache.get_seq_length(self.layer_idx)
            position_ids = torch.arange(start, start + seq, device=hidden_states.device)[None]
        cos, sin = self.position_embeddings(position_ids, queries.dtype)
        queries, keys = modeling_llama.apply_rotary_pos_emb(queries, keys, cos, sin)
        if cache is not None:
            keys, values = cache.update(keys, values, self.layer_idx)
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, self._eager
        )
        extra = {} if self.sliding_window is None else {"sliding_window": self.sliding_window}
        out, weights = interface(
            self,
            queries,
            keys,
            values,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            position_ids=position_ids,
            **extra,
            **kwargs,
        )
        out = out.reshape(batch, seq, -1).contiguous()
        return self.o_proj(out), weights


def latent_surgery(model: nn.Module, d_qk: int, d_vo: int, rope: str) -> nn.Module:
    """Replace every decoder layer's ``self_attn`` by a :class:`LatentAttention` (in place).

    ``rope`` is ``frequency_aware``, ``standard`` or ``frequency_matched`` (see
    :mod:`methods.model.rope`). Returns the model. The config is left as it was: the reduced
    dims live in the modules. A model whose heads were cut before is refused (cutting them
    again would read the cut weights as whole heads); merged KV heads (kvheads) are counted
    from the modules.
    """
    done = [layer.self_attn for layer in decoder_layers(model)]
    done = [a for a in done if isinstance(a, LatentAttention)]
    if done:
        raise MethodConfigError(
            f"the model's attention heads are cut already (KV-Latent, d_qk={done[0].d_qk}, "
            f"d_vo={done[0].d_vo}): a model method changes the model in place, so load a fresh "
            "model to cut it again"
        )
    shape = HeadShape.held_by(model)
    channels = key_channels(rope, shape.head_dim, d_qk)
    for layer in decoder_layers(model):
        original = layer.self_attn
        inv_freq, scaling, theta = layer_rope(model, original)
        inv_freq = reduced_inv_freq(rope, inv_freq, shape.head_dim, d_qk, theta)
        layer.self_attn = LatentAttention(
            original, shape, d_qk, d_vo, inv_freq, scaling, key_channels=channels
        )
    return model
