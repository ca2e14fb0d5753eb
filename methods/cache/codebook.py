"""SpindleKV's codebook and the cache layer that stores it.

A :class:`Codebook` stores vectors (B, H, N, D) as shared entries (E, D), an int32
reference per vector and, by default, a float magnitude per vector; it decodes them as
``entries[ref] * magnitude``. :class:`CodebookLayer` is a transformers cache layer whose
stored tensors are only that compressed form; ``update`` returns the decoded keys (RoPE
re-applied at each token's true position) and values for attention, then drops them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicLayer

from methods.cache.attention import apply_rope, undo_rope

SCOPES = ("head", "layer")
_TINY = 1e-12


def similarity_graph(unit: torch.Tensor, theta: float, block: int) -> torch.Tensor:
    """(N, N) bool, True where the cosine of two unit vectors (N, D) exceeds ``theta``;
    the diagonal is always True (a zero vector is its own entry). The float similarities
    are computed ``block`` rows at a time, so only the boolean matrix is ever N x N."""
    n = unit.shape[0]
    graph = torch.empty(n, n, dtype=torch.bool, device=unit.device)
    for start in range(0, n, block):
        graph[start : start + block] = unit[start : start + block] @ unit.T > theta
    return (graph & graph.T).fill_diagonal_(True)  # exactly symmetric despite float rounding


def greedy_cover(unit: torch.Tensor, theta: float, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SpindleKV's greedy codebook over unit vectors (N, D): repeatedly take the vector with
    the most still-uncovered neighbours (cos > theta; first index on ties) as an entry and
    cover them. Returns (centres (E,) indices into the N vectors, ref (N,) entry per vector).

    Row sums are updated incrementally (O(N * covered) per step; the graph stays symmetric,
    rows and columns being cleared together); once every remaining vector is only its own
    neighbour they become entries together, in index order, which is what the
    one-at-a-time loop would do.
    """
    graph = similarity_graph(unit, theta, block)
    degree = graph.sum(dim=1)
    ref = torch.full((unit.shape[0],), -1, dtype=torch.long, device=unit.device)
    centres: list[int] = []
    while degree.numel():
        best = int(degree.argmax())
        if int(degree[best]) <= 1:
            break
        members = graph[best].nonzero().squeeze(1)
        degree -= graph.index_select(0, members).sum(dim=0)  # the graph is symmetric
        graph.index_fill_(0, members, False).index_fill_(1, members, False)
        degree[members] = 0
        ref[members] = len(centres)
        centres.append(best)
    rest = (ref < 0).nonzero().squeeze(1)
    ref[rest] = len(centres) + torch.arange(rest.numel(), device=unit.device)
    centres_t = torch.tensor(centres, dtype=torch.long, device=unit.device)
    return torch.cat([centres_t, rest]), ref


@dataclass
class Codebook:
    """Vectors (B, H, N, D) as entries (E, D), ``owner`` (E,) int32 (the group an entry
    belongs to: a (batch, head) pair for scope ``head``, a batch row for ``layer``), refs
    (B, H, N) int32 into the entries, magnitudes (B, H, N) or None.

    With magnitudes, entries are unit vectors and a vector decodes to ``entry * magnitude``;
    without (the paper's ablation), an entry is its centre vector as is and members decode
    to it. Every vector's cosine to its entry exceeds ``theta``."""

    entries: torch.Tensor
    owner: torch.Tensor
    refs: torch.Tensor
    magnitudes: torch.Tensor | None
    theta: float
    scope: str

    @classmethod
    def build(
        cls,
        vectors: torch.Tensor,
        theta: float,
        scope: str,
        magnitude: bool,
        block: int,
        dtype: torch.dtype,
    ) -> Codebook:
        """Codebook of vectors (B, H, N, D), stored in ``dtype``; built in float32."""
        batch, heads, n, dim = vectors.shape
        raw = vectors.float()
        norms = raw.norm(dim=-1)
        unit = raw / norms.clamp_min(_TINY).unsqueeze(-1)
        rows = batch * heads if scope == "head" else batch
        entries, owners, refs, offset = [], [], [], 0
        for group, (members, originals) in enumerate(
            zip(unit.reshape(rows, -1, dim), raw.reshape(rows, -1, dim), strict=True)
        ):
            centres, ref = greedy_cover(members, theta, block)
            entries.append((members if magnitude else originals)[centres])
            owners.append(torch.full_like(centres, group))
            refs.append(ref + offset)
            offset += centres.numel()
        return cls(
            entries=torch.cat(entries).to(dtype),
            owner=torch.cat(owners).int(),
            refs=torch.cat(refs).view(batch, heads, n).int(),
            magnitudes=norms.to(dtype) if magnitude else None,
            theta=theta,
            scope=scope,
        )

    def decode(self) -> torch.Tensor:
        """(B, H, N, D) in the entries' dtype."""
        out = self.entries[self.refs.long()]
        return out if self.magnitudes is None else out * self.magnitudes.unsqueeze(-1)

    def append(self, vectors: torch.Tensor) -> None:
        """Add vectors (B, H, t, D), one position at a time: a vector reuses the best entry
        of its group when their cosine exceeds ``theta``, else it becomes a new entry."""
        batch, heads = vectors.shape[:2]
        device = vectors.device
        if self.scope == "head":
            group = torch.arange(batch * heads, device=device).view(batch, heads)
        else:
            group = torch.arange(batch, device=device).view(batch, 1).expand(batch, heads)
        for step in range(vectors.shape[2]):
            raw = vectors[:, :, step].float()
            norm = raw.norm(dim=-1)
            unit = raw / norm.clamp_min(_TINY).unsqueeze(-1)
            book = self.entries.float()
            book = book / book.norm(dim=-1, keepdim=True).clamp_min(_TINY)
            sims = torch.einsum("bhd,ed->bhe", unit, book)
            sims = sims.masked_fill(self.owner.long() != group.unsqueeze(-1), float("-inf"))
            best, ref = sims.max(dim=-1)
            new = best <= self.theta
            ref[new] = self.entries.shape[0] + torch.arange(int(new.sum()), device=device)
            fresh = (unit if self.magnitudes is not None else raw)[new]
            self.entries = torch.cat([self.entries, fresh.to(self.entries.dtype)])
            self.owner = torch.cat([self.owner, group[new].int()])
            self.refs = torch.cat([self.refs, ref.unsqueeze(-1).int()], dim=-1)
            if self.magnitudes is not None:
                mags = norm.unsqueeze(-1).to(self.magnitudes.dtype)
                self.magnitudes = torch.cat([self.magnitudes, mags], dim=-1)

    def nbytes(self) -> int:
        tensors = (self.entries, self.owner, self.refs, self.magnitudes)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


Rope = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class CodebookLayer(DynamicLayer):
    """A cache layer holding SpindleKV's compressed form: a key codebook over pre-RoPE keys,
    a value codebook, and each kept token's true position (int32, (B, H, N): per head,
    since each head keeps its own tokens). ``keys``/``values`` hold only the newest tokens
    (post-RoPE, as the model gives them) until the method folds them into the codebooks
    after the forward pass (:meth:`fold`). ``rope(positions (B, n), like)`` returns the
    model's (cos, sin), each (B, n, D), for those positions.
    """

    def __init__(
        self, key_book: Codebook, value_book: Codebook, positions: torch.Tensor, rope: Rope
    ) -> None:
        super().__init__()
        self.key_book, self.value_book, self.positions, self.rope = (
            key_book,
            value_book,
            positions,
            rope,
        )
        batch, heads = positions.shape[:2]
        self.dtype, self.device = key_book.entries.dtype, key_book.entries.device
        self.keys = key_book.entries.new_zeros(batch, heads, 0, key_book.entries.shape[-1])
        self.values = value_book.entries.new_zeros(batch, heads, 0, value_book.entries.shape[-1])
        self.is_initialized = True

    def decoded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored tokens' keys (RoPE re-applied) and values, each (B, H, N, D)."""
        pre = self.key_book.decode()
        batch, heads, n, dim = pre.shape
        cos, sin = self.rope(self.positions.reshape(batch, heads * n).long(), pre)
        keys = apply_rope(pre, cos.view(batch, heads, n, dim), sin.view(batch, heads, n, dim))
        return keys, self.value_book.decode()

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        keys, values = self.decoded()
        return torch.cat([keys, self.keys], dim=-2), torch.cat([values, self.values], dim=-2)

    def fold(self, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Move the newest tokens (``keys``/``values``, post-RoPE) into the codebooks;
        positions (B, t) and cos/sin (B, t, D) are those the model used for them."""
        if self.keys.shape[-2] == 0:
            return
        pre = undo_rope(self.keys.float(), cos.float().unsqueeze(1), sin.float().unsqueeze(1))
        self.key_book.append(pre)
        self.value_book.append(self.values)
        heads = self.positions.shape[1]
        new = positions.to(self.positions).unsqueeze(1).expand(-1, heads, -1)
        self.positions = torch.cat([self.positions, new], dim=-1)
        self.keys, self.values = self.keys[..., :0, :], self.values[..., :0, :]

    def get_seq_length(self) -> int:
        return self.positions.shape[-1] + self.keys.shape[-2]

    def stored_nbytes(self) -> int:
        """Bytes held: both codebooks (entries, owners, refs, magnitudes), the positions
        and any not-yet-folded tokens. Decoded keys/values are never kept."""
        tail = sum(t.numel() * t.element_size() for t in (self.keys, self.values))
        positions = self.positions.numel() * self.positions.element_size()
        return self.key_book.nbytes() + self.value_book.nbytes() + positions + tail

    def _unsupported(self, *args, **kwargs) -> None:
        raise NotImplementedError(
            "SpindleKV's codebook cache layer supports greedy decoding only (no cropping, "
            "beam search or batch re-indexing)"
        )

    crop = batch_repeat_interleave = batch_select_indices = reorder_cache = _unsupported
