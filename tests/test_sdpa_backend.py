"""``model.sdpa_backend``: which kernel sdpa attention runs, chosen by device, dtype and head
dim (``auto``), refused before the weights load when it cannot run the model, entered around
every forward pass, and recorded. A fake CUDA device (``torch.cuda``'s queries patched)
stands in for a GPU where the choice depends on one."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

import harness.models
from harness import sdpa
from harness.generation import greedy_generate
from harness.models import ModelConfigError, ModelSpec
from tests.conftest import REPO

FLAGS = {
    "flash": torch.backends.cuda.flash_sdp_enabled,
    "efficient": torch.backends.cuda.mem_efficient_sdp_enabled,
    "cudnn": torch.backends.cuda.cudnn_sdp_enabled,
    "math": torch.backends.cuda.math_sdp_enabled,
}


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda answering as one GPU would; ``state["capability"]`` is its compute capability."""
    state = {"capability": (9, 0)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: state["capability"])
    return state


def spec(**fields) -> ModelSpec:
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / "tiny_llama_gqa.yaml"))
    cfg.pop("_target_")
    return ModelSpec(**{**cfg, **fields})


def with_head_dim(dim: int) -> dict:
    base = spec().architecture
    return {"architecture": {**base, "head_dim": dim}}


def gemma3() -> dict:
    return {
        "architecture": {
            "model_type": "gemma3_text", "vocab_size": 128, "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 1, "head_dim": 16, "sliding_window": 9,
            "layer_types": ["sliding_attention", "full_attention"],
        }
    }  # fmt: skip


@pytest.mark.parametrize(
    ("fields", "capability", "resolved"),
    [
        ({}, (9, 0), "flash"),  # bfloat16 (auto on CUDA), head_dim 16
        ({"dtype": "float16"}, (8, 0), "flash"),
        ({"dtype": "float32"}, (9, 0), "efficient"),  # flash has no fp32 kernel
        (with_head_dim(512), (9, 0), "efficient"),
        ({}, (7, 5), "efficient"),  # flash needs compute capability 8.0
        (gemma3(), (9, 0), "efficient"),  # sliding-window layers: masked calls
    ],
)
def test_auto_is_flash_where_it_runs_else_memory_efficient(fake_cuda, fields, capability, resolved):
    fake_cuda["capability"] = capability
    model = spec(device="cuda", **fields)
    assert model.resolved_sdpa_backend(model.load_config()) == resolved


def test_auto_on_the_cpu_is_torchs_own_choice():
    model = spec()
    assert model.resolved_sdpa_backend(model.load_config()) == sdpa.DEFAULT
    assert sdpa.kernels("auto", sdpa.DEFAULT) is None
    assert sdpa.kernels("auto", "efficient") == [
        torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION,
        torch.nn.attention.SDPBackend.MATH,
    ]  # never cuDNN, which plans per shape, unless named


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"device": "cuda", "dtype": "float32", "sdpa_backend": "flash"},
            r"^model.sdpa_backend=flash needs 16-bit weights, got model.dtype=float32: use "
            r"model.sdpa_backend=auto \(runs efficient here\)",
        ),
        (
            {"device": "cuda", "sdpa_backend": "flash", **with_head_dim(512)},
            r"flash takes head_dim <= 256, the model's is 512: .*runs efficient here",
        ),
        (
            {"device": "cuda", "sdpa_backend": "flash", **gemma3()},
            r"flash takes no attention mask.*sliding-window",
        ),
        ({"device": "cuda", "dtype": "float32", "sdpa_backend": "cudnn"}, "needs 16-bit"),
        ({"sdpa_backend": "efficient"}, r"runs on CUDA only.*auto \(runs default here\)"),
        ({"sdpa_backend": "cudnn"}, "runs on CUDA only"),
    ],
)
def test_a_backend_that_cannot_run_is_refused_before_the_weights_load(
    fake_cuda, monkeypatch, fields, message
):
    def refuse(*args, **kwargs):
        raise AssertionError("the weights loaded before the check")

    monkeypatch.setattr(harness.models.AutoModelForCausalLM, "from_config", refuse)
    with pytest.raises(ModelConfigError, match=message):
        spec(**fields).load()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"sdpa_backend": "xformers"}, "model.sdpa_backend='xformers' is unknown: use one of"),
        ({"sdpa_backend": "flash", "attn_implementation": "eager"}, "set one of the two only"),
    ],
)
def test_unknown_or_conflicting_backends_are_refused(fields, message):
    with pytest.raises(ModelConfigError, match=message):
        spec(**fields)


def flags_during_forward(model) -> list[dict[str, bool]]:
    """The sdpa kernel flags torch had while each attention layer ran."""
    seen: list[dict[str, bool]] = []
    layer = model.model.layers[0].self_attn
    handle = layer.register_forward_hook(
        lambda *args: seen.append({name: flag() for name, flag in FLAGS.items()})
    )
    try:
        ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
        greedy_generate(model, ids, max_new_tokens=3)
        model.generate(ids, max_new_tokens=2, do_sample=False)
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("backend", ["math", "flash"])  # the two sdpa kernels a CPU has
def test_a_named_backend_runs_every_forward_pass_and_only_those(backend):
    before = {name: flag() for name, flag in FLAGS.items()}
    model, _ = spec(sdpa_backend=backend).load()
    only = {name: name == backend for name in FLAGS}
    seen = flags_during_forward(model)
    assert len(seen) == 3 + 2 and all(s == only for s in seen)  # greedy + model.generate
    assert flags_during_forward(copy.deepcopy(model)) == seen  # a copy keeps the choice
    assert {name: flag() for name, flag in FLAGS.items()} == before  # restored after each


def test_the_backends_compute_the_same_attention():
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    logits = {}
    for backend in ("auto", "math", "flash"):
        model, _ = spec(sdpa_backend=backend).load()
        with torch.inference_mode():
            logits[backend] = model(input_ids=ids).logits
    torch.testing.assert_close(logits["math"], logits["auto"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits["flash"], logits["auto"], rtol=1e-4, atol=1e-4)
