"""Cache methods on a model with sliding-window layers (a tiny random Gemma-3: three
sliding layers holding 8 tokens each, one full-attention layer): by default the sliding
layers are left to their window and the ratio applies to the others; with
``compress_sliding`` they keep the ratio of what they hold too, and decoding goes on."""

from __future__ import annotations

import pytest
import torch

from harness.generation import greedy_generate, new_cache
from harness.measure import KVLayout
from methods.cache.h2o import H2O
from methods.cache.knorm import KeyNorm
from methods.cache.layers import EvictedSlidingWindowLayer
from methods.cache.pyramidkv import PyramidKV
from methods.cache.snapkv import SnapKV
from methods.cache.streamingllm import StreamingLLM

PROMPT = 20  # tokens; each sliding layer holds 8 of them, the full layer all 20
UNIT = 2 * 16 * 4  # bytes per token per layer: keys and values, 1 KV head of dim 16, fp32
METHODS = {
    "streamingllm": lambda **kw: StreamingLLM(sinks=1, **kw),
    "h2o": lambda **kw: H2O(**kw),
    "snapkv": lambda **kw: SnapKV(window=2, kernel_size=1, **kw),
    "pyramidkv": lambda **kw: PyramidKV(window=2, kernel_size=1, **kw),
    "knorm": lambda **kw: KeyNorm(**kw),
}


def prompt() -> torch.Tensor:
    return torch.randint(0, 128, (1, PROMPT), generator=torch.Generator().manual_seed(1))


def held(model, method, steps: int = 0) -> tuple[list[int], object]:
    """Tokens each layer holds after prefill (steps=0) or after ``steps`` decoding steps."""
    cache = new_cache(model)
    with method.hooks(model):
        with torch.inference_mode():
            model(input_ids=prompt(), past_key_values=cache, use_cache=True)
            for step in range(steps):
                model(
                    input_ids=torch.tensor([[5 + step]]),
                    position_ids=torch.tensor([[PROMPT + step]]),
                    past_key_values=cache,
                    use_cache=True,
                )
    return [layer.keys.shape[-2] for layer in cache.layers], cache


@pytest.mark.parametrize("name", sorted(METHODS))
def test_by_default_sliding_layers_keep_their_window(tiny_gemma3, name):
    counts, cache = held(tiny_gemma3, METHODS[name](ratio=0.25))
    assert counts == [8, 8, 8, 5]  # sliding layers untouched, the full layer keeps 25 %
    assert not any(isinstance(layer, EvictedSlidingWindowLayer) for layer in cache.layers)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_compress_sliding_reaches_the_requested_ratio_and_keeps_decoding(tiny_gemma3, name):
    method = METHODS[name](ratio=0.25, compress_sliding=True)
    counts, cache = held(tiny_gemma3, method)
    assert counts == [2, 2, 2, 5]  # 25 % of what every layer holds
    layout = KVLayout.from_config(tiny_gemma3.config, torch.float32)
    assert sum(counts) * UNIT / layout.full_bytes(PROMPT) == 0.25
    assert all(isinstance(layer, EvictedSlidingWindowLayer) for layer in cache.layers[:3])
    # decoding on: a sliding layer refills up to its window and then drops its oldest
    counts, _ = held(tiny_gemma3, method, steps=10)
    assert max(counts[:3]) <= 8 and min(counts[:3]) >= 2


def test_an_evicted_sliding_layer_masks_exactly_what_it_holds(tiny_gemma3):
    # ratio 1.0 keeps everything but still swaps the sliding layers for the evicted-layer
    # class: the generated tokens and logits must be those of the untouched model
    ids = prompt()
    plain = greedy_generate(tiny_gemma3, ids, max_new_tokens=12)
    with StreamingLLM(ratio=1.0, compress_sliding=True).hooks(tiny_gemma3):
        swapped = greedy_generate(tiny_gemma3, ids, max_new_tokens=12)
    assert swapped.tokens == plain.tokens
    torch.testing.assert_close(swapped.last_logits, plain.last_logits, rtol=1e-4, atol=1e-4)


def test_floor_bytes_give_the_lowest_reachable_ratio(tiny_gemma3):
    layout = KVLayout.from_config(tiny_gemma3.config, torch.float32)
    full = layout.full_bytes(PROMPT)
    assert full == (3 * 8 + 20) * UNIT
    # StreamingLLM with 4 sinks keeps at least 4 tokens in every layer it compresses
    assert StreamingLLM(ratio=0.1).min_kept_tokens() == 4
    assert layout.floor_bytes(PROMPT, 4) == (3 * 8 + 4) * UNIT  # sliding layers at 8
    assert layout.floor_bytes(PROMPT, 4, compress_sliding=True) == (3 * 4 + 4) * UNIT
    assert SnapKV(window=32, sinks=2).min_kept_tokens() == 34
    assert H2O(sinks=0).min_kept_tokens() == 1
