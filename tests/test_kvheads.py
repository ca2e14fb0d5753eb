"""kvheads: exact without merging, fewer KV heads and bytes when merging, lossless on
exactly low-rank groups (RoPE-compatible key PCA), errors before loading, fine-tune cache."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from harness.generation import greedy_generate
from methods.base import MethodConfigError
from methods.model.headmerge import Groups
from methods.model.kvheads import KVHeads
from methods.model.layers import HeadShape

CALIB = {"calibration_tokens": 1024, "calibration_seq_len": 128}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ids_for(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def merged(model, tokenizer, **fields):
    return KVHeads(**{**CALIB, **fields}).transform(copy.deepcopy(model), tokenizer)


@pytest.mark.parametrize(("fixture", "heads"), [("tiny_mha", 4), ("tiny_gqa", 2)])
@pytest.mark.parametrize("key_merge", ["rope_pca", "mean"])
def test_no_merge_equals_the_original(request, fixture, heads, key_merge):
    model, tokenizer = request.getfixturevalue(fixture)
    same = merged(model, tokenizer, num_kv_heads=heads, key_merge=key_merge)
    ids = ids_for(40)
    torch.testing.assert_close(same(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("target", [2, 1])
def test_merging_reduces_kv_heads_and_bytes(tiny_mha, target):
    model, tokenizer = tiny_mha
    small = merged(model, tokenizer, num_kv_heads=target)
    attn = small.model.layers[0].self_attn
    assert attn.k_proj.out_features == attn.v_proj.out_features == target * 16
    assert attn.num_key_value_groups == 4 // target
    ids = ids_for(30)
    full = greedy_generate(model, ids, max_new_tokens=3)
    out = greedy_generate(small, ids, max_new_tokens=3)
    assert out.kv_bytes_prefill == 4 * target * (16 + 16) * 30 * 4
    assert out.kv_bytes_prefill * 4 == full.kv_bytes_prefill * target


def _make_groups_low_rank(model) -> None:
    """Make KV heads 1 and 3 exact RoPE-compatible transforms of heads 0 and 2: keys by a
    complex scale per frequency (a rotation and stretch of each channel pair), values by an
    orthogonal matrix. A group {0, 1} or {2, 3} is then exactly rank D."""
    torch.manual_seed(3)
    d = 16
    for layer in model.model.layers:
        attn = layer.self_attn
        wk, wv = attn.k_proj.weight.data, attn.v_proj.weight.data
        for src, dst in ((0, 1), (2, 3)):
            x, y = wk[src * d : src * d + d // 2], wk[src * d + d // 2 : (src + 1) * d]
            angle = torch.rand(d // 2, 1) * 2 * math.pi
            scale = 0.5 + torch.rand(d // 2, 1)
            a, b = scale * torch.cos(angle), scale * torch.sin(angle)
            wk[dst * d : (dst + 1) * d] = torch.cat([a * x - b * y, a * y + b * x])
            rotation, _ = torch.linalg.qr(torch.randn(d, d))
            wv[dst * d : (dst + 1) * d] = rotation @ wv[src * d : (src + 1) * d]


def test_pca_merge_is_lossless_on_exactly_low_rank_groups(tiny_mha):
    model, tokenizer = tiny_mha
    model = copy.deepcopy(model)
    _make_groups_low_rank(model)
    ids = ids_for(40, seed=5)
    reference = model(ids).logits
    pca = merged(model, tokenizer, num_kv_heads=2)(ids).logits
    torch.testing.assert_close(pca, reference, rtol=1e-3, atol=1e-3)
    mean = merged(model, tokenizer, num_kv_heads=2, key_merge="mean", value_merge="mean")
    assert (mean(ids).logits - reference).abs().max() > 100 * (pca - reference).abs().max()


def test_groups_follow_the_query_heads():
    groups = Groups.of(HeadShape(num_heads=9, num_kv_heads=3, head_dim=64), 1)
    assert groups.members == ((0, 1, 2),)
    assert groups.of_query == tuple((0, h // 3) for h in range(9))
    overlap = Groups.of(HeadShape(num_heads=12, num_kv_heads=4, head_dim=8), 3)
    assert overlap.members == ((0, 1), (1, 2), (2, 3))


@pytest.mark.parametrize(("fields", "message"), [
    ({"num_kv_heads": 3}, "method.num_kv_heads=3 does not divide the model's 4 query heads"),
    ({"num_kv_heads": 4}, "method.num_kv_heads=4 exceeds the model's 2 KV heads"),
])  # fmt: skip
def test_bad_head_counts_fail_before_loading(fields, message):
    from tests.conftest import model_spec

    config = model_spec("tiny_llama_gqa").load_config()
    with pytest.raises(MethodConfigError, match=message):
        KVHeads(**fields).validate_for(config)


@pytest.mark.parametrize(("fields", "message"), [
    ({"num_kv_heads": 0}, "method.num_kv_heads=0"),
    ({"key_merge": "svd"}, "method.key_merge"),
    ({"train": True, "training": {"stage1_steps": 0}}, "training budget is zero"),
    ({"calibration_tokens": 10}, "method.calibration_tokens=10"),
])  # fmt: skip
def test_bad_fields_fail_naming_the_field(fields, message):
    with pytest.raises(MethodConfigError, match=message):
        KVHeads(**fields)


def test_fine_tune_runs_and_is_cached(tiny_mha, tmp_path, monkeypatch):
    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path))
    model, tokenizer = tiny_mha
    training = {"stage1_steps": 3, "seq_len": 32, "progress": False}
    tuned = merged(model, tokenizer, num_kv_heads=1, train=True, training=training)
    ids = ids_for(20)
    again = merged(model, tokenizer, num_kv_heads=1, train=True, training=training)
    torch.testing.assert_close(again(ids).logits, tuned(ids).logits)
    assert len(list((tmp_path / "kvheads").iterdir())) == 1


def test_a_merged_model_merges_again_from_the_heads_its_layers_hold(tiny_gqa):
    """A second transform of the same model (a benchmark's warm-up, then its measured run)
    read the config's stale count (2 KV heads) in the calibration and raised IndexError; it
    now merges the one head each layer holds (an exact change of basis), and a count above
    it is refused by name."""
    model, tokenizer = tiny_gqa
    once = merged(model, tokenizer, num_kv_heads=1)
    ids = ids_for(30)
    expected = once(ids).logits
    twice = KVHeads(**CALIB, num_kv_heads=1)
    twice.transform(once, tokenizer)
    assert once.model.layers[0].self_attn.k_proj.out_features == 16
    assert twice.describe()["num_kv_heads_before"] == 1
    torch.testing.assert_close(once(ids).logits, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(MethodConfigError, match="exceeds the 1 KV heads the model's layers hold"):
        KVHeads(**CALIB, num_kv_heads=2).transform(once, tokenizer)


@pytest.mark.integration
def test_smollm2_three_kv_heads_become_one(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer("Weng earns $12 an hour for babysitting. Yesterday", return_tensors="pt")
    ids = ids.input_ids
    one = merged(model, tokenizer, num_kv_heads=1, calibration_tokens=1024, calibration_seq_len=256)
    full = greedy_generate(model, ids, max_new_tokens=2)
    out = greedy_generate(one, ids, max_new_tokens=2)
    assert out.kv_bytes_prefill * 3 == full.kv_bytes_prefill
    assert out.kv_bytes_prefill == 30 * 1 * (64 + 64) * ids.shape[1] * 4
    assert torch.isfinite(one(ids).logits).all()
