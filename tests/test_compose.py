"""Methods compose: a model method (smaller heads) under a cache method (eviction)."""

from __future__ import annotations

import pytest
import torch

from harness.generation import greedy_generate
from methods.base import Compose
from methods.cache.snapkv import SnapKV
from methods.cache.spindlekv import SpindleKV
from methods.model.kvlatent import KVLatent
from tests.conftest import model_spec


@pytest.mark.parametrize(
    "cache_method", [SnapKV(ratio=0.25, window=4), SpindleKV(ratio=0.5, window=4)]
)
def test_kvlatent_keys_under_an_attention_scoring_cache_method(cache_method):
    torch.set_num_threads(1)
    model, tokenizer = model_spec("tiny_llama_gqa").load()
    method = Compose(
        methods=[KVLatent(variant="kv", dim=8, rope="frequency_aware", train=False), cache_method]
    )
    ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(0))
    with method.applied(model, tokenizer) as reduced:  # KV-Latent's heads, then the hooks
        gen = greedy_generate(reduced, ids, max_new_tokens=4)
    full = greedy_generate(reduced, ids, max_new_tokens=4)  # hooks removed, the heads stay
    # 4 layers x 2 KV heads x (8 + 8) dims x 4 bytes per token
    assert full.kv_bytes_prefill == 4 * 2 * 16 * 4 * 64
    assert 0 < gen.kv_bytes_prefill < full.kv_bytes_prefill
    assert len(gen.tokens) == 4
