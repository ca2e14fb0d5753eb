"""Model introspection shared by the model methods: decoder layers, head shapes, RoPE.

Works for the decoder-only transformers models whose layers hold a ``self_attn`` module with
``q_proj``/``k_proj``/``v_proj``/``o_proj`` and rotate-half RoPE from a shared
``rotary_emb`` module: the Llama family (Llama, Mistral, Qwen-2, SmolLM2) and Gemma-3 (whose
rotary module keeps one ``inv_freq`` per layer type).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from methods.base import MethodConfigError, attention_modules


@dataclass(frozen=True)
class HeadShape:
    """num_heads query heads, num_kv_heads KV heads, head_dim channels per head."""

    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config: Any) -> HeadShape:
        config = text_config(config)
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(heads, kv_heads, head_dim)

    @classmethod
    def held_by(cls, model: nn.Module) -> HeadShape:
        """The shape the attention modules of ``model`` hold now: the config's, with the KV
        heads counted from the modules. Merging KV heads (kvheads) changes the modules and
        leaves the config as it was, so after a merge the config's count is stale."""
        shape = cls.of(model)
        groups = {
            getattr(layer.self_attn, "num_key_value_groups", None)
            for layer in decoder_layers(model)
        }
        if len(groups) != 1 or None in groups:
            return shape
        return cls(shape.num_heads, shape.num_heads // groups.pop(), shape.head_dim)


def text_config(obj: Any) -> Any:
    """The text (decoder) config of a model or of a ``PretrainedConfig``."""
    config = getattr(obj, "config", obj)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def check_rotary(config: Any, method: str) -> None:
    """Fail unless RoPE covers the whole head (no partial rotary)."""
    config = text_config(config)
    factor = getattr(config, "partial_rotary_factor", 1.0) or 1.0
    if factor != 1.0:
        raise MethodConfigError(
            f"method={method} needs RoPE on the whole head, but the model's "
            f"partial_rotary_factor is {factor}: this model is not supported"
        )


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers (modules whose ``self_attn`` has a ``layer_idx``), in order."""
    attns = {id(m) for m in attention_modules(model)}
    layers = [m for m in model.modules() if id(getattr(m, "self_attn", None)) in attns]
    return sorted(layers, key=lambda layer: layer.self_attn.layer_idx)


def layer_type(attn: nn.Module) -> str | None:
    """``sliding_attention`` / ``full_attention`` where the model has layer types."""
    kind = getattr(attn, "layer_type", None)
    if kind is None:
        types = getattr(text_config(attn.config), "layer_types", None)
        kind = types[attn.layer_idx] if types else None
    return kind


def rotary_module(model: nn.Module) -> nn.Module:
    found = [m for name, m in model.named_modules() if name.endswith("rotary_emb")]
    if not found:
        raise MethodConfigError(
            f"{type(model).__name__} has no `rotary_emb` module: KV-Latent needs a RoPE model"
        )
    return found[0]


def layer_rope(model: nn.Module, attn: nn.Module) -> tuple[torch.Tensor, float, float]:
    """(inv_freq (head_dim/2,), attention_scaling, rope_theta) of the layer of ``attn``."""
    rotary = rotary_module(model)
    kind = layer_type(attn)
    prefix = f"{kind}_" if hasattr(rotary, f"{kind}_inv_freq") else ""
    inv_freq = getattr(rotary, f"{prefix}inv_freq")
    scaling = float(getattr(rotary, f"{prefix}attention_scaling", 1.0))
    params = getattr(text_config(model), "rope_parameters", None) or {}
    if kind in params and isinstance(params[kind], dict):
        params = params[kind]
    theta = params.get("rope_theta") or getattr(text_config(model), "rope_theta", 10000.0)
    return inv_freq.detach().float().clone(), scaling, float(theta)


def new_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` holding copies of ``weight`` (out, in) and ``bias`` (out,)."""
    out_features, in_features = weight.shape
    layer = nn.Linear(
        in_features,
        out_features,
        bias=bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    layer.requires_grad_(False)
    return layer


def fingerprint(model: nn.Module) -> str:
    """A short hash of the model's config and weights (shapes plus a strided sample of every
    tensor), so that checkpoints derived from different weights never collide."""
    digest = hashlib.sha256()
    config = {  # not where it was loaded from, nor which transformers saved it
        k: v
        for k, v in text_config(model).to_dict().items()
        if not k.startswith("_") and k != "transformers_version"
    }
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(flat[::step].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
