"""Tensors that grow in place while decoding (SpindleKV's codebooks and positions)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(eq=False, repr=False)
class Grown:
    """A tensor that grows in place along ``dim`` (0 or -1): room is reserved ``CHUNK`` at a
    time, so appending one decoding step copies only the new part, not the whole tensor.
    ``data`` is the used part; :meth:`nbytes` counts the whole buffer (reserved room included).
    A dataclass so that ``harness.measure.allocated_kv_bytes`` finds the buffer."""

    CHUNK = 32

    buffer: torch.Tensor
    dim: int
    size: int = field(init=False)

    def __post_init__(self) -> None:
        self.size = self.buffer.shape[self.dim]

    @property
    def data(self) -> torch.Tensor:
        return self.buffer.narrow(self.dim, 0, self.size)

    def append(self, new: torch.Tensor) -> None:
        n = new.shape[self.dim]
        self.reserve(n)
        self.buffer.narrow(self.dim, self.size, n).copy_(new)
        self.size += n

    def reserve(self, n: int) -> None:
        """Make room for ``n`` more along ``dim`` (a kernel then writes into ``buffer``)."""
        if self.size + n > self.buffer.shape[self.dim]:
            shape = list(self.buffer.shape)
            shape[self.dim] = self.size + n + self.CHUNK
            grown = self.buffer.new_empty(shape)
            grown.narrow(self.dim, 0, self.size).copy_(self.data)
            self.buffer = grown

    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()
