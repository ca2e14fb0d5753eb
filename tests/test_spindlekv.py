"""SpindleKV: head repeat as the paper describes, equal memory, and the codebook attention."""

from __future__ import annotations

import functools
import json

import pytest
import torch
import torch.nn.functional as F
from test_cache_methods import ARCHS, PROMPT, clustered, load, naive_codebook, prompt, run
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from harness.generation import greedy_generate
from harness.measure import stored_kv_bytes
from harness.models import ModelSpec
from methods.base import MethodConfigError, attention_modules
from methods.cache.spindlekv import SpindleKV, codebook_attention
from methods.cache.spindlekv.codebook import Codebook
from methods.cache.spindlekv.codebook_layer import CodebookLayer
from methods.cache.spindlekv.spindle_plan import keep_order, search_target
from methods.cache.spindlekv.spindle_prefill import slots

LOSSLESS = dict(key_threshold=1.0, value_threshold=1.0)  # every token its own entry
_ALLOWED: dict[int, torch.Tensor] = {}


def per_head_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Plain softmax attention of each query head over the keys ``_ALLOWED`` gives it."""
    groups = query.shape[1] // key.shape[1]
    keys, values = (t.repeat_interleave(groups, dim=1) for t in (key, value))
    logits = query @ keys.transpose(-1, -2) * scaling  # (B, H_q, q, L)
    allowed = _ALLOWED[module.layer_idx][None, :, None, :]
    probs = logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    return (probs @ values).transpose(1, 2), None


AttentionInterface.register("test_per_head", per_head_attention)
AttentionMaskInterface.register("test_per_head", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


@torch.inference_mode()
def decode_by_hand(model, ids, token, kept: dict[int, torch.Tensor]) -> torch.Tensor:
    """Logits of one decoding step after a full-cache prefill, where query head h of layer
    i sees only the prompt positions kept[i][h] and the new token."""
    _, cache = run(model, ids, steps=0)
    length = ids.shape[1] + 1
    for layer, positions in kept.items():
        allowed = torch.zeros(positions.shape[0], length, dtype=torch.bool)
        allowed.scatter_(1, positions, True)
        allowed[:, -1] = True
        _ALLOWED[layer] = allowed
    model.set_attn_implementation("test_per_head")
    try:
        out = model(
            input_ids=token.view(1, 1),
            position_ids=torch.tensor([[ids.shape[1]]]),
            past_key_values=cache,
        )
    finally:
        model.set_attn_implementation("sdpa")
    return out.logits[0, -1]


@functools.cache
def sharp_gqa() -> torch.nn.Module:
    """The tiny GQA model with 8x query weights: peaked attention, so that the query heads
    of a group rank the tokens differently (on the plain random model they barely do)."""
    torch.manual_seed(0)
    spec = ModelSpec(name="gqa", source="random", architecture=ARCHS["gqa"])
    model = spec.load()[0]
    with torch.no_grad():
        for module in attention_modules(model):
            module.q_proj.weight.mul_(8)
    return model


@torch.inference_mode()
def own_scores(model, ids, window: int = 8) -> list[torch.Tensor]:
    """Per layer, each query head's score of the prompt's evictable tokens, (H_q, S - window):
    ``sum_{b in window} A[b, a] / (l - a)`` from the eager attention, max-pooled (kernel 7)."""
    model.set_attn_implementation("eager")
    try:
        attentions = model(input_ids=ids, output_attentions=True).attentions
    finally:
        model.set_attn_implementation("sdpa")
    seq_len = ids.shape[1]
    out = []
    for probs in attentions:  # (1, H_q, S, S)
        scores = probs[0, :, -window:].sum(dim=1) / torch.arange(seq_len, 0, -1)
        scores = F.max_pool1d(scores[:, None, :-window], 7, stride=1, padding=3)[:, 0]
        out.append(scores)
    return out


def own_positions(layer: CodebookLayer) -> list[torch.Tensor]:
    """Per query head (batch row 0), the positions its copy of the KV head keeps."""
    if layer.heads is None:
        return [layer.positions[0, h] for h in range(layer.positions.shape[1])]
    return [layer.positions[0, h][copy] for h in range(layer.positions.shape[1])
            for copy in layer.heads[0, h]]  # fmt: skip


def test_head_repeat_each_query_head_attends_exactly_its_own_tokens():
    model, ids, token = sharp_gqa(), prompt(), torch.tensor(7)
    method = SpindleKV(window=8, ratio=0.5, **LOSSLESS)
    logits, cache = run(model, ids, [method], steps=1, extra=[token])
    kept = {}
    for i, layer in enumerate(cache.layers):
        assert isinstance(layer, CodebookLayer) and layer.heads is not None
        own = own_positions(layer)
        assert len(own) == model.config.num_attention_heads
        kept[i] = torch.stack(own)[:, :-1].long()  # the last one is the decoded token
    # each query head keeps the best tokens by its own score (METHODS.md 2.1, by hand)
    for i, scores in enumerate(own_scores(model, ids)):
        ranked = scores.argsort(dim=-1, descending=True, stable=True)  # ties: lower index first
        best = ranked[:, : kept[i].shape[1] - 8]  # (H_q, n - window)
        assert torch.equal(kept[i][:, :-8], best.sort(dim=-1).values), i
    # query heads sharing a KV head keep different tokens (no KV-head eviction can do this),
    # and the KV head stores their union once
    assert any(not torch.equal(k[0], k[1]) or not torch.equal(k[2], k[3]) for k in kept.values())
    layer = cache.layers[0]
    assert layer.positions.shape[-1] < 2 * kept[0].shape[1] + 1
    reference = decode_by_hand(model, ids, token, kept)
    torch.testing.assert_close(logits[1], reference, atol=1e-5, rtol=1e-4)
    # the union variant: one token set per KV head, shared by its query heads
    union = SpindleKV(window=8, ratio=0.5, gqa="union", **LOSSLESS)
    union_logits, union_cache = run(model, ids, [union], steps=1, extra=[token])
    assert union_cache.layers[0].heads is None
    assert not torch.allclose(union_logits[1], reference, atol=1e-3)


def test_codebook_over_copies_is_the_papers_greedy_on_the_repeated_heads():
    vectors = clustered(40, 8).view(1, 1, 40, 8)
    gen = torch.Generator().manual_seed(3)
    chosen = torch.stack([torch.randperm(40, generator=gen)[:25] for _ in range(3)])
    kept, heads = slots(chosen.unsqueeze(0), kv_heads=1, seq_len=40)  # 3 copies of a KV head
    weights = heads.sum(dim=2)
    assert kept.shape[-1] == len(torch.unique(chosen)) and int(weights.sum()) == 75
    book = Codebook.from_vectors(vectors, kept, weights, 0.98, "head", True, 8, torch.float32)
    # the paper's loop over the repeated heads' tokens (identical copies side by side)
    multiset = chosen.flatten().sort().values
    centres, naive_ref = naive_codebook(vectors[0, 0, multiset], 0.98)
    assert book.entries.shape[0] == len(centres)
    ours = dict(zip(kept[0, 0].tolist(), book.refs[0, 0].tolist(), strict=True))
    mine = torch.tensor([ours[t] for t in multiset.tolist()])
    assert torch.equal(mine[:, None] == mine[None, :], naive_ref[:, None] == naive_ref[None, :])
    torch.testing.assert_close(book.decode().norm(dim=-1), vectors[0, 0][kept].norm(dim=-1))


@pytest.mark.parametrize("gqa", ["repeat", "union"])
@pytest.mark.parametrize("ratio", [0.25, 0.4])
def test_bytes_mode_stores_the_requested_share_of_the_full_cache(gqa, ratio):
    model, ids = load("gqa"), prompt()
    full = stored_kv_bytes(run(model, ids, steps=0)[1])
    method = SpindleKV(window=8, ratio=ratio, gqa=gqa)
    _, cache = run(model, ids, [method], steps=0)
    stored, stats = stored_kv_bytes(cache), method.last_stats()
    assert stats["bytes"] == stored and stats["full_bytes"] == full
    assert stored <= ratio * full
    # tightest: within the tolerance, or one more token per head would not fit
    target, search = stats["target_tokens"], stats["search"]
    assert ratio - stored / full <= method.ratio_tolerance or search[str(target + 1)] > ratio
    json.dumps(stats)
    for row, layer in zip(stats["layers"], cache.layers, strict=True):
        assert {len(p) for p in own_positions(layer)} == {row["kept_tokens"]}
        assert row["key_entries"] == layer.key_book.entries.shape[0]
        assert row["value_entries"] == layer.value_book.entries.shape[0]
        assert row["bytes"] == layer.stored_nbytes()


def test_bytes_mode_spends_the_codebooks_savings_on_more_tokens():
    model, ids = load("gqa"), prompt()
    sharing = dict(window=8, ratio=0.3, key_threshold=0.2, value_threshold=0.2)
    tokens, bytes_ = SpindleKV(budget_mode="tokens", **sharing), SpindleKV(**sharing)
    _, by_count = run(model, ids, [tokens], steps=0)
    _, by_bytes = run(model, ids, [bytes_], steps=0)
    assert tokens.last_stats()["target_tokens"] == round(0.3 * PROMPT)
    assert bytes_.last_stats()["target_tokens"] > tokens.last_stats()["target_tokens"]
    assert (
        stored_kv_bytes(by_count)
        < stored_kv_bytes(by_bytes)
        <= 0.3 * bytes_.last_stats()["full_bytes"]
    )


def test_search_finds_the_largest_target_within_budget():
    calls = []

    def cost(t: int) -> int:
        calls.append(t)
        return 1000 + 37 * t

    target, seen = search_target(cost, budget=5000, start=50, low=1, high=400, tolerance=10)
    assert target == 108 and seen[108] <= 5000 < 1000 + 37 * 109 and len(calls) <= 3
    assert search_target(cost, budget=500, start=50, low=1, high=400, tolerance=10)[0] == 1


def test_keep_order_puts_sinks_then_newest_then_scores():
    scores = torch.tensor([[[0.0, 5.0, 1.0, 9.0, 3.0, 2.0, 8.0, 7.0]]])
    assert keep_order(scores, sinks=1, window=2)[0, 0].tolist() == [0, 7, 6, 3, 1, 4, 5, 2]


@pytest.mark.parametrize(
    "kind, gqa", [("sharp", "repeat"), ("gqa", "repeat"), ("gqa", "union"), ("mha", "repeat")]
)
def test_codebook_attention_equals_the_materialising_reading(kind, gqa):
    model, ids = sharp_gqa() if kind == "sharp" else load(kind), prompt()
    fields = dict(window=8, ratio=0.3, gqa=gqa, key_threshold=0.9, value_threshold=0.8)
    fast, fast_cache = run(model, ids, [SpindleKV(**fields)], steps=4)
    plain, _ = run(model, ids, [SpindleKV(decode_attention="materialize", **fields)], steps=4)
    layer = fast_cache.layers[0]
    assert layer.key_book.entries.shape[0] < layer.positions.numel()  # entries are shared
    if kind == "sharp":  # copies keep different tokens, and some KV heads have padding slots
        assert not layer.heads.all()
        assert any((~layer.heads.any(dim=2)).any() for layer in fast_cache.layers)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-4)
    generated = []
    eager, _ = run(model, ids, [SpindleKV(decode_attention="codebook", **fields)], steps=4)
    torch.testing.assert_close(eager, plain, atol=1e-5, rtol=1e-4)
    for mode in ("fused", "codebook", "materialize"):
        with SpindleKV(decode_attention=mode, **fields).applied(model):
            generated.append(greedy_generate(model, ids, max_new_tokens=6).tokens)
    assert generated[0] == generated[1] == generated[2]


def test_apply_restores_the_attention_and_the_rope_table_is_the_models():
    model, ids = load("gemma"), prompt(40)
    method = SpindleKV(window=8, ratio=0.4)
    _, cache = run(model, ids, [method], steps=2)
    assert model.config._attn_implementation == "sdpa"
    assert not any(m in codebook_attention._BOUND for m in attention_modules(model))
    layer = cache.layers[1]
    assert isinstance(layer, CodebookLayer) and not layer.attending
    positions = torch.arange(60).view(1, 60)
    cos, sin = layer.rope(positions, layer.key_book.entries)
    rows = layer.table.rows(positions[0], layer.key_book.entries, last=59)
    torch.testing.assert_close(rows, torch.cat([cos[0, :, :8], sin[0, :, :8]], dim=-1))
    stats = method.last_stats()  # Gemma-3: the ratio is over the layers it compresses
    assert [row["layer"] for row in stats["layers"]] == [1, 3]
    assert stats["bytes"] <= 0.4 * stats["full_bytes"]


@pytest.mark.parametrize(
    "fields, field",
    [
        (dict(budget_mode="memory"), "budget_mode"),
        (dict(decode_attention="flash"), "decode_attention"),
        (dict(ratio_tolerance=0.5), "ratio_tolerance"),
    ],
)
def test_bad_config_names_the_field(fields, field):
    with pytest.raises(MethodConfigError, match=f"method.{field}"):
        SpindleKV(**fields)


@torch.inference_mode()
def test_an_attention_that_bypasses_the_codebook_attention_fails_loudly():
    """Were another kernel to attend (here: sdpa switched back in), it would see only the
    newest token: the step must fail, not decode from a near-empty cache."""
    model, ids = load("gqa"), prompt()
    cache = DynamicCache(config=model.config)
    with SpindleKV(window=8, ratio=0.3).applied(model):
        model(input_ids=ids, past_key_values=cache)
        model.set_attn_implementation("sdpa")
        with pytest.raises(RuntimeError, match="never read SpindleKV's codebooks"):
            model(
                input_ids=ids[:, :1], position_ids=torch.tensor([[PROMPT]]), past_key_values=cache
            )
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("scope", ["head", "layer"])
def test_appending_several_vectors_at_once_is_appending_them_in_order(scope):
    vectors = clustered(48, 8, seed=4).view(1, 2, 24, 8)
    kept, weights = torch.arange(16).expand(1, 2, 16), torch.ones(1, 2, 16, dtype=torch.long)
    far = 3 * torch.randn(1, 2, 4, 8, generator=torch.Generator().manual_seed(9))
    new = torch.cat([vectors[:, :, 16:], far, far * 1.01 + 1e-3], dim=2)
    books = [
        Codebook.from_vectors(
            vectors[:, :, :16], kept, weights, 0.98, scope, True, 8, torch.float32
        )
        for _ in range(2)
    ]
    before = books[0].entries.shape[0]
    books[0].append(new)  # 12 steps at once: later ones reuse entries earlier ones made
    for step in range(new.shape[2]):
        books[1].append(new[:, :, step : step + 1])
    assert (books[0].refs[..., -4:] >= before).any()  # a near-duplicate joined a new entry
    for name in ("entries", "owner", "refs", "magnitudes"):
        assert torch.equal(getattr(books[0], name), getattr(books[1], name)), name


def test_folding_every_few_steps_reaches_the_same_codebooks():
    model, ids = load("gqa"), prompt()
    forced = torch.tensor([5, 9, 200, 7])
    fields = dict(window=8, ratio=0.3, key_threshold=0.9, value_threshold=0.8)
    _, every = run(model, ids, [SpindleKV(**fields)], steps=4, extra=forced)
    logits, batched = run(model, ids, [SpindleKV(fold_every=4, **fields)], steps=3, extra=forced)
    assert batched.layers[0].keys.shape[-2] == 3  # three tokens wait, attended as they are
    plain, _ = run(
        model, ids, [SpindleKV(fold_every=4, decode_attention="materialize", **fields)], 3, forced
    )
    torch.testing.assert_close(logits, plain, atol=1e-5, rtol=1e-4)
    _, batched = run(model, ids, [SpindleKV(fold_every=4, **fields)], steps=4, extra=forced)
    first, second = every.layers[0], batched.layers[0]  # layer 0: the same new keys and values
    assert second.keys.shape[-2] == 0 and torch.equal(first.positions, second.positions)
    for book in ("key_book", "value_book"):
        a, b = getattr(first, book), getattr(second, book)
        assert torch.equal(a.refs, b.refs) and torch.allclose(a.entries, b.entries, atol=1e-6)


def test_a_token_budget_in_bytes_mode_is_the_bytes_of_that_many_full_tokens():
    model, ids = load("gqa"), prompt()
    method = SpindleKV(window=8, budget=30)
    _, cache = run(model, ids, [method], steps=0)
    stats = method.last_stats()
    assert stats["ratio_requested"] == pytest.approx(30 / PROMPT)
    assert stored_kv_bytes(cache) <= 30 / PROMPT * stats["full_bytes"]


@pytest.mark.parametrize("kind", ["gqa", "gemma"])
def test_the_harness_decoding_loop_decodes_spindlekvs_layers_as_a_plain_loop(kind):
    """harness.generation's loop (in-place cache layers, packed decode attention) leaves the
    layers SpindleKV installs to it: same bytes and logits as a DynamicCache loop."""
    model, ids = load(kind), prompt()
    fields = dict(window=8, ratio=0.3, key_threshold=0.9, value_threshold=0.8)
    with SpindleKV(**fields).applied(model):
        generated = greedy_generate(model, ids, max_new_tokens=5)
    fed = torch.tensor(generated.tokens[:4])
    logits, cache = run(model, ids, [SpindleKV(**fields)], steps=4, extra=fed)
    assert sum(isinstance(layer, CodebookLayer) for layer in cache.layers) >= 2
    assert generated.kv_bytes_final == stored_kv_bytes(cache)
    torch.testing.assert_close(generated.last_logits, logits[-1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("gqa", ["repeat", "union"])
def test_compress_sliding_codes_the_sliding_layers_and_drops_what_the_window_passes(gqa):
    model, ids = load("gemma"), prompt()
    window, steps = model.config.sliding_window, 20  # every prompt token leaves the window
    fields = dict(window=4, ratio=0.4, compress_sliding=True, gqa=gqa, **LOSSLESS)
    method = SpindleKV(**fields)
    _, prefilled = run(model, ids, [method], steps=0)
    _, full = run(model, ids, steps=0)
    assert 0.3 < stored_kv_bytes(prefilled) / stored_kv_bytes(full) <= 0.4  # equal memory
    stats = json.loads(json.dumps(method.last_stats()))
    sliding = [i for i, kind in enumerate(model.config.layer_types) if kind != "full_attention"]
    assert stats["compressed_layers"] == [0, 1, 2, 3]
    assert [layer["layer"] for layer in stats["layers"] if layer.get("sliding")] == sliding
    assert 0.25 < stats["sliding"]["ratio"] <= 0.4
    for layer in stats["layers"]:
        assert sum(layer["bytes_by_part"].values()) == layer["bytes"]
        assert sum(layer["key_entries_per_head"]) == layer["key_entries"]
    logits, cache = run(model, ids, [SpindleKV(**fields)], steps=steps)
    plain, _ = run(model, ids, [SpindleKV(decode_attention="materialize", **fields)], steps)
    torch.testing.assert_close(logits, plain, atol=1e-5, rtol=1e-4)
    # after `steps` tokens a sliding layer holds the last window - 1 positions, as a full one
    tokens = logits[:steps].argmax(-1)
    _, reference = run(model, torch.cat([ids[0], tokens]).view(1, -1), steps=0)
    last = PROMPT + steps - 1
    for i in sliding:
        layer = cache.layers[i]
        assert isinstance(layer, CodebookLayer) and layer.window == window
        expected = torch.arange(last + 2 - window, last + 1, dtype=torch.int32)
        assert (layer.positions == expected).all() and layer.heads is None
    # the first layer's keys and values depend on the tokens alone: the same tokens exactly
    keys, values = cache.layers[0].decoded()
    torch.testing.assert_close(keys, reference.layers[0].keys, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(values, reference.layers[0].values, atol=1e-5, rtol=1e-4)
