"""SpindleKV after prefill: choose every compressed layer's token budget (the paper's count,
or the byte budget's search), then build each layer's codebooks and its cache layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from methods.cache.attention import undo_rope
from methods.cache.codebook import Codebook
from methods.cache.codebook_layer import CodebookLayer, RopeTable
from methods.cache.spindle_plan import search_target, spindle_budgets


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
            build(method, p, n, found[p.layer_idx]) for p, n in zip(pending, budgets, strict=True)
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


def build(method: Any, p: Pending, n_kept: int, found: tuple[list, list]) -> CodebookLayer:
    """Layer ``p`` keeping the first ``n_kept`` of each stored head's keep order, coded;
    ``found`` carries the similarities of earlier builds (keys, values)."""
    kept = p.order[..., :n_kept].sort(dim=-1).values  # (B, H, n)
    cos, sin = p.cos.float().unsqueeze(1), p.sin.float().unsqueeze(1)
    pre_keys = undo_rope(p.keys.float(), cos, sin)
    heads = kept.shape[1]
    positions = p.positions.unsqueeze(1).expand(-1, heads, -1).gather(2, kept)
    scope, block, magnitude = method.codebook_scope, method.similarity_block, method.magnitude
    key_book = Codebook.build(
        pre_keys, kept, method.key_threshold, scope, magnitude, block, p.keys.dtype, found[0]
    )
    value_book = Codebook.build(
        p.values, kept, method.value_threshold, scope, magnitude, block, p.values.dtype, found[1]
    )
    fast = method.decode_attention == "codebook"
    return CodebookLayer(key_book, value_book, positions.int(), p.rope, p.table, fast=fast)


def describe(
    method: Any, pending: list[Pending], chosen: dict, full: int, budget: float, seen: dict
) -> dict[str, Any]:
    layers = []
    for p, layer, n in zip(pending, chosen["layers"], chosen["budgets"], strict=True):
        layers.append(
            {
                "layer": p.layer_idx,
                "kept_tokens": n,
                "stored_heads": int(layer.positions.shape[1]),
                "key_entries": int(layer.key_book.entries.shape[0]),
                "value_entries": int(layer.value_book.entries.shape[0]),
                "bytes": int(layer.stored_nbytes()),
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
