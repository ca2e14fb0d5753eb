"""SpindleKV's codebook: similar vectors share one stored entry.

A :class:`Codebook` stores the tokens kept per KV head (B, H_kv, U) as shared entries (E, D),
an int32 entry index per token and, by default, a float magnitude per token; a token reads
back as ``entries[ref] * magnitude``. Under SpindleKV's head repeat, the U tokens of a KV head
are those kept by any of its copies (one per query head): the copies hold identical vectors,
so each such token is coded once, and the greedy counts it once per copy that keeps it (the
paper's loop over the repeated heads, identical copies folded together).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from methods.cache.spindlekv import codebook_kernels
from methods.cache.spindlekv.grown import Grown

SCOPES = ("head", "layer")
_TINY = 1e-12


class Neighbours:
    """Pairs of one group's vectors whose cosine exceeds ``theta``, for the vectors asked about
    so far (``ids`` into the group's ``size`` vectors). SpindleKV's budget search builds a
    layer's codebooks for growing token sets: the pairs already found are kept and only the
    new vectors' similarities are computed, ``block`` rows at a time (nothing N x N is held).
    """

    def __init__(self, size: int, theta: float, block: int) -> None:
        self.theta, self.block = theta, block
        self.known = np.zeros(size, dtype=bool)
        self.src: list[np.ndarray] = []
        self.dst: list[np.ndarray] = []

    def among(self, vectors: torch.Tensor, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Directed pairs (src, dst) of ids (sorted, unique) with cos > theta, no self pairs.
        ``vectors`` (size, D) are the group's vectors (any length; only directions count)."""
        new = ids[~self.known[ids]]
        if new.size:
            self.known[new] = True
            cols = np.flatnonzero(self.known)
            is_new = np.zeros(self.known.shape[0], dtype=bool)
            is_new[new] = True
            col_unit = _unit(vectors[torch.from_numpy(cols)])
            row_unit = _unit(vectors[torch.from_numpy(new)])
            for start in range(0, new.size, self.block):
                above = row_unit[start : start + self.block] @ col_unit.T > self.theta
                hits = above.nonzero().cpu().numpy()  # one host copy per block (the GPU's too)
                a = new[start + hits[:, 0]]
                b = cols[hits[:, 1]]
                keep = a != b
                a, b = a[keep], b[keep]
                old = ~is_new[b]  # a pair with an older vector is found from this side only
                self.src += [a, b[old]]
                self.dst += [b, a[old]]
        src = np.concatenate(self.src) if self.src else np.zeros(0, dtype=np.int64)
        dst = np.concatenate(self.dst) if self.dst else np.zeros(0, dtype=np.int64)
        inside = np.zeros(self.known.shape[0], dtype=bool)
        inside[ids] = True
        keep = inside[src] & inside[dst]
        return src[keep], dst[keep]


def _unit(vectors: torch.Tensor) -> torch.Tensor:
    vectors = vectors.float()
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(_TINY)


def greedy_cover(
    unit: torch.Tensor, theta: float, block: int, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """SpindleKV's greedy codebook over vectors (N, D): repeatedly take the vector with the
    most still-uncovered neighbours (cos > theta, itself included; first index on ties) as an
    entry and cover them. Returns (centres (E,) indices into the N vectors, ref (N,) entry per
    vector). See :func:`cover` for ``weights``."""
    n = unit.shape[0]
    src, dst = Neighbours(n, theta, block).among(unit, np.arange(n))
    centres, ref = cover(n, src, dst, None if weights is None else weights.cpu().numpy())
    return torch.from_numpy(centres).to(unit.device), torch.from_numpy(ref).to(unit.device)


def cover(
    n: int, src: np.ndarray, dst: np.ndarray, weights: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """The paper's greedy over n vectors whose above-threshold pairs are (src, dst) (indices
    0..n-1, no self pairs): (centres (E,), ref (n,)).

    ``weights`` (n,) counts how many stored heads keep each vector (SpindleKV's repeated KV
    heads): the greedy then runs on the multiset, a vector counting once per copy, which is
    the paper's loop over the repeated heads with identical copies kept together.

    Lazy greedy, exact: a vector's uncovered weight only falls as others are covered, so a
    heap of stale upper bounds gives the true argmax after re-counting only the vectors that
    reach its top. A vector with no uncovered neighbour is its own entry whatever the order
    (it changes nobody's count); those become entries last, in index order, as the paper's
    one-at-a-time loop makes them (it takes them last: each covers only itself).
    """
    weight = np.ones(n) if weights is None else weights.astype(np.float64)
    order = np.argsort(src, kind="stable")
    neighbours = dst[order]
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(src, minlength=n), out=indptr[1:])
    degree = weight + np.bincount(src, weights=weight[dst], minlength=n)
    heap = [
        (-d, i)
        for i, d in zip(
            np.flatnonzero(indptr[1:] > indptr[:-1]).tolist(),
            degree[indptr[1:] > indptr[:-1]].tolist(),
            strict=True,
        )
    ]
    heapq.heapify(heap)
    alive = np.ones(n, dtype=bool)
    ref = np.full(n, -1, dtype=np.int64)
    centres: list[int] = []
    while heap:
        bound, i = heapq.heappop(heap)
        if not alive[i]:
            continue
        members = neighbours[indptr[i] : indptr[i + 1]]
        members = members[alive[members]]
        if members.size == 0:  # alone now: an entry of its own, added with the rest below
            continue
        count = weight[i] + weight[members].sum()
        if count < -bound and heap and (-count, i) > heap[0]:
            heapq.heappush(heap, (-count, i))  # stale bound: someone else may be larger now
            continue
        alive[i] = False
        alive[members] = False
        ref[i] = ref[members] = len(centres)
        centres.append(i)
    rest = np.flatnonzero(ref < 0)
    ref[rest] = len(centres) + np.arange(rest.size)
    return np.array(centres + rest.tolist(), dtype=np.int64), ref


@dataclass(init=False, eq=False, repr=False)
class Codebook:
    """Tokens kept per KV head, (B, H_kv, U), as ``entries`` (E, D), ``owner`` (E,) int32 (the
    group an entry belongs to: a (batch, KV head) pair for scope ``head``, a batch row for
    ``layer``), ``refs`` (B, H_kv, U) int32 into the entries, ``magnitudes`` (B, H_kv, U) or
    None. Slots that hold no token (padding, weight 0) point at their group's first entry
    with magnitude 0.

    With magnitudes, entries are unit vectors and a token decodes to ``entry * magnitude``;
    without (the paper's ablation), an entry is its centre vector as is and members decode
    to it. Every token's cosine to its entry exceeds ``theta``. The tensors grow in place
    while decoding (:class:`Grown`). A dataclass (its fields the tensors it holds) so that
    ``harness.measure.allocated_kv_bytes`` finds them."""

    _entries: Grown
    _owner: Grown
    _refs: Grown
    _magnitudes: Grown | None
    theta: float
    scope: str

    def __init__(
        self,
        entries: torch.Tensor,
        owner: torch.Tensor,
        refs: torch.Tensor,
        magnitudes: torch.Tensor | None,
        theta: float,
        scope: str,
    ) -> None:
        self._entries, self._owner = Grown(entries, 0), Grown(owner, 0)
        self._refs = Grown(refs, -1)
        self._magnitudes = None if magnitudes is None else Grown(magnitudes, -1)
        self.theta, self.scope = theta, scope

    @property
    def entries(self) -> torch.Tensor:
        return self._entries.data

    @property
    def owner(self) -> torch.Tensor:
        return self._owner.data

    @property
    def refs(self) -> torch.Tensor:
        return self._refs.data

    @property
    def magnitudes(self) -> torch.Tensor | None:
        return None if self._magnitudes is None else self._magnitudes.data

    @classmethod
    def from_vectors(
        cls,
        vectors: torch.Tensor,
        kept: torch.Tensor,
        weights: torch.Tensor,
        theta: float,
        scope: str,
        magnitude: bool,
        block: int,
        dtype: torch.dtype,
        neighbours: list[Neighbours] | None = None,
    ) -> Codebook:
        """Codebook of the tokens ``kept`` (B, H_kv, U) (indices into S, distinct per KV head)
        of vectors (B, H_kv, S, D), stored in ``dtype``, built in float32. ``weights``
        (B, H_kv, U) counts the copies keeping each token (0: a padding slot, not coded).
        ``neighbours`` (one per group, filled on first use) carries the similarities found
        by an earlier build over the same vectors (SpindleKV's budget search)."""
        batch, kv_heads, seq_len, dim = vectors.shape
        raw = vectors.float()
        if scope == "head":
            sources = raw.reshape(batch * kv_heads, seq_len, dim)
            rows, counts = kept.reshape(batch * kv_heads, -1), weights.reshape(batch * kv_heads, -1)
        else:
            sources = raw.reshape(batch, kv_heads * seq_len, dim)
            shift = (torch.arange(kv_heads, device=kept.device) * seq_len).view(1, kv_heads, 1)
            rows, counts = (kept + shift).reshape(batch, -1), weights.reshape(batch, -1)
        weighted = bool((weights > 1).any())
        neighbours = [] if neighbours is None else neighbours
        entries, owners, refs, offset = [], [], [], 0
        for group, (source, row, count) in enumerate(zip(sources, rows, counts, strict=True)):
            used = count > 0
            order = row[used].argsort()
            ids = row[used][order].cpu().numpy()  # sorted: ties go to the lower token index
            if len(neighbours) <= group:
                neighbours.append(Neighbours(source.shape[0], theta, block))
            src, dst = neighbours[group].among(source, ids)
            local = np.full(source.shape[0], -1, dtype=np.int64)
            local[ids] = np.arange(ids.size)
            count_np = count[used][order].cpu().numpy() if weighted else None
            centres, ref = cover(ids.size, local[src], local[dst], count_np)
            picked = source[torch.from_numpy(ids[centres]).to(row.device)]
            entries.append(_unit(picked) if magnitude else picked)
            owners.append(torch.full((centres.size,), group, dtype=torch.int32, device=row.device))
            slot = torch.full_like(row, offset)  # padding: the group's first entry
            slot[used.nonzero().squeeze(1)[order]] = torch.from_numpy(ref).to(row.device) + offset
            refs.append(slot)
            offset += centres.size
        norms = None
        if magnitude:
            norms = raw.norm(dim=-1).gather(2, kept) * (weights > 0)
        return cls(
            entries=torch.cat(entries).to(dtype),
            owner=torch.cat(owners),
            refs=torch.cat(refs).view(kept.shape).int(),
            magnitudes=None if norms is None else norms.to(dtype),
            theta=theta,
            scope=scope,
        )

    def decode(self) -> torch.Tensor:
        """(B, H_kv, U, D) in the entries' dtype."""
        refs = self.refs
        out = self.entries.index_select(0, refs.flatten()).view(*refs.shape, -1)
        return out if self.magnitudes is None else out * self.magnitudes.unsqueeze(-1)

    def append(self, vectors: torch.Tensor, fused: bool = False) -> None:
        """Add vectors (B, H_kv, t, D) in order (time, then KV head): each reuses its group's
        most similar entry, among the entries so far and those the earlier new vectors just
        added, when their cosine exceeds ``theta``, else it becomes a new entry. The
        similarities come from two matmuls (against the entries, among the new vectors; the
        first by a C++ kernel, each entry against its own group's vectors, when ``fused``); only
        the choice runs in order, over t (times H_kv for scope ``layer``) small steps."""
        batch, kv_heads, steps, dim = vectors.shape
        raw = vectors.float()
        norm = raw.norm(dim=-1)  # (B, H_kv, t)
        unit = raw / norm.clamp_min(_TINY).unsqueeze(-1)
        stored = unit if self.magnitudes is not None else raw
        if self.scope == "head":  # a group per (batch, KV head), its vectors in time order
            seq = unit.reshape(batch * kv_heads, steps, dim)
            seq_kept = stored.reshape(batch * kv_heads, steps, dim)
        else:  # a group per batch row, its vectors in (time, KV head) order
            seq = unit.transpose(1, 2).reshape(batch, steps * kv_heads, dim)
            seq_kept = stored.transpose(1, 2).reshape(batch, steps * kv_heads, dim)
        groups = torch.arange(seq.shape[0], device=seq.device, dtype=torch.int32)
        fused = fused and codebook_kernels.supported(seq, self.entries)
        nearest = codebook_kernels.nearest if fused else codebook_kernels.nearest_eager
        best, ref = nearest(  # raw centres (no magnitudes) are compared by direction
            seq.flatten(0, 1), groups.repeat_interleave(seq.shape[1]), self.entries,
            self.owner, self.magnitudes is None,
        )  # fmt: skip
        best, ref = best.view(seq.shape[:2]), ref.view(seq.shape[:2])  # (G, L)
        if seq.shape[1] == 1:  # one vector per group: nothing new to compare it with
            new = best[:, 0] <= self.theta
            refs = ref.int()
            if bool(new.any()):
                created = self.entries.shape[0] + new.cumsum(dim=0, dtype=torch.int32) - 1
                refs = torch.where(new, created, refs[:, 0]).unsqueeze(1)
                self._entries.append(seq_kept[new, 0].to(self._entries.buffer.dtype))
                self._owner.append(groups[new])
        else:
            among = (seq @ seq.transpose(1, 2)).cpu().numpy()
            refs, made = _choose(
                best.cpu().numpy(), ref.cpu().numpy(), among, self.theta, self.entries.shape[0]
            )
            if made.size:  # made: (group, index) of each new entry, in creation order
                g, i = torch.from_numpy(made).to(seq.device).unbind(1)
                self._entries.append(seq_kept[g, i].to(self._entries.buffer.dtype))
                self._owner.append(groups[g])
            refs = torch.from_numpy(refs).to(seq.device).int()
        if self.scope == "head":
            refs = refs.view(batch, kv_heads, steps)
        else:
            refs = refs.view(batch, steps, kv_heads).transpose(1, 2)
        self._refs.append(refs)
        if self._magnitudes is not None:
            self._magnitudes.append(norm.to(self._magnitudes.buffer.dtype))

    def append_step(
        self,
        vectors: torch.Tensor,
        table: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        kernel: Callable[..., tuple[torch.Tensor, torch.Tensor, int]] | None = None,
    ) -> None:
        """:meth:`append` of one decoding step (B, H_kv, 1, D), scope ``head``, by the fused
        kernel (:func:`methods.cache.spindlekv.codebook_kernels.append`, or ``kernel``, which takes the
        same arguments: :func:`methods.cache.spindlekv.codebook_triton.append`); keys come post-RoPE
        with the RoPE ``table`` and their ``positions`` (B, 1), and go back to pre-RoPE there."""
        batch, kv_heads, _, dim = vectors.shape
        count = batch * kv_heads
        if positions is not None:
            positions = positions.reshape(batch).repeat_interleave(kv_heads).int()
        self._entries.reserve(count)
        self._owner.reserve(count)
        kernel = codebook_kernels.append if kernel is None else kernel
        refs, norms, made = kernel(
            vectors.reshape(count, dim), table, positions, self._entries.buffer,
            self._owner.buffer, self._entries.size, self.theta, self.magnitudes is not None,
        )  # fmt: skip
        self._entries.size += made
        self._owner.size += made
        self._refs.append(refs.view(batch, kv_heads, 1))
        if self._magnitudes is not None:
            self._magnitudes.append(norms.view(batch, kv_heads, 1))

    def select(self, index: torch.Tensor) -> None:
        """Keep the slots ``index`` (B, H_kv, U') of each KV head, in that order (a
        sliding-window layer dropping what its window has passed). Entries stay."""
        self._refs = Grown(self.refs.gather(-1, index), -1)
        if self._magnitudes is not None:
            self._magnitudes = Grown(self.magnitudes.gather(-1, index), -1)

    def parts(self) -> dict[str, int]:
        """Bytes held per part: ``entries`` (with their owners), ``refs``, ``magnitudes``."""
        mags = 0 if self._magnitudes is None else self._magnitudes.nbytes()
        entries = self._entries.nbytes() + self._owner.nbytes()
        return {"entries": entries, "refs": self._refs.nbytes(), "magnitudes": mags}

    def entries_per_group(self) -> list[int]:
        """Entries of each group: per (batch, KV head) for scope ``head``, per batch row for
        ``layer``."""
        batch, kv_heads = self.refs.shape[:2]
        groups = batch * kv_heads if self.scope == "head" else batch
        return torch.bincount(self.owner.long(), minlength=groups).tolist()

    def nbytes(self) -> int:
        return sum(self.parts().values())


def _choose(
    best: np.ndarray, ref: np.ndarray, among: np.ndarray | None, theta: float, count: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each group's vectors in order (G, L): ``best``/``ref`` are their most similar existing
    entry, ``among`` (G, L, L) their cosines to each other. Returns the entry of each vector
    (new entries numbered from ``count`` in creation order: by index, then group) and the
    (group, index) of each new entry, (M, 2)."""
    groups, length = best.shape
    out = np.empty((groups, length), dtype=np.int64)
    created = np.zeros((groups, length), dtype=bool)
    rows = np.arange(groups)
    made = []
    for i in range(length):
        cos, entry = best[:, i], ref[:, i]
        if i and created[:, :i].any():  # an entry an earlier new vector made may be closer
            earlier = np.where(created[:, :i], among[:, i, :i], -np.inf)
            j = earlier.argmax(axis=1)
            closer = earlier[rows, j] > cos
            cos = np.where(closer, earlier[rows, j], cos)
            entry = np.where(closer, out[rows, j], entry)
        new = cos <= theta
        fresh = np.flatnonzero(new)
        entry = entry.copy()
        entry[fresh] = count + len(made) + np.arange(fresh.size)
        made += [(g, i) for g in fresh.tolist()]
        created[fresh, i] = True
        out[:, i] = entry
    return out, np.array(made, dtype=np.int64).reshape(-1, 2)
