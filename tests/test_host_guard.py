"""No host-only call on a device tensor, found on the CPU: every method's prefill and decode
run on a model whose tensors are :class:`tests.host_guard.OnDevice` (``.numpy()`` refused as
on CUDA, host syncs counted), in bfloat16 as on a GPU (``model.dtype: auto``), so the paths a
GPU takes run (SpindleKV's fused C++ kernels take float32 CPU tensors only)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.api import build
from harness.session import open_session
from methods.base import PromptParts
from tests.conftest import model_spec
from tests.host_guard import OnDevice, count_syncs, guard
from tests.test_cuda import CACHE_METHODS, OTHER_METHODS

TRAIN = {"stage1_steps": 1, "batch_size": 1, "seq_len": 16, "progress": False}
# every method with the GPU tests' settings, the model methods' training and calibration smaller
METHODS = {
    "full": {},
    **CACHE_METHODS,
    **OTHER_METHODS,
    "kvlatent_kv": {"training": TRAIN},
    "kvheads": {"calibration_tokens": 256, "calibration_seq_len": 64},
}
WORDS = "Natalia sold clips to 48 of her friends in April, and then half as many in May. "
QUESTION = "Question: how many clips did she sell?\nAnswer:"


def test_the_guard_refuses_numpy_on_device_tensors_as_cuda_does():
    weight = torch.ones(3).as_subclass(OnDevice)
    derived = (weight * 2).sum(dim=0, keepdim=True)
    assert type(derived) is OnDevice  # spreads to what is computed from it
    for host_only in (derived.numpy, lambda: np.asarray(derived)):
        with pytest.raises(TypeError, match="can't convert cuda:0 device type tensor to numpy"):
            host_only()
    syncs = count_syncs(lambda: (derived.cpu().numpy(), derived.to("cpu"), derived.item()))
    assert syncs == {"cpu": 1, "to(cpu)": 1, "item": 1}
    assert type(derived.cpu()) is torch.Tensor  # the explicit copy is a host tensor


def run_request(name: str, words: int) -> tuple[int, int]:
    """One guarded request (prefill + 4 decoding steps): (prompt tokens, host syncs made)."""
    model, tokenizer = model_spec("tiny_llama_gqa", dtype="bfloat16").load()
    guard(model)
    method = build("method", name, **METHODS[name])
    prompt = PromptParts(WORDS * words, QUESTION)
    done = []

    def request() -> None:
        with open_session(method, model, tokenizer) as session:
            done.append(session.generate(prompt, max_new_tokens=5))

    syncs = count_syncs(request)
    assert done[0].generation.decode_steps == 4
    return done[0].measurement.prompt_tokens_original, sum(syncs.values())


@pytest.mark.parametrize("name", list(METHODS))
def test_methods_make_no_host_only_call_and_no_per_token_sync(name, tmp_path, monkeypatch):
    """A host-only call (``.numpy()`` on a device tensor) fails the request. A host sync per
    prompt token (a Python loop over the cache) shows as at least one more sync per added
    token for a longer prompt; a few more or fewer are a data-dependent search (SpindleKV's
    budget search evaluates a varying number of candidate budgets, a few syncs each)."""
    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path))
    (short_tokens, short), (long_tokens, long) = run_request(name, 1), run_request(name, 5)
    added = long_tokens - short_tokens
    assert added > 250
    assert long - short < added / 4, f"{name}: {short} host syncs -> {long} for {added} tokens"
