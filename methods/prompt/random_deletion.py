"""Random deletion: the sanity floor for prompt compression.

Removes the same share of compressor tokens as the other methods, chosen uniformly at
random (token 0 kept, order kept). No model is run, only the tokenizer. The draw is
seeded by ``seed`` and the text itself, so a request gets the same deletion in every run
and in any order.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from methods.prompt.tokens import TokenDropMethod


@dataclass
class RandomDeletion(TokenDropMethod):
    """Keeps a random ``ratio`` share of the compressible tokens (fields: ``ratio``,
    ``compressor`` (whose tokenizer counts the tokens), ``chunk_size``, ``seed``)."""

    name: str = "random_deletion"
    seed: int = 0

    needs_model = False

    def select(self, ids: list[int]) -> list[int]:
        n = len(ids)
        keep = self.kept_count(n)
        if keep >= n:
            return list(range(n))
        data = torch.as_tensor(ids, dtype=torch.int64, device="cpu").numpy().tobytes()
        # a CPU generator: the same draw whatever device the model is on
        generator = torch.Generator(device="cpu").manual_seed(
            zlib.crc32(data, self.seed & 0xFFFFFFFF)
        )
        chosen = torch.randperm(n - 1, generator=generator, device="cpu")[: keep - 1] + 1
        return [0, *chosen.sort().values.tolist()]
