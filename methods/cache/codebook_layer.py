"""The cache layer that holds SpindleKV's compressed form, and the RoPE table its keys use.

A :class:`CodebookLayer` stores a key codebook over pre-RoPE keys, a value codebook and each
kept token's true position, per stored head (a KV head, or one copy of it per query head
under SpindleKV's head repeat). Decoded keys are never kept: attention reads the codebooks
directly (``methods.cache.codebook_attention``), or, outside SpindleKV's attention
implementation, ``update`` returns them decoded for that call only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.cache_utils import DynamicLayer

from methods.base import MethodConfigError
from methods.cache.attention import apply_rope, undo_rope
from methods.cache.codebook import Codebook, Grown

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
        table = self.table
        if table is None or table.shape[0] <= last or table.dtype != like.dtype:
            size = max(last + 1, 1024, 0 if table is None else 2 * table.shape[0])
            table = self.table = self._tabulate(size, like)
        return table.index_select(0, positions.flatten()).view(*positions.shape, -1)

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


class CodebookLayer(DynamicLayer):
    """SpindleKV's compressed cache layer: ``key_book`` over pre-RoPE keys, ``value_book``,
    and ``positions`` (B, H, N) int32, the true position of each stored head's tokens.
    ``keys``/``values`` hold only the newest tokens (B, H_kv, t, D), post-RoPE as the model
    gives them, until the method folds them into the codebooks after the forward pass
    (:meth:`fold`); every copy of a KV head receives them. ``rope`` is the model's RoPE for
    this layer, ``table`` the same tabulated (for the codebook attention).

    ``attending`` is set while SpindleKV's attention implementation attends over this layer
    for the current call: ``update`` then returns only the newest tokens, and the attention
    reads the codebooks. Otherwise ``update`` returns every stored head's tokens decoded.
    """

    def __init__(
        self,
        key_book: Codebook,
        value_book: Codebook,
        positions: torch.Tensor,
        rope: Rope,
        table: RopeTable,
        fast: bool = True,
    ) -> None:
        super().__init__()
        self.key_book, self.value_book = key_book, value_book
        self._positions = Grown(positions, -1)
        self.last_position = int(positions.max()) if positions.numel() else -1
        self.rope, self.table, self.fast = rope, table, fast
        self.copies = key_book.copies
        batch, heads = positions.shape[:2]
        kv_heads = heads // self.copies
        self.dtype, self.device = key_book.entries.dtype, key_book.entries.device
        self.keys = key_book.entries.new_zeros(batch, kv_heads, 0, key_book.entries.shape[-1])
        self.values = value_book.entries.new_zeros(batch, kv_heads, 0, value_book.entries.shape[-1])
        self.is_initialized = True
        self.attending = False

    @property
    def positions(self) -> torch.Tensor:
        """(B, H, N) int32: each stored head's tokens' true positions."""
        return self._positions.data

    def decoded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored tokens' keys (RoPE re-applied) and values, each (B, H, N, D): the plain
        reading, with the model's own rotary embedding at each token's position."""
        pre = self.key_book.decode()
        batch, heads, n, dim = pre.shape
        cos, sin = self.rope(self.positions.reshape(batch, heads * n).long(), pre)
        keys = apply_rope(pre, cos.view(batch, heads, n, dim), sin.view(batch, heads, n, dim))
        return keys, self.value_book.decode()

    def tail(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The newest tokens, given to every copy of their KV head: (B, H, t, D) each."""
        return (
            self.keys.repeat_interleave(self.copies, dim=1),
            self.values.repeat_interleave(self.copies, dim=1),
        )

    def materialized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every stored head's keys and values, stored tokens then the newest: (B, H, N+t, D)."""
        keys, values = self.decoded()
        new_keys, new_values = self.tail()
        return torch.cat([keys, new_keys], dim=-2), torch.cat([values, new_values], dim=-2)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        if self.attending:
            return self.keys, self.values
        return self.materialized()

    def fold(self, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Move the newest tokens (``keys``/``values``, post-RoPE) into the codebooks;
        positions (B, t) and cos/sin (B, t, D) are those the model used for them."""
        if self.keys.shape[-2] == 0:
            return
        pre = undo_rope(self.keys.float(), cos.float().unsqueeze(1), sin.float().unsqueeze(1))
        self.key_book.append(pre)
        self.value_book.append(self.values)
        heads = self.positions.shape[1]
        self._positions.append(positions.to(self.positions).unsqueeze(1).expand(-1, heads, -1))
        self.last_position = max(self.last_position, int(positions.max()))
        self.keys, self.values = self.keys[..., :0, :], self.values[..., :0, :]

    def get_seq_length(self) -> int:
        return self.positions.shape[-1] + self.keys.shape[-2]

    def stored_nbytes(self) -> int:
        """Bytes held: both codebooks (entries, owners, refs and magnitudes of every stored
        head, copies included), the positions and any not-yet-folded tokens; tensors that grow
        while decoding count their reserved room too (:class:`Grown`)."""
        tail = sum(t.numel() * t.element_size() for t in (self.keys, self.values))
        positions = self._positions.nbytes()
        return self.key_book.nbytes() + self.value_book.nbytes() + positions + tail

    def _unsupported(self, *args, **kwargs) -> None:
        raise NotImplementedError(
            "SpindleKV's codebook cache layer supports greedy decoding only (no cropping, "
            "beam search or batch re-indexing)"
        )

    crop = batch_repeat_interleave = batch_select_indices = reorder_cache = _unsupported
