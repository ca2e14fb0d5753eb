"""RoPE at a reduced key dimension (KV-Latent).

Rotate-half RoPE pairs channel ``i`` with ``i + d/2`` and turns the pair by
``position * inv_freq[i]``. The strided down-sampling ``[::r]`` keeps channel ``r*i`` of the
first half, so the *standard* RoPE of dim ``d = D/r`` (``theta ** (-2i/d)``) is exactly the
frequency the kept channel had in the full model: ``inv_freq_full[::r]``.

The *frequency-aware* RoPE (KV-Latent's code, which is followed here: the paper's Eq. 11 as
printed disagrees with it for the second half) uses the exponents

    a = [d/4, d/4 + 2, ..., 3d/4 - 2] ++ [3d/4, 3d/4 + 1, ..., d - 1]      (d/2 of them)
    inv_freq = theta ** (-a / d)

dropping the highest-frequency quarter, sampling the middle band sparsely and the low band
densely. It needs ``d % 4 == 0``.
"""

from __future__ import annotations

import torch

ROPE_MODES = ("frequency_aware", "standard")


def standard_inv_freq(dim: int, theta: float) -> torch.Tensor:
    """(dim/2,) float32: ``theta ** (-[0, 2, ..., dim-2] / dim)``."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float, device="cpu") / dim))


def frequency_aware_exponents(dim: int) -> torch.Tensor:
    """(dim/2,) float32 exponents ``a`` of the frequency-aware RoPE (see the module doc)."""
    if dim % 4:
        raise ValueError(f"frequency-aware RoPE needs a key dim divisible by 4, got {dim}")
    middle = torch.arange(dim // 4, 3 * dim // 4, 2, device="cpu")
    low = torch.arange(3 * dim // 4, dim, device="cpu")
    return torch.cat([middle, low]).float()


def frequency_aware_inv_freq(dim: int, theta: float) -> torch.Tensor:
    """(dim/2,) float32: ``theta ** (-a / dim)`` with ``a`` from :func:`frequency_aware_exponents`."""
    return 1.0 / (theta ** (frequency_aware_exponents(dim) / dim))


def reduced_inv_freq(
    mode: str, full_inv_freq: torch.Tensor, head_dim: int, dim: int, theta: float
) -> torch.Tensor:
    """inv_freq (dim/2,) for keys cut from ``head_dim`` to ``dim`` channels per head.

    ``standard`` keeps the full model's frequencies of the kept channels (``[::r]``, equal to
    :func:`standard_inv_freq` for plain RoPE, and keeping any rope scaling the model has);
    ``frequency_aware`` recomputes them from ``theta``. At ``dim == head_dim`` the model's
    own frequencies are kept in both modes (nothing is cut, nothing is re-learned).
    """
    if dim == head_dim or mode == "standard":
        return full_inv_freq[:: head_dim // dim].clone()
    if mode == "frequency_aware":
        return frequency_aware_inv_freq(dim, theta).to(full_inv_freq.device)
    raise ValueError(f"unknown RoPE mode {mode!r}: use one of {', '.join(ROPE_MODES)}")


def rope_cos_sin(
    inv_freq: torch.Tensor, position_ids: torch.Tensor, scaling: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (B, S, 2 * len(inv_freq)) for position_ids (B, S), as transformers' rotary
    embeddings compute them (float32, times the attention scaling, cast to ``dtype``)."""
    freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device, torch.float)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)
