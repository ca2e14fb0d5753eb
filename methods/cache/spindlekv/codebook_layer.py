"""The cache layer that holds SpindleKV's compressed form, and the RoPE table its keys use.

A :class:`CodebookLayer` stores, per KV head, a key codebook over pre-RoPE keys, a value
codebook, each kept token's true position and (under SpindleKV's head repeat) which query
heads keep it. Decoded keys are never kept: attention reads the codebooks directly
(``methods.cache.spindlekv.codebook_attention``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer

from methods.base import MethodConfigError
from methods.cache.attention import apply_rope, undo_rope
from methods.cache.layers import query_length_of
from methods.cache.spindlekv import codebook_kernels, codebook_triton
from methods.cache.spindlekv.codebook import Codebook
from methods.cache.spindlekv.grown import Grown

Rope = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class RopeTable:
    """The model's own RoPE (``rope(positions (B, n), like) -> (cos, sin)``, each (B, n, D))
    tabulated for positions 0..P-1 as rows ``[cos | sin]`` of the first half of the dims
    (rotate-half RoPE repeats the angles in both halves), grown on demand.

    A function of the position alone, shared by every layer that uses the same rotary
    embedding and by every request: it plays the role of the model's cos/sin, not of the
    KV cache, and holds nothing about the tokens (:meth:`nbytes` says what it takes).
    """

    def __init__(self, rope: Rope) -> None:
        self.rope = rope
        self.table: torch.Tensor | None = None

    def rows(self, positions: torch.Tensor, like: torch.Tensor, last: int) -> torch.Tensor:
        """(..., D) rows ``[cos_half | sin_half]`` for integer positions (...), the largest of
        which is ``last``."""
        table = self.upto(last, like)
        return table.index_select(0, positions.flatten()).view(*positions.shape, -1)

    def upto(self, last: int, like: torch.Tensor) -> torch.Tensor:
        """The table (P, D) in ``like``'s dtype, grown to hold position ``last``."""
        table = self.table
        if table is None or table.shape[0] <= last or table.dtype != like.dtype:
            size = max(last + 1, 1024, 0 if table is None else 2 * table.shape[0])
            table = self.table = self._tabulate(size, like)
        return table

    def _tabulate(self, size: int, like: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(size, device=like.device).unsqueeze(0)
        cos, sin = self.rope(positions, like)
        cos, sin = cos[0], sin[0]
        half = cos.shape[-1] // 2
        if not (
            torch.equal(cos[:, :half], cos[:, half:]) and torch.equal(sin[:, :half], sin[:, half:])
        ):
            raise MethodConfigError(
                "SpindleKV's codebook attention needs rotate-half RoPE (the same angles in both "
                "halves of a head); use method.decode_attention=materialize for this model"
            )
        return torch.cat([cos[:, :half], sin[:, :half]], dim=-1).to(like.dtype)

    def nbytes(self) -> int:
        return 0 if self.table is None else self.table.numel() * self.table.element_size()


def model_rope(model: nn.Module, module: nn.Module) -> tuple[tuple, Any]:
    """(key, ``rope(positions (B, n), like) -> (cos, sin)``) from the model's own rotary
    embedding (Gemma-3's takes the attention layer's type, local or global), or the layer's
    own when it defines ``position_embeddings`` (KV-Latent's reduced-dim attention). Layers
    with the same key share one RoPE (and one :class:`RopeTable`)."""
    own = getattr(module, "position_embeddings", None)
    if callable(own):
        return ("own", module.layer_idx), lambda positions, like: own(positions, like.dtype)
    found = [m for name, m in model.named_modules() if name.endswith("rotary_emb")]
    if not found:
        raise MethodConfigError(
            f"{type(model).__name__} has no `rotary_emb` module: SpindleKV re-applies RoPE to "
            "its codebook keys and supports RoPE models only"
        )
    rotary = found[0]
    extra = ()
    if "layer_type" in inspect.signature(rotary.forward).parameters:
        extra = (getattr(module, "layer_type", None) or "full_attention",)

    def rope(positions: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rotary(like, positions, *extra)

    return ("model", *extra), rope


class CodebookLayer(DynamicLayer):
    """SpindleKV's compressed cache layer. Per KV head, U token slots: ``key_book`` over their
    pre-RoPE keys, ``value_book`` over their values, ``positions`` (B, H_kv, U) int32 (each
    token's true position) and, under head repeat, ``heads`` (B, H_kv, G, U) bool: which of
    the KV head's G copies (one per query head) keep the token; a slot no copy keeps is
    padding. Without ``heads`` every query head of the group sees every token.

    ``keys``/``values`` hold only the newest tokens (B, H_kv, t, D), post-RoPE as the model
    gives them (their positions in ``tail_positions``), until they are folded into the
    codebooks (:meth:`fold`), after every ``fold_every`` decoding steps; every copy keeps
    them, and attention reads them as they are until then. ``rope`` is the model's RoPE for
    this layer, ``table`` the same tabulated (the codebook attention and the fold use it).

    ``attending`` is set while SpindleKV's attention implementation attends over this layer
    for the current call: ``update`` then returns only the newest tokens, and the attention
    reads the codebooks (and sets ``served``). Otherwise ``update`` returns the tokens
    decoded (for a head-repeat layer that would hand every query head its group's union, so
    it refuses).

    ``window`` (a sliding-window layer, SpindleKV's ``compress_sliding``): after
    each step the slots whose position the window has passed are dropped (:meth:`slide`),
    as transformers' sliding layer drops its oldest tokens, and the mask is sized from what
    the layer holds (the kept tokens are the most recent, all inside the window).
    """

    def __init__(
        self,
        key_book: Codebook,
        value_book: Codebook,
        positions: torch.Tensor,
        heads: torch.Tensor | None,
        rope: Rope,
        table: RopeTable,
        kernel: str = "fused",
        fold_every: int = 1,
        sliding_window: int | None = None,
    ) -> None:
        super().__init__()
        self.key_book, self.value_book = key_book, value_book
        self._positions = Grown(positions, -1)
        self._heads = None if heads is None else Grown(heads, -1)
        self.last_position = int(positions.max()) if positions.numel() else -1
        self.rope, self.table, self.fold_every = rope, table, fold_every
        self.kernel = kernel  # SpindleKV's resolved decode_attention (its decode_kernel)
        self.window = sliding_window  # not `sliding_window`: methods.base's is_sliding
        batch, kv_heads = positions.shape[:2]
        self.tail_positions = positions.new_zeros(batch, 0)
        self.dtype, self.device = key_book.entries.dtype, key_book.entries.device
        self.keys = key_book.entries.new_zeros(batch, kv_heads, 0, key_book.entries.shape[-1])
        self.values = value_book.entries.new_zeros(batch, kv_heads, 0, value_book.entries.shape[-1])
        self.is_initialized = True
        self.attending = self.served = False

    @property
    def positions(self) -> torch.Tensor:
        """(B, H_kv, U) int32: each slot's true position."""
        return self._positions.data

    @property
    def heads(self) -> torch.Tensor | None:
        """(B, H_kv, G, U) bool: which query heads keep each slot (None: all of them)."""
        return None if self._heads is None else self._heads.data

    def decoded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The slots' keys (RoPE re-applied) and values, each (B, H_kv, U, D): the plain
        reading, with the model's own rotary embedding at each token's position."""
        pre = self.key_book.decode()
        batch, heads, n, dim = pre.shape
        cos, sin = self.rope(self.positions.reshape(batch, heads * n).long(), pre)
        keys = apply_rope(pre, cos.view(batch, heads, n, dim), sin.view(batch, heads, n, dim))
        return keys, self.value_book.decode()

    def materialized(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Keys and values of the slots then the newest tokens, (B, H_kv, U+t, D), and which
        query heads see each, (B, H_kv, G, U+t) bool (None: all)."""
        keys, values = self.decoded()
        keys = torch.cat([keys, self.keys], dim=-2)
        values = torch.cat([values, self.values], dim=-2)
        heads = self.heads
        if heads is not None:
            new = heads.new_ones(*heads.shape[:-1], self.keys.shape[-2])
            heads = torch.cat([heads, new], dim=-1)
        return keys, values, heads

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        if self.attending:
            return self.keys, self.values
        if self._heads is not None:
            raise RuntimeError(
                "SpindleKV's head-repeat cache keeps a token set per query head, which only "
                "its own attention implementation reads: decode inside `method.hooks(model)`"
            )
        keys, values, _ = self.materialized()
        return keys, values

    def settle(self, positions: torch.Tensor) -> None:
        """Record the true positions (B, t) of the tokens ``update`` just added, and fold the
        newest tokens into the codebooks once ``fold_every`` of them are waiting."""
        self.tail_positions = torch.cat([self.tail_positions, positions.to(self.positions)], -1)
        if self.keys.shape[-2] >= self.fold_every:
            self.fold()
        if self.window is not None:
            self.slide(self.newest() + 2 - self.window)

    def newest(self) -> int:
        """The largest position held (stored or waiting to be folded)."""
        tail = self.tail_positions
        return max(self.last_position, int(tail.max()) if tail.numel() else -1)

    def slide(self, first: int) -> None:
        """Drop the stored slots before position ``first`` (the next query's window starts
        there): each KV head keeps its slots at or after it, in order; heads keeping fewer
        than the most are padded with slots no query head sees. Entries stay (counted)."""
        alive = self.positions >= first
        if self._heads is not None:
            alive &= self.heads.any(dim=2)
        if bool(alive.all()):
            return
        if self.keys.shape[-2] and int(self.tail_positions.min()) < first:
            self.fold()  # waiting tokens the window passed (fold_every > window)
            return self.slide(first)
        size = int(alive.sum(dim=-1).max())
        index = alive.to(torch.uint8).argsort(dim=-1, descending=True, stable=True)[..., :size]
        index = index.sort(dim=-1).values
        seen = alive.gather(-1, index).unsqueeze(2)  # (B, H_kv, 1, U')
        if self._heads is not None:
            expanded = index.unsqueeze(2).expand(-1, -1, self.heads.shape[2], -1)
            seen = self.heads.gather(-1, expanded) & seen
        self._heads = None if bool(seen.all()) else Grown(seen.contiguous(), -1)
        self._positions = Grown(self.positions.gather(-1, index), -1)
        self.key_book.select(index)
        self.value_book.select(index)

    def get_mask_sizes(self, query_length: Any) -> tuple[int, int]:
        """A sliding layer's mask covers exactly the tokens held, as the most recent ones."""
        if self.window is None:
            return super().get_mask_sizes(query_length)
        held = self.get_seq_length()
        return held + query_length_of(query_length), max(self.newest() + 1 - held, 0)

    def fold(self) -> None:
        """Move the newest tokens (``keys``/``values``, post-RoPE) into the codebooks, kept
        by every copy: their keys go back to pre-RoPE with the tabulated RoPE of their
        positions (the model's own values), then each joins or opens an entry in order."""
        new = self.keys.shape[-2]
        if new == 0:
            return
        positions = self.tail_positions
        last = int(positions.max())
        books = (self.key_book, self.value_book)
        fused = self.kernel == "fused" and codebook_kernels.supported(
            self.keys, self.values, *(book.entries for book in books)
        )
        kernel = codebook_triton.append if self.kernel == "triton" else None
        if (fused or kernel) and new == 1 and self.key_book.scope == "head":  # decoding step
            table = self.table.upto(last, self.keys)
            self.key_book.append_step(self.keys, table, positions, kernel)
            self.value_book.append_step(self.values, kernel=kernel)
        else:
            rows = self.table.rows(positions, self.keys, last).float().unsqueeze(1)
            half = rows.shape[-1] // 2
            cos = torch.cat([rows[..., :half], rows[..., :half]], dim=-1)
            sin = torch.cat([rows[..., half:], rows[..., half:]], dim=-1)
            self.key_book.append(undo_rope(self.keys.float(), cos, sin), fused)
            self.value_book.append(self.values, fused)
        kv_heads = self.positions.shape[1]
        self._positions.append(positions.unsqueeze(1).expand(-1, kv_heads, -1))
        if self._heads is not None:
            heads = self._heads.data
            self._heads.append(heads.new_ones(*heads.shape[:-1], new))
        self.last_position = max(self.last_position, last)
        self.keys, self.values = self.keys[..., :0, :], self.values[..., :0, :]
        self.tail_positions = self.tail_positions[:, :0]

    def get_seq_length(self) -> int:
        return self.positions.shape[-1] + self.keys.shape[-2]

    def stored_nbytes(self) -> int:
        """Bytes held: both codebooks (entries, owners, refs, magnitudes), the positions, the
        per-query-head token sets and any not-yet-folded tokens; tensors that grow while
        decoding count their reserved room too (:class:`Grown`)."""
        tail = sum(t.numel() * t.element_size() for t in (self.keys, self.values))
        tail += self.tail_positions.numel() * self.tail_positions.element_size()
        parts = (self._positions, self._heads)
        stored = sum(part.nbytes() for part in parts if part is not None)
        return self.key_book.nbytes() + self.value_book.nbytes() + stored + tail

    def parts(self) -> dict[str, int]:
        """Bytes held per part (they sum to :meth:`stored_nbytes`), for SpindleKV's stats."""
        out = {f"key_{k}": v for k, v in self.key_book.parts().items()}
        out |= {f"value_{k}": v for k, v in self.value_book.parts().items()}
        out["positions"] = self._positions.nbytes()
        out["heads"] = 0 if self._heads is None else self._heads.nbytes()
        tail = (self.keys, self.values, self.tail_positions)
        out["newest"] = sum(t.numel() * t.element_size() for t in tail)
        return out

    def _unsupported(self, *args, **kwargs) -> None:
        raise NotImplementedError(
            "SpindleKV's codebook cache layer supports greedy decoding only (no cropping, "
            "beam search or batch re-indexing)"
        )

    crop = batch_repeat_interleave = batch_select_indices = reorder_cache = _unsupported
