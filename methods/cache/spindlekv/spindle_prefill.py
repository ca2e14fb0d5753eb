"""SpindleKV after prefill: choose every compressed layer's token budget (the paper's count,
or the byte budget's search), then build each layer's codebooks and its cache layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from methods.cache.attention import undo_rope
from methods.cache.spindlekv.codebook import Codebook
from methods.cache.spindlekv.codebook_layer import CodebookLayer, RopeTable
from methods.cache.spindlekv.spindle_plan import search_target, spindle_budgets


@dataclass
class Pending:
    """One layer's prefill, kept until the last compressed layer has run (the budgets of all
    layers are chosen together)."""

    layer_idx: int
    order: torch.Tensor  # (B, H, S) keep order per stored head
    keys: torch.Tensor  # (B, H_kv, S, D) post-RoPE, as cached
    values: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    positions: torch.Tensor  # (B, S)
    rope: Any
    table: RopeTable
    sliding_window: int | None = None  # a sliding-window layer (compress_sliding)


def plan(method: Any, pending: list[Pending]) -> tuple[list[CodebookLayer], dict[str, Any]]:
    """The cache layers for ``pending`` (in order) under ``method``'s budget (a SpindleKV),
    and what was done (:meth:`SpindleKV.last_stats`)."""
    seq_len = pending[0].keys.shape[-2]
    full = sum(p.keys.nbytes + p.values.nbytes for p in pending)
    paper = method.kept_tokens(seq_len)
    chosen: dict[str, Any] = {}
    found = {p.layer_idx: ([], []) for p in pending}  # similarities, kept across targets
    if method.budget_mode == "tokens":
        budget = float("inf")
    else:
        share = method.ratio if method.budget is None else min(method.budget / seq_len, 1.0)
        budget = share * full

    def evaluate(target: int) -> int:
        window = method.window + method.sinks
        budgets = spindle_budgets(target, seq_len, window, len(pending), method.beta)
        layers = [
            coded_layer(method, p, n, found[p.layer_idx])
            for p, n in zip(pending, budgets, strict=True)
        ]
        stored = sum(layer.stored_nbytes() for layer in layers)
        fits, chosen_fits = stored <= budget, bool(chosen) and chosen["stored"] <= budget
        # keep the largest target that fits, else (nothing fits yet) the smallest tried
        if (fits and (not chosen_fits or target > chosen["target"])) or (
            not fits and not chosen_fits and target < chosen.get("target", seq_len + 1)
        ):
            chosen.update(target=target, stored=stored, layers=layers, budgets=budgets)
        return stored

    if method.budget_mode == "tokens":
        seen = {paper: evaluate(paper)}
    else:
        tolerance = method.ratio_tolerance * full
        _, seen = search_target(evaluate, budget, paper, 1, seq_len, tolerance)
    return chosen["layers"], describe(method, pending, chosen, full, budget, seen)


def coded_layer(method: Any, p: Pending, n_kept: int, found: tuple[list, list]) -> CodebookLayer:
    """Layer ``p`` keeping the first ``n_kept`` of each keep order (per query head under head
    repeat, else per KV head), coded; ``found`` carries earlier builds' similarities."""
    kept, heads = slots(p.order[..., :n_kept], p.keys.shape[1], p.keys.shape[-2])
    weights = torch.ones_like(kept) if heads is None else heads.sum(dim=2)
    cos, sin = p.cos.float().unsqueeze(1), p.sin.float().unsqueeze(1)
    pre_keys = undo_rope(p.keys.float(), cos, sin)
    positions = p.positions.unsqueeze(1).expand(-1, kept.shape[1], -1).gather(2, kept)
    scope, block, magnitude = method.codebook_scope, method.similarity_block, method.magnitude
    key_book = Codebook.from_vectors(
        pre_keys, kept, weights, method.key_threshold, scope, magnitude, block, p.keys.dtype,
        found[0],
    )  # fmt: skip
    value_book = Codebook.from_vectors(
        p.values, kept, weights, method.value_threshold, scope, magnitude, block,
        p.values.dtype, found[1],
    )  # fmt: skip
    return CodebookLayer(
        key_book, value_book, positions.int(), heads, p.rope, p.table,
        method.decode_kernel, method.fold_every, p.sliding_window,
    )  # fmt: skip


def slots(
    chosen: torch.Tensor, kv_heads: int, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Tokens chosen (B, H, n) per query head (H = G H_kv) or per KV head (H = H_kv) ->
    (kept (B, H_kv, U) distinct token indices, increasing; which of each KV head's G copies
    keep each slot, (B, H_kv, G, U) bool, or None when H = H_kv). A KV head stores the union
    of its copies' tokens once; U is the largest union, smaller unions are padded with slots
    that no copy keeps."""
    batch, heads, _ = chosen.shape
    if heads == kv_heads:
        return chosen.sort(dim=-1).values, None
    groups = heads // kv_heads
    member = torch.zeros(batch, heads, seq_len, dtype=torch.bool, device=chosen.device)
    member.scatter_(2, chosen, True)
    member = member.view(batch, kv_heads, groups, seq_len)
    union = member.any(dim=2)  # (B, H_kv, S)
    size = int(union.sum(dim=-1).max())
    kept = union.to(torch.uint8).argsort(dim=-1, descending=True, stable=True)[..., :size]
    kept = kept.sort(dim=-1).values  # padding slots (no copy keeps them) sort in among them
    index = kept.unsqueeze(2).expand(batch, kv_heads, groups, size)
    return kept, member.gather(3, index)


def union_sizes(layer: CodebookLayer) -> list[int]:
    """Tokens each KV head stores (batch row 0): its copies' union under head repeat."""
    if layer.heads is None:
        return [int(layer.positions.shape[-1])] * int(layer.positions.shape[1])
    return layer.heads[0].any(dim=1).sum(dim=-1).tolist()


def describe(
    method: Any, pending: list[Pending], chosen: dict, full: int, budget: float, seen: dict
) -> dict[str, Any]:
    layers = []
    for p, layer, n in zip(pending, chosen["layers"], chosen["budgets"], strict=True):
        layers.append(
            {
                "layer": p.layer_idx,
                "kept_tokens": n,
                "unique_tokens": union_sizes(layer),
                "key_entries": int(layer.key_book.entries.shape[0]),
                "value_entries": int(layer.value_book.entries.shape[0]),
                "key_entries_per_head": layer.key_book.entries_per_group(),
                "value_entries_per_head": layer.value_book.entries_per_group(),
                "bytes": int(layer.stored_nbytes()),
                "bytes_by_part": layer.parts(),
                "full_bytes": int(p.keys.nbytes + p.values.nbytes),
            }
        )
    tables = {id(p.table): p.table.nbytes() for p in pending}
    seq_len = int(pending[0].keys.shape[-2])
    return {
        "budget_mode": method.budget_mode,
        "gqa": method.gqa,
        "prompt_tokens": seq_len,
        "paper_target_tokens": method.kept_tokens(seq_len),
        "target_tokens": chosen["target"],
        "search": {str(t): b / full for t, b in sorted(seen.items())},
        "ratio_requested": None if budget == float("inf") else budget / full,
        "ratio_compressed_layers": chosen["stored"] / full,
        "bytes": chosen["stored"],
        "full_bytes": full,
        "layers": layers,
        "rope_table_bytes": sum(tables.values()),
    }
