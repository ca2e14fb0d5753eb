"""The optimised paths against the plain ones they replace, on tiny models: the in-place cache
against transformers' DynamicCache, the one-pass attention against explicit probabilities,
H2O (one pass, in-place decode eviction) against its plain implementation (recomputed
attention, top-k and gather every step). Same kept positions, same logits within float32
rounding, and each path checked to do what it is for (no copy, no recomputation)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_cache_methods import load, prompt, run
from transformers import DynamicCache

from harness import kvcache
from harness.generation import greedy_generate
from harness.kvcache import InPlaceLayer, new_cache
from harness.measure import allocated_kv_bytes, stored_kv_bytes
from methods.base import CacheMethod, Compose
from methods.cache import h2o as h2o_module
from methods.cache.attention import (
    accumulated_attention,
    attention_and_received,
    attention_override,
)
from methods.cache.h2o import H2O
from methods.cache.scorer import gather_tokens, top_indices
from methods.cache.snapkv import SnapKV
from methods.cache.streamingllm import StreamingLLM

CLOSE = dict(atol=1e-5, rtol=1e-4)


@torch.inference_mode()
def decode(model, ids, cache, methods=(), steps=6, tokens=None):
    """Prefill + ``steps`` greedy steps at the true positions: (logits, fed tokens, the
    data pointer of layer 1's keys after each step; layer 1 is full-attention in every model)."""
    with Compose(methods=list(methods)).applied(model):
        logits = [model(input_ids=ids, past_key_values=cache).logits[0, -1]]
        fed, pointers = [], []
        for t in range(steps):
            token = tokens[t] if tokens is not None else int(logits[-1].argmax())
            fed.append(token)
            out = model(
                input_ids=torch.tensor([[token]]),
                position_ids=torch.tensor([[ids.shape[1] + t]]),
                past_key_values=cache,
            )
            logits.append(out.logits[0, -1])
            pointers.append(cache.layers[1].keys.data_ptr())
    return torch.stack(logits), fed, pointers


@pytest.mark.parametrize("kind", ["gqa", "mha", "gemma"])
@pytest.mark.parametrize("method", [None, "streamingllm", "snapkv", "h2o"])
def test_in_place_cache_equals_dynamic_cache(kind, method):
    make = {
        None: lambda: [],
        "streamingllm": lambda: [StreamingLLM(ratio=0.3)],
        "snapkv": lambda: [SnapKV(ratio=0.3, window=8)],
        "h2o": lambda: [H2O(ratio=0.3, sinks=2)],
    }[method]
    model, ids = load(kind), prompt()
    plain = DynamicCache(config=model.config)
    expected, fed, _ = decode(model, ids, plain, make())
    cache = new_cache(model, reserve=6)
    logits, _, pointers = decode(model, ids, cache, make(), tokens=fed)
    torch.testing.assert_close(logits, expected, **CLOSE)
    assert stored_kv_bytes(cache) == stored_kv_bytes(plain)
    for mine, theirs in zip(cache.layers, plain.layers, strict=True):
        assert mine.get_seq_length() == theirs.get_seq_length()
        if method != "h2o":  # H2O reuses slots (see its test below)
            torch.testing.assert_close(mine.keys, theirs.keys, **CLOSE)
    # decoding writes into the room reserved at the first step: the keys never move again
    assert isinstance(cache.layers[1], InPlaceLayer) and len(set(pointers)) == 1


def test_room_is_allocated_not_stored_and_runs_out_gracefully(tiny_gqa):
    model, _ = tiny_gqa
    config = model.config
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * 16 * 4
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(0))
    gen = greedy_generate(model, ids, max_new_tokens=8)
    assert gen.kv_bytes_prefill == 30 * per_token and gen.kv_bytes_final == 37 * per_token
    assert gen.kv_allocated_bytes_prefill == gen.kv_allocated_bytes_final == 37 * per_token
    cache = new_cache(model, reserve=2)  # fewer than the steps: reallocates, still exact
    expected, fed, _ = decode(model, ids, DynamicCache(config=config), steps=5)
    logits, _, pointers = decode(model, ids, cache, steps=5, tokens=fed)
    torch.testing.assert_close(logits, expected, **CLOSE)
    assert len(set(pointers)) == 2 and stored_kv_bytes(cache) == 35 * per_token
    assert allocated_kv_bytes(cache) == (33 + 2) * per_token  # reallocated at 33 with room 2
    # a method that stores its own tensor hands the old buffer back at once
    layer = cache.layers[0]
    layer.keys, layer.values = layer.keys[:, :, 1:].clone(), layer.values[:, :, 1:].clone()
    assert layer.capacity() == 0 and allocated_kv_bytes(cache) < (33 + 2) * per_token


def explicit_attention(query, key, value, scaling, mask, softcap=None):
    """Float64 probabilities (B, H_q, q, S) -> (output (B, q, H_q, D), received (B, H_kv, S))."""
    groups = query.shape[1] // key.shape[1]
    k = key.double().repeat_interleave(groups, 1)
    logits = query.double() @ k.transpose(-1, -2) * scaling
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    probs = logits.masked_fill(~mask, float("-inf")).softmax(-1)
    output = probs @ value.double().repeat_interleave(groups, 1)
    received = probs.sum(2).view(key.shape[0], key.shape[1], groups, -1).sum(2)
    return output.transpose(1, 2), received


@pytest.mark.parametrize("q_len", [1, 7, 33])
@pytest.mark.parametrize("chunk_size", [1, 5, 64])
@pytest.mark.parametrize("masking", ["causal", "bool", "float", "softcap"])
def test_one_pass_attention_equals_explicit_probabilities(q_len, chunk_size, masking):
    g = torch.Generator().manual_seed(q_len)
    seq = 33
    query = torch.randn(2, 6, q_len, 8, generator=g)
    key, value = torch.randn(2, 2, seq, 8, generator=g), torch.randn(2, 2, seq, 8, generator=g)
    causal = torch.arange(seq) <= torch.arange(seq - q_len, seq).unsqueeze(1)  # (q, S)
    mask, given = causal, None
    if masking in ("bool", "float"):  # causal and random holes; each query sees itself
        mask = causal & (torch.rand(2, 1, q_len, seq, generator=g) > 0.3)
        mask[..., torch.arange(q_len), torch.arange(seq - q_len, seq)] = True
        given = mask if masking == "bool" else torch.zeros(mask.shape).masked_fill(~mask, -1e9)
    softcap = 2.0 if masking == "softcap" else None
    output, received = attention_and_received(
        query, key, value, scaling=0.3, attention_mask=given, softcap=softcap, chunk_size=chunk_size
    )
    expected_output, expected_received = explicit_attention(query, key, value, 0.3, mask, softcap)
    torch.testing.assert_close(output, expected_output.float(), **CLOSE)
    torch.testing.assert_close(received, expected_received.float(), **CLOSE)
    if masking == "causal":  # and the model's own kernel agrees on the output
        sdpa = F.scaled_dot_product_attention(
            query, key, value, attn_mask=causal, scale=0.3, enable_gqa=True
        )
        torch.testing.assert_close(output, sdpa.transpose(1, 2), **CLOSE)


class PlainH2O(H2O):
    """H2O as it was: the model's own attention, the scores recomputed from the layer's
    projections (prefill and every decoding step), top-k and a gather of the whole cache."""

    def hooks(self, model):
        return CacheMethod.hooks(self, model)

    def reduce_kv_decode(self, module, hidden_states, keys, values, kwargs):
        layer = module.layer_idx
        if layer not in self._scores:
            return keys, values
        self._seen[layer] += 1
        row = accumulated_attention(module, hidden_states, keys, kwargs, self.chunk_size)
        scores = F.pad(self._scores[layer], (0, 1)) + row
        added = torch.full((*scores.shape[:2], 1), self._seen[layer] - 1)
        positions = torch.cat((self._positions[layer], added), -1)
        n_kept = self.kept_tokens(self._seen[layer])
        if n_kept < keys.shape[-2]:
            idx = top_indices(scores, n_kept, self.sinks, self.recent_tokens(n_kept))
            scores, positions = scores.gather(2, idx), positions.gather(2, idx)
            keys, values = gather_tokens(keys, idx), gather_tokens(values, idx)
        self._scores[layer], self._positions[layer] = scores, positions
        return keys, values


@pytest.mark.parametrize("kind", ["gqa", "mha", "gemma"])
@pytest.mark.parametrize(
    "fields", [dict(budget=30, sinks=2), dict(ratio=0.3), dict(ratio=0.2, recent_ratio=0.0)]
)
def test_h2o_equals_its_plain_implementation(kind, fields, monkeypatch):
    model, ids = load(kind), prompt()
    plain = PlainH2O(**fields)
    expected, plain_cache = run(model, ids, [plain], steps=12)
    method = H2O(**fields)

    def recomputed(*args):
        raise AssertionError("H2O recomputed the attention its layers already computed")

    monkeypatch.setattr(h2o_module, "accumulated_attention", recomputed)
    logits, cache = run(model, ids, [method], steps=12, extra=expected[:-1].argmax(-1))
    torch.testing.assert_close(logits, expected, **CLOSE)
    assert set(method._positions) == set(plain._positions) and method._positions
    for layer, positions in plain._positions.items():
        assert torch.equal(method.positions(layer).sort(-1).values, positions)
        # each slot holds the key of the position H2O says it holds
        order = method.positions(layer).argsort(-1).unsqueeze(-1).expand(-1, -1, -1, 16)
        mine = cache.layers[layer].keys.gather(2, order)
        torch.testing.assert_close(mine, plain_cache.layers[layer].keys, **CLOSE)


def test_h2o_evicts_in_place_in_the_generation_loop(tiny_gqa):
    model, _ = tiny_gqa
    ids = torch.randint(0, 256, (1, 60), generator=torch.Generator().manual_seed(4))
    method = H2O(budget=20)
    cache = new_cache(model, reserve=8)
    _, fed, pointers = decode(model, ids, cache, [method], steps=8)
    assert len(set(pointers)) == 1  # the decoding evictions never copied the cache
    assert [layer.get_seq_length() for layer in cache.layers] == [20] * 4
    _, plain_cache = run(model, ids, [PlainH2O(budget=20)], steps=8, extra=torch.tensor(fed))
    assert allocated_kv_bytes(cache) > stored_kv_bytes(cache) == stored_kv_bytes(plain_cache)
    with method.applied(model):
        generated = greedy_generate(model, ids, max_new_tokens=9)
    assert generated.tokens[:-1] == fed


def test_attention_override_is_restored(tiny_gqa):
    model, _ = tiny_gqa
    modules = [layer.self_attn for layer in model.model.layers]
    calls = []

    def attend(module, query, key, value, attention_mask, **kwargs):
        calls.append(module.layer_idx)
        return attention_and_received(query, key, value, scaling=module.scaling)[0], None

    ids = prompt(12)
    with torch.inference_mode():
        expected = model(ids).logits
        with attention_override(modules[:1], attend):
            overridden = model(ids).logits
        after = model(ids).logits
    assert calls == [0]
    torch.testing.assert_close(overridden, expected, **CLOSE)
    assert torch.equal(after, expected)
    assert all(m.config is model.config for m in modules)


@pytest.mark.parametrize("kind", ["gqa", "mha", "gemma"])
def test_packed_decode_attention_equals_the_models_own(kind, monkeypatch):
    """The loop's decoding steps pack each KV group's query heads (harness.kvcache): same
    logits as the model's own sdpa attention, and the packed path is the one that ran."""
    model, ids = load(kind), prompt()
    expected, fed, _ = decode(model, ids, DynamicCache(config=model.config), steps=5)
    single_queries = []
    packed = kvcache._packed_decode_attention

    def spy(module, query, *args, **kwargs):
        single_queries.append(query.shape[2] == 1)
        return packed(module, query, *args, **kwargs)

    monkeypatch.setattr(kvcache, "_packed_decode_attention", spy)
    generated = greedy_generate(model, ids, max_new_tokens=6)
    assert generated.tokens[:-1] == fed
    torch.testing.assert_close(generated.last_logits, expected[-1], **CLOSE)
    layers = model.config.num_hidden_layers
    assert single_queries == [False] * layers + [True] * 5 * layers


def test_allocated_bytes_count_every_storage_a_layer_holds(tiny_gqa):
    """Allocated bytes include a compressed cache's codebooks (dataclass fields), and are
    never less than the bytes stored."""
    from methods.cache.spindlekv import SpindleKV

    model, _ = tiny_gqa
    ids = torch.randint(0, 256, (1, 80), generator=torch.Generator().manual_seed(6))
    with SpindleKV(ratio=0.3, window=8).applied(model):
        generated = greedy_generate(model, ids, max_new_tokens=4)
    assert generated.kv_allocated_bytes_final >= generated.kv_bytes_final > 0
    assert generated.kv_allocated_bytes_prefill >= generated.kv_bytes_prefill
