"""Per-layer budgets shared by the pyramid methods (PyramidKV, SpindleKV).

A pyramid keeps a different number of tokens in each layer, so the layers' caches have
different lengths while decoding. With ``sdpa`` (and flash attention) a one-token query
needs no mask and this just works. With ``eager`` attention transformers builds a single
mask sized from the first full-attention layer and adds it to every layer's scores, which
fails on the others: the pyramid methods refuse eager attention (:func:`require_ragged_ok`).
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from methods.base import MethodConfigError


def compressed_layers(config: Any) -> list[int]:
    """Indices of the layers a cache method compresses: every layer but sliding-window ones
    (those keep their own bounded window, see ``CacheMethod.compresses_layer``)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    return [i for i, kind in enumerate(types) if kind != "sliding_attention"]


def layer_rank(module: nn.Module) -> tuple[int, int]:
    """(rank of ``module``'s layer among the compressed layers, number of compressed layers).
    A pyramid runs from rank 0 (shallowest) to rank m - 1 (deepest)."""
    layers = compressed_layers(module.config)
    if module.layer_idx not in layers:
        return 0, 1
    return layers.index(module.layer_idx), len(layers)


def allocate(shares: list[float], total: int, cap: int) -> list[int]:
    """Integers close to ``shares`` (each floored, then the largest remainders get one more)
    that sum to exactly ``total`` and each lie in [0, cap]; the pyramids' float budgets sum
    to ``total``, so their per-layer integer budgets average exactly to the target."""
    shares = [min(max(s, 0.0), float(cap)) for s in shares]
    counts = [math.floor(s) for s in shares]
    order = sorted(range(len(shares)), key=lambda i: counts[i] - shares[i])
    missing = total - sum(counts)
    for i in order:
        if missing <= 0:
            break
        if counts[i] < cap:
            counts[i] += 1
            missing -= 1
    return counts


def require_ragged_ok(field_owner: str, config: Any) -> None:
    """Fail for eager attention, which cannot decode with per-layer cache lengths."""
    refuse_eager(field_owner, getattr(config, "_attn_implementation", None))


def refuse_eager(field_owner: str, attn_implementation: str | None) -> None:
    """:func:`require_ragged_ok` for an attention implementation named before the model loads."""
    if attn_implementation == "eager":
        raise MethodConfigError(
            f"method={field_owner} keeps a different number of tokens per layer, which "
            "transformers' eager attention cannot decode (one mask for all layers): use "
            "model.attn_implementation=sdpa (or flash_attention_2)"
        )
