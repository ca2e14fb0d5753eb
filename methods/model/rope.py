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

These are *not* the frequencies the kept channels had: the strided cut keeps channel ``r*i``
(frequency ``theta ** (-2ri/D) = theta ** (-2i/d)``) and frequency-aware RoPE turns it at
``theta ** (-a_i/d)``, slower by ``theta ** ((a_i - 2i)/d)`` (at d = 32: 10x for channels 0-7
with theta 1e4, 18x with SmolLM2's 1e5), so every pretrained query/key pair is turned at a
speed it was not trained for, and training has to re-learn it (the authors' code does the
same, with ~1B tokens of training). ``frequency_matched`` (ours, not the paper's) keeps the
frequency-aware frequencies but cuts the keys to the channels that had them:
``j = a_i * r / 2`` and ``j + D/2`` (needs an even ``r = D/d``), so the surgery changes no
kept channel's frequency: the high-frequency quarter is dropped, the middle band is kept
sparsely and the low band densely, by channel selection rather than by re-timing.
"""

from __future__ import annotations

import torch

ROPE_MODES = ("frequency_aware", "standard", "frequency_matched")


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


def key_channels(mode: str, head_dim: int, dim: int) -> torch.Tensor:
    """(dim,) int64: the channels of each query/key head that the cut to ``dim`` keeps, in
    rotate-half order (first-half channels, then their partners ``+ head_dim/2``):
    every ``r``-th channel (``[::r]``), or with ``frequency_matched`` the channels whose
    frequencies are the frequency-aware ones (see the module doc)."""
    r = head_dim // dim
    if mode != "frequency_matched" or dim == head_dim:
        return torch.arange(0, head_dim, r, device="cpu")
    if r % 2:
        raise ValueError(f"frequency_matched RoPE needs an even head_dim/dim, got {r}")
    first = frequency_aware_exponents(dim).long() * (r // 2)
    return torch.cat([first, first + head_dim // 2])


def reduced_inv_freq(
    mode: str, full_inv_freq: torch.Tensor, head_dim: int, dim: int, theta: float
) -> torch.Tensor:
    """inv_freq (dim/2,) for keys cut from ``head_dim`` to ``dim`` channels per head.

    ``standard`` keeps the full model's frequencies of the kept channels (``[::r]``, equal to
    :func:`standard_inv_freq` for plain RoPE, and keeping any rope scaling the model has);
    ``frequency_aware`` recomputes them from ``theta``; ``frequency_matched`` keeps the full
    model's frequencies of its channels (:func:`key_channels`), which are the frequency-aware
    ones for plain RoPE. At ``dim == head_dim`` the model's own frequencies are kept in every
    mode (nothing is cut, nothing is re-learned).
    """
    if dim == head_dim or mode in ("standard", "frequency_matched"):
        return full_inv_freq[key_channels(mode, head_dim, dim)[: dim // 2]].clone()
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
