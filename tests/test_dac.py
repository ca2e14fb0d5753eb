"""DAC the authors' way, prompt methods on sliding-window models, and DAC's
optimised scoring pass against the plain one.

The reference here is an independent re-statement of the authors' ``dynamic_attn_ppl`` loop
(QQQ-yi/DAC ``compressor.py``): eager attention with ``output_attentions`` for every layer
and head, cross-entropy losses, column sums, additive fusion, ``1 + int((m - 1)(1 - r'))``
tokens per step. kvbench's DAC must keep the same positions at every step.
"""

from __future__ import annotations

import pytest
import torch

from harness.models import ModelSpec
from methods.base import PromptParts
from methods.prompt.compressor import Compressor, chunk_spans
from methods.prompt.dac import DAC
from methods.prompt.llmlingua import LLMLingua
from tests.test_prompt_methods import QUESTION, SHOT, TEXT, build

WINDOW = 16
GEMMA = {
    "model_type": "gemma3_text",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "query_pre_attn_scalar": 16,
    "vocab_size": 260,
    "max_position_embeddings": 4096,
    "sliding_window": WINDOW,
    "layer_types": [
        "sliding_attention",
        "sliding_attention",
        "sliding_attention",
        "full_attention",
    ],
    "final_logit_softcapping": 0.1,  # small: random logits are ~0.2
}
LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 260,
    "max_position_embeddings": 8192,
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(arch: str, attn: str = "sdpa") -> tuple[torch.nn.Module, object]:
    """The same random weights (seed 0) under either attention implementation."""
    architecture = {"gemma": GEMMA, "llama": LLAMA}[arch]
    return ModelSpec(arch, "random", architecture=architecture, attn_implementation=attn).load()


@pytest.fixture(scope="module")
def models() -> dict[str, tuple]:
    return {(a, i): tiny(a, i) for a in ("gemma", "llama") for i in ("sdpa", "eager")}


def test_step_sizes_follow_the_authors_code_or_the_exact_rate():
    """Hand-computed. n = 11, r = 0.5, T = 2: r' = 1 - 0.5 ** 0.5 = 0.29289; the authors keep
    1 + int(10 * 0.70711) = 8, then 1 + int(7 * 0.70711) = 1 + int(4.9497) = 5; the exact
    rate keeps round(11 * 0.70711) = 8, then round(5.5) = 6. n = 460, T = 4 (the default,
    460 // 100): r' = 0.15910; 1 + int(459 * 0.84090) = 386, 1 + int(385 * 0.84090) = 324,
    1 + int(323 * 0.84090) = 272, 1 + int(271 * 0.84090) = 228."""
    assert DAC(ratio=0.5, iterations=2).step_sizes(11) == [8, 5]
    assert DAC(ratio=0.5, iterations=2, schedule="exact_rate").step_sizes(11) == [8, 6]
    assert DAC(ratio=0.5).step_sizes(460) == [386, 324, 272, 228]
    assert DAC(ratio=0.5, schedule="exact_rate").step_sizes(460) == [387, 325, 274, 230]
    assert DAC(ratio=0.5, iterations=1).step_sizes(1313) == [657]  # half-way: 1 + int(656)
    assert DAC(ratio=0.5).steps(99) == 1 and DAC(ratio=0.5).steps(5000) == 15


def authors_loop(model, ids: list[int], rate: float, steps: int, alpha: float) -> list[list[int]]:
    """The authors' dynamic loop, restated: the positions (into ids) kept after each step."""
    position = torch.arange(len(ids))
    tokens = torch.tensor([ids])
    per_step = 1 - (1 - rate) ** (1.0 / steps)
    kept_after = []
    for _ in range(steps):
        with torch.no_grad():
            out = model(input_ids=tokens, output_attentions=True)
        losses = torch.nn.functional.cross_entropy(
            out.logits[0, :-1], tokens[0, 1:], reduction="none"
        )
        maps = torch.cat([a[0] for a in out.attentions])  # (layers * heads, q, k)
        received = maps.sum(dim=0).sum(dim=0)[1:] / (maps.shape[0] - 1)

        def norm(x):
            return (x - x.min()) / (x.max() - x.min()) if x.max() - x.min() > 1e-8 else x * 0

        score = alpha * norm(received) + (1 - alpha) * norm(losses)
        k = max(1, int(score.numel() * (1 - per_step)))
        chosen = torch.sort(torch.topk(score, k=k).indices)[0] + 1
        chosen = torch.cat([torch.zeros(1, dtype=torch.long), chosen])
        tokens, position = tokens[:, chosen], position[chosen]
        kept_after.append(position.tolist())
    return kept_after


@pytest.mark.parametrize("arch", ["llama", "gemma"])
@pytest.mark.parametrize("alpha", [0.8, 0.0])
def test_dynamic_selections_match_the_authors_loop_step_for_step(models, arch, alpha):
    """Our optimised pass (sdpa + recomputed column sums, chunked LM head) on the same weights
    as the plain eager reference: the same positions kept at every step, on a prompt ~30
    times the Gemma model's sliding window."""
    method = DAC(ratio=0.5, alpha=alpha)
    method.prepare(*models[arch, "sdpa"])
    method.scorer.head_chunk = 100  # several head chunks
    ids = method.scorer.encode(TEXT)
    steps = list(method.iterate(ids))
    assert len(steps) == method.steps(len(ids)) == 4
    assert [len(s) for s in steps] == method.step_sizes(len(ids))
    reference = authors_loop(models[arch, "eager"][0], ids, 0.5, 4, alpha)
    assert steps == reference
    assert method.select(ids) == reference[-1]


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_optimised_scores_equal_eager_attention_and_logits(models, arch):
    model, tokenizer = models[arch, "sdpa"]
    eager = models[arch, "eager"][0]
    ids = tokenizer(TEXT[:300], add_special_tokens=False)["input_ids"]
    scorer = Compressor(model, tokenizer, attention=True, query_chunk=37, head_chunk=64)
    scores = scorer.token_scores(ids, attention=True)
    with torch.no_grad():
        out = eager(torch.tensor([ids]), output_attentions=True)
    expected = sum(a[0].sum(dim=(0, 1)) for a in out.attentions)
    torch.testing.assert_close(scores.attention, expected, rtol=1e-4, atol=1e-4)
    logp = out.logits[0, :-1].log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    torch.testing.assert_close(scores.self_info[1:], -logp, rtol=1e-4, atol=1e-4)
    if arch == "gemma":
        assert out.logits.abs().max() <= 0.1  # capped: the self-information above used the cap


@pytest.mark.parametrize("name", ["dac", "selfinfo", "llmlingua"])
def test_prompt_methods_run_on_a_sliding_window_model(models, name):
    """A prompt ~30 times the window: every method completes at the requested rate."""
    method = build(name, ratio=0.5, **({"iterative_size": 100} if name == "llmlingua" else {}))
    method.prepare(*models["gemma", "sdpa"])
    out = method.shorten_text(PromptParts(TEXT, QUESTION))
    stats = method.last_stats()
    assert out.endswith(QUESTION) and stats["compressor_tokens"] > 20 * WINDOW
    assert abs(stats["achieved_rate"] - 0.5) <= 0.02 and stats["compressor_chunks"] == 1


def test_llmlingua_prefix_cache_keeps_every_token_on_a_sliding_window_model(models):
    """The KV-cached segment loop (several segments, each past the window) equals a plain
    re-computation of each segment after the kept prefix."""
    method = LLMLingua(ratio=0.4, iterative_size=70, context_budget=None)
    method.prepare(*models["gemma", "sdpa"])
    ids = method.scorer.encode(TEXT)
    target = method.kept_count(len(ids))
    kept, tau = [0], target / len(ids)
    for begin in range(1, len(ids), 70):
        segment = list(range(begin, min(begin + 70, len(ids))))
        info = method.scorer.token_scores([ids[i] for i in kept + segment], False).self_info
        quota = max(0, min(round(tau * (segment[-1] + 1)) - len(kept), len(segment)))
        kept += [segment[j] for j in info[len(kept) :].topk(quota).indices.sort().values]
    assert method.iterative_compress(ids, target) == kept and len(kept) == target


def test_no_chunking_while_the_input_fits_and_chunks_at_line_ends_when_not(models):
    whole = DAC(ratio=0.5, iterations=1)
    whole.prepare(*models["llama", "sdpa"])
    whole.shorten_text(PromptParts(TEXT, QUESTION))
    stats = whole.last_stats()
    assert stats["compressor_chunks"] == 1 and stats["compressor_window"] == 8192
    assert stats["compressor_tokens"] > 400  # the old default would have cut at 1024 anyway
    text = "".join(SHOT.format(i=i, j=i) for i in range(6))  # ~900 tokens
    chunked = DAC(ratio=0.5, iterations=1, chunk_size=300)
    chunked.prepare(*models["llama", "sdpa"])
    chunked.shorten_text(PromptParts(text, QUESTION))
    assert chunked.last_stats()["compressor_chunks"] == 4
    assert chunked.last_stats()["compressor_window"] == 300
    ids, kept = chunked.select_text(text)
    spans = chunk_spans(chunked.scorer.boundaries(ids), 300)
    assert len(spans) == 4 and spans[-1][1] == len(ids)
    assert all(chunked.scorer.decode([ids[end - 1]]) in ("\n", ".") for _, end in spans[:-1])
    assert kept == [b + i for b, e in spans for i in chunked.select(ids[b:e])]
