"""Merging KV heads by PCA of calibration caches, folded into the weights (kvheads).

The ``H`` query heads are split into ``T`` contiguous groups (``T`` divides ``H``); group
``j`` gets one new KV head, which replaces the old KV heads its query heads used (its
"members", ``g`` of them). Calibration text is run through the model and the second moments
of each layer's pre-RoPE keys and values (``k_proj``/``v_proj`` outputs) are accumulated.

Values (no RoPE between ``W_v`` and ``W_o``): the members' values are stacked into a
``g*D`` vector; the top ``D`` eigenvectors ``U`` (g*D, D) of its (uncentred) second moment
give the new head ``v' = U^T [v_1; ...; v_g]`` (``W_v' = U^T W_v,members``) and ``v_p ~= U_p v'``
with ``U_p`` the rows of member ``p``, so ``U_p`` is folded into ``W_o`` of every query head
that used member ``p``. With ``g = 1`` the fold is an exact change of basis.

Keys (RoPE between ``W_q``/``W_k`` and the scores): the rotate-half pair ``(i, i + D/2)`` is
one complex number ``z_i`` that RoPE multiplies by ``e^{j theta_i m}``; a complex scalar per
(member, frequency) commutes with that rotation, so keys are merged per frequency with a
complex rank-1 PCA across the members: ``z'_i = sum_p conj(u_p,i) z_p,i`` and
``z_p,i ~= u_p,i z'_i`` with ``u_i`` the top eigenvector of the (g x g) Hermitian second
moment, and ``conj(u_p,i)`` is folded into the query rows of the query heads that used
member ``p`` (the score ``Re(conj(q_i) k_i)`` is then preserved up to the rank-1 error).
This is the "PCA in the pre-RoPE space restricted to rotation-compatible channel pairs"
strategy; ``key_merge: mean`` averages the members' keys instead (queries unchanged).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from methods.model.layers import HeadShape, decoder_layers, new_linear


@dataclass(frozen=True)
class Groups:
    """members[j]: the old KV heads replaced by new KV head j; of_query[h]: (j, p) with
    p the position of query head h's old KV head among group j's members."""

    members: tuple[tuple[int, ...], ...]
    of_query: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, shape: HeadShape, target: int) -> Groups:
        per_group = shape.num_heads // target
        per_kv = shape.num_heads // shape.num_kv_heads
        members, of_query = [], []
        for j in range(target):
            heads = range(j * per_group, (j + 1) * per_group)
            group = tuple(sorted({h // per_kv for h in heads}))
            members.append(group)
            of_query += [(j, group.index(h // per_kv)) for h in heads]
        return cls(tuple(members), tuple(of_query))


class Moments:
    """Second moments of one layer's pre-RoPE keys and values, per new KV head.

    values[j]: (g*D, g*D) float64, sum of v v^T over tokens (v: the members' values stacked);
    keys[j]: (D/2, g, g) complex128, per frequency the sum of z z^H (z: the members' keys).
    Held on the CPU whatever the model's device (small, and float64 is slow on many GPUs).
    """

    def __init__(self, groups: Groups, head_dim: int) -> None:
        self.groups, self.head_dim = groups, head_dim
        self.values = [
            torch.zeros(len(m) * head_dim, len(m) * head_dim, dtype=torch.float64, device="cpu")
            for m in groups.members
        ]
        self.keys = [
            torch.zeros(head_dim // 2, len(m), len(m), dtype=torch.complex128, device="cpu")
            for m in groups.members
        ]

    def add_values(self, v: torch.Tensor) -> None:
        """v (N, H_kv * D) pre-attention values of N tokens."""
        v = v.detach().reshape(-1, v.shape[-1] // self.head_dim, self.head_dim).double().cpu()
        for j, members in enumerate(self.groups.members):
            stacked = v[:, list(members)].reshape(v.shape[0], -1)
            self.values[j] += stacked.T @ stacked

    def add_keys(self, k: torch.Tensor) -> None:
        """k (N, H_kv * D) pre-RoPE keys of N tokens."""
        half = self.head_dim // 2
        k = k.detach().reshape(-1, k.shape[-1] // self.head_dim, self.head_dim).double().cpu()
        z = torch.complex(k[..., :half], k[..., half:])  # (N, H_kv, D/2)
        for j, members in enumerate(self.groups.members):
            zg = z[:, list(members)].permute(2, 0, 1)  # (D/2, N, g)
            self.keys[j] += zg.transpose(1, 2) @ zg.conj()  # sum_n z_n z_n^H


def collect_moments(
    model: nn.Module, batches: list[torch.Tensor], groups: Groups, head_dim: int
) -> list[Moments]:
    """Run ``batches`` (each (B, S) token ids) through ``model``; per layer :class:`Moments`."""
    layers = decoder_layers(model)
    moments = [Moments(groups, head_dim) for _ in layers]
    handles = []
    for layer, m in zip(layers, moments, strict=True):
        attn = layer.self_attn
        handles.append(
            attn.k_proj.register_forward_hook(
                lambda _mod, _args, out, m=m: m.add_keys(out.flatten(0, -2))
            )
        )
        handles.append(
            attn.v_proj.register_forward_hook(
                lambda _mod, _args, out, m=m: m.add_values(out.flatten(0, -2))
            )
        )
    try:
        with torch.no_grad():
            for ids in batches:
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    return moments


def _affine(linear: nn.Linear) -> torch.Tensor:
    """[W | b] (out, in + 1) in float64 (b = 0 when the layer has no bias)."""
    weight = linear.weight.double()
    bias = linear.bias if linear.bias is not None else weight.new_zeros(linear.out_features)
    return torch.cat([weight, bias.double()[:, None]], 1)


def _linear_from(affine: torch.Tensor, like: nn.Linear) -> nn.Linear:
    weight = affine[:, :-1].to(like.weight)
    bias = affine[:, -1].to(like.weight) if like.bias is not None else None
    return new_linear(weight, bias)


def _rotate_pairs(rows: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """Multiply the complex channel pairs of rows (D, in) by coef (D/2,) complex."""
    half = rows.shape[0] // 2
    x, y = rows[:half], rows[half:]
    a, b = coef.real[:, None], coef.imag[:, None]
    return torch.cat([a * x - b * y, a * y + b * x])


def merged_attention(
    attn: nn.Module,
    shape: HeadShape,
    groups: Groups,
    moments: Moments,
    key_merge: str,
    value_merge: str,
) -> nn.Module:
    """A copy of ``attn`` with ``len(groups.members)`` KV heads, the merge folded into
    q/k/v/o (see the module doc). ``key_merge``: rope_pca | mean; ``value_merge``: pca | mean.
    The moments live on the CPU (float64); the eigenvectors move to the weights' device."""
    d = shape.head_dim
    wq, wk, wv = _affine(attn.q_proj), _affine(attn.k_proj), _affine(attn.v_proj)
    wo = attn.o_proj.weight.double()
    device = wq.device
    new_q, new_k, new_v, new_o = wq.clone(), [], [], wo.clone()
    for j, members in enumerate(groups.members):
        g = len(members)
        if key_merge == "mean":
            proj = torch.full((d // 2, g), 1.0 / g, dtype=torch.complex128, device=device)
            recon = torch.ones(d // 2, g, dtype=torch.complex128, device=device)
        else:
            _, vecs = torch.linalg.eigh(moments.keys[j])  # ascending: last is the top one
            recon = vecs[..., -1].to(device)  # (D/2, g)
            proj = recon.conj()
        new_k.append(
            sum(_rotate_pairs(wk[m * d : (m + 1) * d], proj[:, p]) for p, m in enumerate(members))
        )
        stacked = torch.cat([wv[m * d : (m + 1) * d] for m in members])  # (g*D, in+1)
        if value_merge == "mean":
            eye = torch.eye(d, dtype=torch.float64, device=device)
            basis = torch.cat([eye] * g)  # recon U_p = I
            new_v.append(stacked.reshape(g, d, -1).mean(0))
        else:
            _, vecs = torch.linalg.eigh(moments.values[j])
            basis = vecs[:, -d:].to(device)  # (g*D, D), top D eigenvectors
            new_v.append(basis.T @ stacked)
        for h, (group, p) in enumerate(groups.of_query):
            if group != j:
                continue
            rows = slice(h * d, (h + 1) * d)
            new_q[rows] = _rotate_pairs(wq[rows], recon[:, p].conj())
            new_o[:, rows] = wo[:, rows] @ basis[p * d : (p + 1) * d]
    merged = copy.deepcopy(attn, memo={id(attn.config): attn.config})
    merged.q_proj = _linear_from(new_q, attn.q_proj)
    merged.k_proj = _linear_from(torch.cat(new_k), attn.k_proj)
    merged.v_proj = _linear_from(torch.cat(new_v), attn.v_proj)
    merged.o_proj = new_linear(new_o.to(attn.o_proj.weight), attn.o_proj.bias)
    merged.num_key_value_groups = shape.num_heads // len(groups.members)
    if hasattr(merged, "num_key_value_heads"):
        merged.num_key_value_heads = len(groups.members)
    return merged
