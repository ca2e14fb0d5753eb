"""The peer comparison reads kept positions from what a cache stores (bench/peers/kept.py)."""

from __future__ import annotations

import pytest
import torch

from bench.peers.kept import kept_positions
from harness.generation import new_cache
from methods.cache.knorm import KeyNorm
from methods.cache.scorer import top_indices


def test_kept_positions_recovers_a_gather_exactly():
    full = torch.randn(3, 300, 16) * 4
    chosen = torch.stack([torch.randperm(300)[:60].sort().values for _ in range(3)])
    kept = full.gather(1, chosen.unsqueeze(-1).expand(-1, -1, 16))
    positions, error = kept_positions(full, kept)
    assert torch.equal(positions, chosen) and error == 0.0


def test_kept_positions_reports_a_key_that_is_no_copy():
    # keys ~16 apart, the altered one 1.4 from its original: nearest is still its original
    full = torch.randn(2, 50, 8, generator=torch.Generator().manual_seed(0)) * 4
    kept = full[:, :10].clone()
    kept[1, 3] += 0.5
    _, error = kept_positions(full, kept)
    assert error == pytest.approx(float((0.5 * torch.ones(8)).norm()), rel=0.2)


@torch.inference_mode()
def test_kept_positions_of_a_method_are_its_top_scores(tiny_gqa):
    model, _ = tiny_gqa
    ids = torch.randint(0, 256, (1, 80), generator=torch.Generator().manual_seed(1))
    full, kept = new_cache(model), new_cache(model)
    model(input_ids=ids, past_key_values=full, use_cache=True)
    with KeyNorm(budget=20).applied(model):
        model(input_ids=ids, past_key_values=kept, use_cache=True)
    for full_layer, kept_layer in zip(full.layers, kept.layers, strict=True):
        positions, error = kept_positions(full_layer.keys[0], kept_layer.keys[0])
        scores = -full_layer.keys.norm(dim=-1)
        assert error == 0.0 and torch.equal(positions, top_indices(scores, 20, 0, 0)[0])
