"""A sliding-window cache layer after eviction (``compress_sliding: true``).

transformers' ``DynamicSlidingWindowLayer`` sizes the attention mask from the number of
tokens it has *seen* (``cumulative_length``), assuming it holds the last ``window - 1`` of
them. Once a cache method has evicted some of those, it holds fewer, and a mask sized that
way no longer matches the keys. This layer sizes the mask from what it holds: the kept
tokens are presented to the mask as the most recent ones (all inside the window), which is
what attention over the kept tokens means. It still drops its oldest tokens beyond
``window - 1`` while decoding, as the window does.
"""

from __future__ import annotations

from typing import Any

from transformers.cache_utils import DynamicSlidingWindowLayer


class EvictedSlidingWindowLayer(DynamicSlidingWindowLayer):
    """A ``DynamicSlidingWindowLayer`` whose mask covers exactly the tokens it holds."""

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        held = self.keys.shape[-2] if self.is_initialized and self.keys is not None else 0
        return held + query_length, max(self.cumulative_length - held, 0)

    @classmethod
    def from_layer(cls, layer: Any) -> EvictedSlidingWindowLayer:
        """The same state (keys, values, counters) in this class."""
        evicted = cls.__new__(cls)
        evicted.__dict__.update(vars(layer))
        return evicted


def is_sliding(layer: Any) -> bool:
    """Whether a cache layer is a sliding-window layer (Gemma-3's local layers)."""
    return bool(getattr(layer, "is_sliding", False)) or hasattr(layer, "sliding_window")
