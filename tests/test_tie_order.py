"""Which tokens an eviction keeps must not depend on the device: equal scores at the budget's
cut go to the lower index (``methods.cache.scorer.top_indices``).

On a GPU, fp32 SnapKV and PyramidKV kept the same number of bytes as on the CPU but their
logits differed (243 of 260, by up to 0.031 and 0.079), while KeyNorm and H2O matched: SnapKV's
max-pooling copies each local maximum onto its neighbours, so runs of exactly equal scores
straddle the cut, and ``topk`` left their order to the kernel, which differs between the CPU
and CUDA. On the CPU, the other tie order alone reproduces that difference (below)."""

from __future__ import annotations

import pytest
import torch

import methods.cache.scorer as scorer
from harness.api import build
from harness.session import open_session
from tests.conftest import model_spec

FIELDS = {"ratio": 0.25, "window": 8}  # tests/test_cuda.py's settings and prompt
TOP_INDICES = scorer.top_indices


def prompt_ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_equal_scores_at_the_cut_go_to_the_lower_index():
    scores = torch.tensor([[[0.1, 0.5, 0.5, 0.5, 0.2, 0.9, 0.5, 0.0]]])
    assert scorer.top_indices(scores, 3, 0, 0).tolist() == [[[1, 2, 5]]]
    assert scorer.top_indices(scores, 4, 0, 1).tolist() == [[[1, 2, 5, 7]]]
    # the same whatever the memory layout (a strided view, as a kernel may see it)
    strided = scores.expand(2, 1, 8).transpose(0, 1)
    assert scorer.top_indices(strided, 3, 0, 0).tolist() == [[[1, 2, 5], [1, 2, 5]]]


def other_tie_order(scores, n_kept, sinks, recent):
    """``top_indices`` with equal scores going to the higher index (another kernel's choice)."""
    flipped = TOP_INDICES(scores.flip(-1), n_kept, recent, sinks)
    return (scores.shape[-1] - 1 - flipped).flip(-1)


def last_logits(name: str, model, tokenizer) -> tuple[torch.Tensor, int]:
    with open_session(build("method", name, **FIELDS), model, tokenizer) as session:
        gen = session.generate(prompt_ids(160, seed=1), max_new_tokens=3).generation
    return gen.last_logits, gen.kv_bytes_prefill


@pytest.mark.parametrize("name", ["snapkv", "pyramidkv"])
def test_snapkv_pooling_ties_at_the_cut_and_their_order_moves_the_logits(name, monkeypatch):
    model, tokenizer = model_spec("tiny_llama_gqa", dtype="float32").load()
    cut_ties = []

    def spy(scores, n_kept, sinks, recent):
        ranked = scores.float().clone()
        ranked[..., :sinks] = ranked[..., scores.shape[-1] - recent :] = torch.inf  # always kept
        ranked = ranked.sort(dim=-1, descending=True).values
        cut_ties.append(bool((ranked[..., n_kept - 1] == ranked[..., n_kept]).any()))
        return TOP_INDICES(scores, n_kept, sinks, recent)

    monkeypatch.setattr(scorer, "top_indices", spy)
    logits, kv_bytes = last_logits(name, model, tokenizer)
    assert sum(cut_ties) >= 2, cut_ties  # most layers have a run of equal scores at the cut
    monkeypatch.setattr(scorer, "top_indices", other_tie_order)
    other, other_bytes = last_logits(name, model, tokenizer)
    assert other_bytes == kv_bytes  # the same number of tokens, other tokens
    difference = (other - logits).abs()
    assert difference.max() > 1e-2 and (difference > 1e-3).sum() > 100  # the GPU's symptom
