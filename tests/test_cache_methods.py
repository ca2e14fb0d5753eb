"""H2O, SnapKV, PyramidKV, SpindleKV on tiny random models (GQA and MHA Llama, Gemma-3)."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicSlidingWindowLayer

from harness.generation import greedy_generate
from harness.measure import stored_kv_bytes
from harness.models import ModelSpec
from methods.base import CacheMethod, Compose, MethodConfigError
from methods.cache.attention import apply_rope, attention_probs
from methods.cache.h2o import H2O
from methods.cache.knorm import KeyNorm
from methods.cache.pyramidkv import PyramidKV, pyramid_budgets
from methods.cache.snapkv import SnapKV
from methods.cache.spindlekv.codebook import Codebook, Grown, greedy_cover
from methods.cache.spindlekv.codebook_layer import CodebookLayer
from methods.cache.spindlekv.spindlekv import SpindleKV, round_robin, spindle_budgets
from methods.cache.streamingllm import StreamingLLM

LLAMA = dict(
    model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, vocab_size=260, max_position_embeddings=4096,
)  # fmt: skip
GEMMA = dict(
    LLAMA, model_type="gemma3_text", head_dim=16, query_pre_attn_scalar=16, sliding_window=16,
    layer_types=["sliding_attention", "full_attention"] * 2,
)  # fmt: skip
ARCHS = {"gqa": LLAMA, "mha": dict(LLAMA, num_key_value_heads=4), "gemma": GEMMA}
PROMPT = 96
METHODS = {
    "h2o": lambda **kw: H2O(**kw),
    "snapkv": lambda **kw: SnapKV(window=8, **kw),
    "knorm": lambda **kw: KeyNorm(**{"window": 8, **kw}),
    "pyramidkv": lambda **kw: PyramidKV(window=8, **kw),
    "spindlekv": lambda **kw: SpindleKV(window=8, **kw),
}


@functools.cache
def load(kind: str, attn: str = "sdpa") -> torch.nn.Module:
    torch.set_num_threads(1)
    spec = ModelSpec(name=kind, source="random", architecture=ARCHS[kind], attn_implementation=attn)
    return spec.load()[0]


def prompt(n: int = PROMPT, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def run(model, ids, methods=(), steps=3, extra=None) -> tuple[torch.Tensor, DynamicCache]:
    """Greedy prefill + ``steps`` decoding steps at the true positions: (logits, cache)."""
    cache = DynamicCache(config=model.config)
    with Compose(methods=list(methods)).applied(model):
        logits = [model(input_ids=ids, past_key_values=cache).logits[0, -1]]
        for t in range(steps):
            token = extra[t] if extra is not None else logits[-1].argmax()
            out = model(
                input_ids=token.view(1, 1),
                position_ids=torch.tensor([[ids.shape[1] + t]]),
                past_key_values=cache,
            )
            logits.append(out.logits[0, -1])
    return torch.stack(logits), cache


def lengths(cache) -> list[int]:
    return [layer.get_seq_length() for layer in cache.layers]


@pytest.mark.parametrize(
    "make, fields, field",
    [
        (SnapKV, dict(ratio=0.0), "ratio"),
        (SnapKV, dict(ratio=1.5), "ratio"),
        (PyramidKV, dict(budget=0), "budget"),
        (SnapKV, dict(budget=16, window=32), "window"),
        (SnapKV, dict(kernel_size=4), "kernel_size"),
        (SnapKV, dict(pooling="median"), "pooling"),
        (PyramidKV, dict(beta=0.5), "beta"),
        (H2O, dict(window=8), "window"),
        (H2O, dict(recent_ratio=1.5), "recent_ratio"),
        (SpindleKV, dict(gqa="mean"), "gqa"),
        (SpindleKV, dict(key_threshold=0.0), "key_threshold"),
        (SpindleKV, dict(codebook_scope="model"), "codebook_scope"),
        (SpindleKV, dict(beta=1.0), "beta"),
    ],
)
def test_bad_config_names_the_field(make, fields, field):
    with pytest.raises(MethodConfigError, match=f"method.{field}"):
        make(**fields)


@pytest.mark.parametrize("make", [PyramidKV, SpindleKV])
def test_pyramids_refuse_eager_attention(make):
    with pytest.raises(MethodConfigError, match="attn_implementation=sdpa"):
        make().validate_for(load("gqa", "eager").config)


class Probe(CacheMethod):
    """Records the helper's probabilities of every query of the prompt, per layer."""

    def compresses_layer(self, module, layer):
        return True

    def reduce_kv(self, module, hidden_states, keys, values, kwargs):
        cos, sin = kwargs["position_embeddings"]
        batch, seq, _ = hidden_states.shape
        k = module.k_proj(hidden_states).view(batch, seq, -1, module.head_dim).transpose(1, 2)
        k = apply_rope(
            module.k_norm(k) if hasattr(module, "k_norm") else k, cos[:, None], sin[:, None]
        )
        probs = attention_probs(module, hidden_states, k, (cos, sin), first_query=0)
        self.probs[module.layer_idx] = probs.flatten(1, 2)  # (B, H_q, S, S)
        return keys, values


@pytest.mark.parametrize("kind", ["gqa", "gemma"])
def test_attention_helper_equals_eager_probabilities(kind):
    model, probe = load(kind, "eager"), Probe()
    probe.probs = {}
    with torch.inference_mode(), probe.hooks(model):
        out = model(
            input_ids=prompt(40),
            past_key_values=DynamicCache(config=model.config),
            output_attentions=True,
        )
    assert len(probe.probs) == len(out.attentions) == 4
    for layer, reference in enumerate(out.attentions):
        torch.testing.assert_close(probe.probs[layer], reference.float(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["gqa", "mha", "gemma"])
@pytest.mark.parametrize("name", METHODS)
def test_ratio_one_is_the_full_cache(kind, name):
    model, ids = load(kind), prompt()
    full, _ = run(model, ids)
    same, cache = run(model, ids, [METHODS[name](ratio=1.0)])
    assert torch.equal(full, same)
    assert lengths(cache)[1] == PROMPT + 3
    with METHODS[name](ratio=1.0).applied(model):
        generated = greedy_generate(model, ids, max_new_tokens=5)
    assert generated.tokens == greedy_generate(model, ids, max_new_tokens=5).tokens


@pytest.mark.parametrize("kind", ["gqa", "mha"])
@pytest.mark.parametrize("name", METHODS)
def test_kept_tokens_follow_the_budget(kind, name):
    # SpindleKV in the paper's token-count mode (its default spends bytes, see test_spindlekv)
    extra = {"budget_mode": "tokens"} if name == "spindlekv" else {}
    method = METHODS[name](budget=40, **extra)
    _, cache = run(load(kind), prompt(), [method], steps=0)
    if name in ("h2o", "snapkv", "knorm"):
        assert lengths(cache) == [40] * 4
        return
    pyramid = pyramid_budgets if name == "pyramidkv" else spindle_budgets
    expected = pyramid(40, PROMPT, 8, 4, method.beta)
    assert lengths(cache) == expected and sum(expected) == 4 * 40
    assert expected == sorted(expected, reverse=True) and expected[0] > expected[-1]


@pytest.mark.parametrize("kind", ["gqa", "mha"])
def test_knorm_keeps_the_smallest_keys_of_each_head(kind):
    model, ids = load(kind), prompt()
    _, full = run(model, ids, steps=0)
    _, kept = run(model, ids, [KeyNorm(budget=40)], steps=0)
    for full_layer, kept_layer in zip(full.layers, kept.layers, strict=True):
        norms = full_layer.keys.norm(dim=-1)  # (1, H_kv, S)
        smallest = norms.topk(40, dim=-1, largest=False).indices.sort(dim=-1).values
        expected = full_layer.keys.gather(2, smallest.unsqueeze(-1).expand(-1, -1, -1, 16))
        assert torch.equal(kept_layer.keys, expected)


def test_pyramid_formulas():
    # PyramidKV: k = 32 mean non-window tokens, deepest k / 20, shallowest 2k - k / 20
    assert pyramid_budgets(40, 96, 8, 4, 20.0) == [8 + 62, 8 + 42, 8 + 22, 8 + 2]
    capped = pyramid_budgets(80, 96, 8, 4, 20.0)  # 2k - k/20 > 88: capped at 88, min 2k - 88
    assert capped == [96, 8 + 77, 8 + 67, 8 + 56] and sum(capped) == 320
    # SpindleKV: r_c = 32/88 in (beta, alpha]: from 2 r_c - beta down to beta
    middle = spindle_budgets(40, 96, 8, 4, 0.05)
    assert abs(middle[0] - 8 - (2 * 32 / 88 - 0.05) * 88) < 1 and middle[-1] - 8 in (4, 5)
    high = spindle_budgets(80, 96, 8, 4, 0.05)  # r_c = 72/88 > alpha: from 1 to 2 r_c - 1
    assert high[0] == 96 and abs(high[-1] - 8 - (2 * 72 / 88 - 1) * 88) < 1
    for budgets, target in ((middle, 40), (high, 80), (spindle_budgets(9, 96, 8, 5, 0.05), 9)):
        assert sum(budgets) == target * len(budgets)


@pytest.mark.parametrize("name", METHODS)
def test_window_and_sinks_are_always_kept(name):
    model, ids = load("gqa"), prompt()
    _, full = run(model, ids, steps=0)
    if name == "h2o":
        method, first, last = H2O(budget=30, sinks=2), 2, 15  # recent: half of 30
    else:
        method, first, last = METHODS[name](budget=30, sinks=2), 2, 8
    _, cache = run(model, ids, [method], steps=0)
    for layer, reference in zip(cache.layers, full.layers, strict=True):
        if isinstance(layer, CodebookLayer):
            assert (layer.positions[..., :first] == torch.arange(first)).all()
            assert (layer.positions[..., -last:] == torch.arange(PROMPT - last, PROMPT)).all()
            continue
        # H2O's layers compute their attention themselves (one pass that also scores the
        # keys): the deeper layers' states equal the full cache's within float32 rounding
        same = functools.partial(torch.testing.assert_close, atol=1e-6, rtol=1e-5)
        same(layer.keys[..., :first, :], reference.keys[..., :first, :])
        same(layer.values[..., -last:, :], reference.values[..., -last:, :])


@pytest.mark.parametrize("name", METHODS)
def test_decoding_after_eviction_uses_true_positions(name):
    """The first layer's key of a generated token depends only on the token and its RoPE
    position: it must equal the full cache's key at the true position, not at the (shorter)
    cache length."""
    model, ids = load("gqa"), prompt()
    method = (
        METHODS[name](ratio=0.3)
        if name != "spindlekv"
        else SpindleKV(window=8, ratio=0.3, key_threshold=1.0, value_threshold=1.0)
    )
    logits, cache = run(model, ids, [method], steps=2)
    tokens = logits[:2].argmax(-1)
    _, full = run(model, torch.cat([ids[0], tokens]).view(1, -1), steps=0)
    layer, reference = cache.layers[0], full.layers[0].keys
    assert layer.get_seq_length() < PROMPT
    keys = layer.decoded()[0] if isinstance(layer, CodebookLayer) else layer.keys
    if isinstance(method, H2O):  # its decoding evictions reuse slots: find them by position
        at = method.positions(0).argsort(-1).unsqueeze(-1).expand_as(keys)
        keys = keys.gather(2, at)
    torch.testing.assert_close(keys[..., -2:, :], reference[..., PROMPT:, :], atol=1e-5, rtol=1e-4)
    if isinstance(layer, CodebookLayer):  # lossless codebook: every decoded key at its position
        assert (layer.positions[..., -2:] == torch.tensor([PROMPT, PROMPT + 1])).all()
        at = layer.positions.long().unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])
        kept = layer.heads.any(dim=2) if layer.heads is not None else torch.ones_like(at[..., 0])
        expected = reference.gather(2, at)
        torch.testing.assert_close(keys[kept.bool()], expected[kept.bool()], atol=1e-5, rtol=1e-4)


def test_h2o_holds_its_budget_while_decoding_and_resets_per_request():
    model, method = load("gqa"), H2O(budget=30)
    _, cache = run(model, prompt(), [method], steps=6)
    assert lengths(cache) == [30] * 4
    assert all(scores.shape == (1, 2, 30) for scores in method._scores.values())
    assert set(method._seen.values()) == {PROMPT + 6}
    _, cache = run(model, prompt(50, seed=1), [method], steps=1)
    assert lengths(cache) == [30] * 4 and set(method._seen.values()) == {51}


def test_spindlekv_gqa_round_robin_takes_every_query_heads_best():
    scores = torch.rand(1, 2, 3, 20, generator=torch.Generator().manual_seed(0))
    merged = round_robin(scores)
    for head in range(2):
        best = set(scores[0, head].argmax(-1).tolist())
        assert best <= set(merged[0, head].topk(len(best)).indices.tolist())


def naive_codebook(vectors: torch.Tensor, theta: float) -> tuple[list[int], torch.Tensor]:
    """METHODS.md's greedy loop, verbatim."""
    unit = vectors / vectors.norm(dim=-1, keepdim=True)
    graph = unit @ unit.T > theta
    centres, ref = [], torch.full((len(vectors),), -1)
    while graph.any():
        i = int(graph.sum(1).argmax())
        centres.append(i)
        row = graph[i].clone()
        ref[row] = len(centres) - 1
        graph &= torch.outer(~row, ~row)
    return centres, ref


def clustered(n: int = 60, dim: int = 8, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(6, dim, generator=gen)
    picks = torch.randint(0, 6, (n,), generator=gen)
    noise = 0.12 * torch.randn(n, dim, generator=gen)
    return centres[picks] * (1 + torch.rand(n, 1, generator=gen)) + noise


@pytest.mark.parametrize("scope", ["head", "layer"])
@pytest.mark.parametrize("magnitude", [True, False])
def test_codebook_is_the_papers_greedy_and_members_stay_within_theta(scope, magnitude):
    vectors = clustered().view(1, 2, 30, 8)
    unit = torch.nn.functional.normalize(vectors[0, 0], dim=-1)
    centres, ref = greedy_cover(unit, 0.98, block=7)
    expected_centres, expected_ref = naive_codebook(vectors[0, 0], 0.98)
    assert centres.tolist() == expected_centres and torch.equal(ref, expected_ref)
    kept = torch.arange(30).expand(1, 2, 30)  # every token of both heads, once each
    weights = torch.ones_like(kept)
    book = Codebook.from_vectors(vectors, kept, weights, 0.98, scope, magnitude, 16, torch.float32)
    assert book.entries.shape[0] < 60 and book.refs.shape == (1, 2, 30)
    near = vectors[:, :, :2] * 1.5 + 1e-3  # near-duplicates of existing tokens: reuse entries
    far = torch.randn(1, 2, 1, 8, generator=torch.Generator().manual_seed(5))
    entries = book.entries.shape[0]
    book.append(near)
    assert book.entries.shape[0] == entries
    book.append(far)
    assert book.entries.shape[0] == entries + (2 if scope == "head" else 1 + int(
        torch.cosine_similarity(far[0, 0, 0], far[0, 1, 0], dim=0) <= 0.98))  # fmt: skip
    every = torch.cat([vectors, near, far], dim=2)
    decoded = book.decode()
    cos = torch.cosine_similarity(decoded, every, dim=-1)
    assert (cos > 0.98 - 1e-6).all()
    if magnitude:
        torch.testing.assert_close(decoded.norm(dim=-1), every.norm(dim=-1))
    owners = book.owner.long()[book.refs.long()]
    if scope == "head":
        assert torch.equal(owners, torch.arange(2).view(1, 2, 1).expand(1, 2, 33))


@pytest.mark.parametrize("kind", ["gqa", "mha"])
@pytest.mark.parametrize("name", [*METHODS, "spindlekv-union"])
@pytest.mark.parametrize("steps", [0, 2])
def test_stored_bytes_equal_a_count_from_the_shapes(kind, name, steps):
    model = load(kind)
    if name == "spindlekv-union":
        method = SpindleKV(window=8, ratio=0.3, gqa="union")
    else:
        method = METHODS[name](ratio=0.3)
    _, cache = run(model, prompt(), [method], steps=steps)
    heads, dim = model.config.num_key_value_heads, 16
    copies = model.config.num_attention_heads // heads
    expected = reserve = 0
    for layer in cache.layers:
        if not isinstance(layer, CodebookLayer):
            expected += 2 * heads * layer.keys.shape[-2] * dim * 4  # K and V, float32
            continue
        slots = layer.positions.shape[-1]
        assert layer.keys.shape[-2] == 0 and layer.positions.shape == (1, heads, slots)
        for book in (layer.key_book, layer.value_book):
            assert book.refs.shape == (1, heads, slots)  # per KV head: never a repeat_kv copy
            expected += book.entries.shape[0] * (dim * 4 + 4) + heads * slots * (4 + 4)
            reserve += Grown.CHUNK * ((dim * 4 + 4) + heads * (4 + 4))
        expected += heads * slots * 4  # positions
        reserve += Grown.CHUNK * heads * 4
        if name == "spindlekv" and copies > 1:  # head repeat: which copies keep each token
            assert layer.heads.shape == (1, heads, copies, slots)
            expected += heads * copies * slots
            reserve += Grown.CHUNK * heads * copies
        else:
            assert layer.heads is None
    if steps == 0:  # right after prefill: exactly the shapes
        assert stored_kv_bytes(cache) == expected
    else:  # decoding grows the codebooks in place: room for a few more tokens is counted too
        assert expected <= stored_kv_bytes(cache) <= expected + reserve


def test_gemma3_sliding_layers_are_left_alone():
    model, ids = load("gemma"), prompt(40)
    full_bytes = stored_kv_bytes(run(model, ids, steps=0)[1])
    for name, make in METHODS.items():
        _, cache = run(model, ids, [make(ratio=0.4)], steps=2)
        sliding = [layer for layer in cache.layers if isinstance(layer, DynamicSlidingWindowLayer)]
        assert len(sliding) == 2 and all(layer.keys.shape[-2] == 15 for layer in sliding), name
        full = [layer.get_seq_length() for layer in cache.layers[1::2]]
        assert max(full) < 40 + 2, name
        if name == "spindlekv":
            assert all(isinstance(layer, CodebookLayer) for layer in cache.layers[1::2])
        with make(ratio=0.4).applied(model):
            out = greedy_generate(model, ids, max_new_tokens=3)
        assert len(out.tokens) == 3 and out.kv_bytes_prefill < full_bytes, name


@torch.inference_mode()
def test_a_cache_method_run_without_a_cache_fails_instead_of_doing_nothing(tiny_gqa):
    model, _ = tiny_gqa
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    with StreamingLLM(budget=8).applied(model):
        with pytest.raises(RuntimeError, match="called without a KV cache"):
            model(input_ids=ids, use_cache=False)
