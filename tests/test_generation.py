"""The generation loop: same tokens as transformers' generate, true positions after eviction,
exact stored bytes for the full cache."""

from __future__ import annotations

import pytest
import torch

from harness.generation import greedy_generate, new_cache, score_continuation
from harness.measure import (
    CPU_PEAK,
    PEAK_MEMORY_WORDS,
    KVLayout,
    PeakMemory,
    module_bytes,
    stored_kv_bytes,
)
from methods.cache.streamingllm import StreamingLLM


def full_cache_formula(config, tokens: int, dtype_bytes: int = 4) -> int:
    head_dim = config.hidden_size // config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or head_dim
    return (
        2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * tokens * dtype_bytes
    )


@pytest.mark.parametrize("fixture", ["tiny_gqa", "tiny_mha"])
def test_greedy_matches_generate_and_bytes_match_formula(fixture, request):
    model, _ = request.getfixturevalue(fixture)
    ids = torch.randint(0, 256, (1, 37), generator=torch.Generator().manual_seed(1))
    reference = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None)
    gen = greedy_generate(model, ids, max_new_tokens=12)
    assert gen.tokens == reference[0, 37:].tolist()
    assert gen.kv_bytes_prefill == full_cache_formula(model.config, 37)
    # the last generated token is never fed back, so 37 + 11 tokens are cached
    assert gen.kv_bytes_final == full_cache_formula(model.config, 37 + 11)
    layout = KVLayout.from_config(model.config, torch.float32)
    assert layout.full_bytes(37) == gen.kv_bytes_prefill


def test_stops_on_eos_and_on_stop_callback(tiny_gqa):
    model, _ = tiny_gqa
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(2))
    free = greedy_generate(model, ids, max_new_tokens=10)
    first = free.tokens[0]
    stopped = greedy_generate(model, ids, max_new_tokens=10, eos_token_ids=[first])
    assert stopped.tokens == [first] and stopped.decode_steps == 0
    by_callback = greedy_generate(model, ids, max_new_tokens=10, should_stop=lambda t: len(t) == 3)
    assert by_callback.tokens == free.tokens[:3]


def _manual_decode(model, ids, kept_index, first_position, steps):
    """Prefill, keep only ``kept_index`` in every layer, then decode greedily feeding
    positions first_position, first_position + 1, ..."""
    cache = new_cache(model)
    with torch.inference_mode():
        logits = model(ids, past_key_values=cache, use_cache=True).logits[0, -1]
        for layer in cache.layers:
            layer.keys = layer.keys[:, :, kept_index].contiguous()
            layer.values = layer.values[:, :, kept_index].contiguous()
        tokens = [int(logits.argmax())]
        for step in range(steps - 1):
            logits = model(
                torch.tensor([[tokens[-1]]]),
                position_ids=torch.tensor([[first_position + step]]),
                past_key_values=cache,
                use_cache=True,
            ).logits[0, -1]
            tokens.append(int(logits.argmax()))
    return tokens, logits.float()


def test_decoding_after_eviction_uses_true_positions(tiny_gqa):
    """After eviction the next token sits at position 40 (the prompt's length), not at the
    number of cached tokens: the loop must match a manual decode at true positions and
    differ from one whose positions restart at the cache length."""
    model, _ = tiny_gqa
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(3))
    kept = torch.tensor([0, *range(33, 40)])
    with StreamingLLM(budget=8, sinks=1).applied(model):
        gen = greedy_generate(model, ids, max_new_tokens=8)
    true_tokens, true_logits = _manual_decode(model, ids, kept, first_position=40, steps=8)
    _, restarted_logits = _manual_decode(model, ids, kept, first_position=8, steps=8)
    assert gen.tokens == true_tokens
    torch.testing.assert_close(gen.last_logits, true_logits)
    assert not torch.allclose(gen.last_logits, restarted_logits, atol=1e-4)
    assert gen.cached_tokens_final == 8 + 7


def test_streamingllm_keeps_sinks_and_recent_tokens(tiny_gqa):
    model, _ = tiny_gqa
    ids = torch.randint(0, 256, (1, 50), generator=torch.Generator().manual_seed(4))
    with StreamingLLM(ratio=0.2).applied(model):
        gen = greedy_generate(model, ids, max_new_tokens=1)
    assert gen.kv_bytes_prefill == full_cache_formula(model.config, 10)
    full = greedy_generate(model, ids, max_new_tokens=1)
    assert gen.kv_bytes_prefill / full.kv_bytes_prefill == pytest.approx(0.2)


def test_score_continuation_matches_single_pass_and_cache_path(tiny_mha):
    model, _ = tiny_mha
    context, continuation = list(range(30, 60)), [70, 71, 72, 73]
    one_pass = score_continuation(model, context, continuation)
    with torch.inference_mode():
        logits = model(torch.tensor([context + continuation])).logits[0].float()
    logprobs = torch.log_softmax(logits, -1)
    manual = sum(logprobs[len(context) - 1 + i, t].item() for i, t in enumerate(continuation))
    assert one_pass.logprob == pytest.approx(manual, abs=1e-4)
    with StreamingLLM(ratio=1.0).applied(model):
        stepwise = score_continuation(model, context, continuation, stepwise=True)
    assert stepwise.logprob == pytest.approx(one_pass.logprob, abs=1e-4)
    assert stepwise.is_greedy == one_pass.is_greedy


def test_stored_bytes_count_key_value_storage_only():
    class Layer:
        def __init__(self):
            self.keys = torch.zeros(1, 2, 5, 8)
            self.values = torch.zeros(1, 2, 5, 8, dtype=torch.float16)
            self._sliding_window_tensor = torch.tensor(8)  # bookkeeping, not KV storage
            self.note = "not a tensor"

    class Compressed:
        keys = torch.zeros(1, 2, 5, 8)

        def stored_nbytes(self) -> int:  # a codebook layer says what it holds
            return 123

    class Cache:
        layers = [Layer(), Layer(), Compressed()]

    per_layer = 2 * 5 * 8 * 4 + 2 * 5 * 8 * 2
    assert stored_kv_bytes(Cache()) == 2 * per_layer + 123


def test_gemma3_full_cache_measures_exactly_the_full_cache(tiny_gemma3):
    # sliding-window layers keep window - 1 tokens and a 0-d `_sliding_window_tensor`:
    # the full cache must measure kv_ratio exactly 1.0, after prefill and after decoding
    layout = KVLayout.from_config(tiny_gemma3.config, torch.float32)
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(0))
    gen = greedy_generate(tiny_gemma3, ids, max_new_tokens=4)
    assert gen.kv_bytes_prefill == layout.full_bytes(20)
    assert gen.kv_bytes_prefill / layout.full_bytes(20) == 1.0
    assert gen.kv_bytes_final == layout.full_bytes(20 + gen.decode_steps)
    # 3 sliding layers x 8 tokens + 1 full layer x 20 tokens, keys and values, 16 dims, fp32
    assert gen.kv_bytes_prefill == (3 * 8 + 20) * 2 * 16 * 4


def test_cpu_peak_memory_is_the_weights_plus_the_kv_cache_allocated(tiny_gqa):
    model, _ = tiny_gqa
    # the resident set does not show a KV cache; the CPU peak is what can be counted: the
    # weights' bytes (each storage once) plus the cache's allocated bytes at its largest
    weights = module_bytes(model)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert 0 < weights <= params + sum(b.nbytes for b in model.buffers())
    meter = PeakMemory(torch.device("cpu"), weights)
    assert meter.kind == CPU_PEAK and "KV cache" in PEAK_MEMORY_WORDS[meter.kind]
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    meter.reset()
    gen = greedy_generate(model, ids, max_new_tokens=4)
    kv = max(gen.kv_allocated_bytes_prefill, gen.kv_allocated_bytes_final)
    read = meter.read(kv)
    assert kv >= gen.kv_bytes_final > 0
    assert read == {
        "peak_memory_bytes": weights + kv,
        "memory_before_bytes": weights,
        "peak_memory_rise_bytes": kv,
    }
