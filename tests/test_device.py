"""Where and in what dtype kvbench runs, checked without a GPU (tests/test_cuda.py runs the same
paths on one).

- ``model.dtype: auto`` resolves from the config alone and the run id is taken over the
  resolved dtype;
- a device, dtype or attention implementation that cannot run is refused before the weights
  load, by the model spec and by each method (``validate_runtime``), with a fake CUDA device
  (``torch.cuda``'s queries patched) where the logic needs one;
- every tensor a method makes is made on the device of its inputs: statically (every factory
  call names its device) and by running the methods' tensor code on the ``meta`` device, which
  refuses, as CUDA does, to mix its tensors with CPU ones in element-wise ops and concatenation
  (matrix products it does not check);
- the clock and the peak-memory probe synchronise and reset the CUDA device they are given.
"""

from __future__ import annotations

import ast
import copy

import pytest
import torch
from omegaconf import OmegaConf

from harness import measure, records
from harness.dtypes import resolve_dtype
from harness.models import ModelConfigError, ModelSpec
from harness.session import open_session
from methods.base import Compose, MethodConfigError
from methods.cache.h2o import H2O
from methods.cache.knorm import KeyNorm
from methods.cache.pyramidkv import PyramidKV
from methods.cache.snapkv import SnapKV
from methods.cache.spindlekv import SpindleKV
from methods.cache.streamingllm import StreamingLLM
from methods.model.headmerge import Groups, collect_moments, merged_attention
from methods.model.kvheads import KVHeads
from methods.model.kvlatent import KVLatent
from methods.model.latent import latent_surgery
from methods.model.layers import HeadShape, decoder_layers
from tests.conftest import REPO, model_spec

FACTORIES = {
    "arange", "as_tensor", "empty", "eye", "full", "Generator", "linspace", "logspace", "ones",
    "rand", "randint", "randn", "randperm", "scalar_tensor", "tensor", "zeros",
}  # fmt: skip
SHORT_TRAINING = {"stage1_steps": 1, "batch_size": 1, "seq_len": 16, "progress": False}


# --- model.dtype: auto ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("dtype", "device", "resolved"),
    [
        ("auto", "cpu", "float32"),
        ("auto", "cuda", "bfloat16"),
        ("auto", "cuda:1", "bfloat16"),
        ("float16", "cuda", "float16"),
        ("bfloat16", "cpu", "bfloat16"),
    ],
)
def test_auto_dtype_is_a_function_of_the_device_alone(dtype, device, resolved):
    assert resolve_dtype(dtype, device) == resolved


def test_auto_and_the_dtype_it_stands_for_are_one_run():
    def config(device: str, dtype: str) -> dict:
        return {"model": {"name": "m", "device": device, "dtype": dtype}, "run": {}}

    assert records.config_hash(config("cpu", "auto")) == records.config_hash(
        config("cpu", "float32")
    )
    assert records.config_hash(config("cuda", "auto")) == records.config_hash(
        config("cuda", "bfloat16")
    )
    assert records.config_hash(config("cuda", "auto")) != records.config_hash(config("cpu", "auto"))
    assert records.config_hash(config("cpu", "auto")) != records.config_hash(
        config("cpu", "bfloat16")
    )


def test_auto_loads_float32_weights_on_the_cpu():
    spec = model_spec("tiny_llama_gqa")
    assert spec.dtype == "auto" and spec.resolved_dtype == "float32"
    model, _ = spec.load()
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_the_model_configs_default_to_auto():
    for path in sorted((REPO / "conf" / "model").glob("*.yaml")):
        assert OmegaConf.load(path).dtype == "auto", path.name


# --- a fake CUDA device for the spec's checks ---------------------------------------------------
@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda answering as one GPU would; ``state["bf16"]`` says whether it has bfloat16."""
    state = {"bf16": True}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: state["bf16"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    return state


def spec(**fields) -> ModelSpec:
    """The tiny test model's spec, built directly (Hydra would wrap the error)."""
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / "tiny_llama_gqa.yaml"))
    cfg.pop("_target_")
    return ModelSpec(**{**cfg, **fields})


def gpu_spec(**fields) -> ModelSpec:
    return spec(**{"device": "cuda", **fields})


def test_auto_is_bfloat16_on_a_gpu(fake_cuda):
    assert gpu_spec().torch_dtype == torch.bfloat16
    assert gpu_spec(dtype="float32").torch_dtype == torch.float32


def test_a_gpu_without_bfloat16_is_refused_and_told_what_to_pass(fake_cuda):
    fake_cuda["bf16"] = False
    with pytest.raises(ModelConfigError, match="Fake GPU has no bfloat16.*model.dtype=float16"):
        gpu_spec()
    assert gpu_spec(dtype="float16").torch_dtype == torch.float16


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"device": "mps"}, "model.device='mps' is not supported"),
        ({"device": "cuda:3"}, "only 1 CUDA device"),
        ({"dtype": "float32", "attn_implementation": "flash_attention_2"}, "16-bit weights"),
        ({"attn_implementation": "flash_attention_2"}, "flash-attn package is not installed"),
        ({"attn_implementation": "flash_attention_3"}, "flash-attn-3 package is not installed"),
    ],
)
def test_devices_and_attention_kernels_that_cannot_run_are_refused(
    fake_cuda, monkeypatch, fields, message
):
    import transformers.utils

    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: False)
    monkeypatch.setattr(transformers.utils, "is_flash_attn_3_available", lambda: False)
    with pytest.raises(ModelConfigError, match=message):
        gpu_spec(**fields)


def test_flash_attention_is_refused_on_the_cpu():
    with pytest.raises(ModelConfigError, match="runs on CUDA only"):
        spec(attn_implementation="flash_attention_2")


# --- methods refuse what they cannot run, before the weights load ------------------------------
@pytest.mark.parametrize(
    ("method", "dtype", "attn", "message"),
    [
        (KVLatent(variant="k", train=False), torch.bfloat16, "flash_attention_2", "head dims"),
        (KVLatent(variant="v", train=False), torch.bfloat16, "flash_attention_3", "head dims"),
        (KVLatent(train=True), torch.float16, "sdpa", "cannot train float16"),
        (KVHeads(train=True), torch.float16, "sdpa", "cannot train float16"),
        (PyramidKV(), torch.float32, "eager", "eager attention"),
        (SpindleKV(), torch.bfloat16, "eager", "eager attention"),
        (Compose(methods=[StreamingLLM(), PyramidKV()]), torch.float32, "eager", "eager"),
    ],
)
def test_methods_refuse_a_runtime_they_cannot_run_on(method, dtype, attn, message):
    with pytest.raises(MethodConfigError, match=message):
        method.validate_runtime("cuda", dtype, attn)


@pytest.mark.parametrize(
    ("method", "dtype", "attn"),
    [
        (KVLatent(variant="kv", train=False), torch.bfloat16, "flash_attention_2"),
        (KVLatent(variant="k", train=False), torch.float16, "sdpa"),
        (KVHeads(train=False), torch.float16, "sdpa"),
        (SnapKV(), torch.float32, "eager"),
        (H2O(), torch.float16, "flash_attention_2"),
    ],
)
def test_methods_accept_what_they_can_run_on(method, dtype, attn):
    method.validate_runtime("cuda", dtype, attn)


def test_apply_refuses_a_loaded_model_before_training_it():
    model, tokenizer = model_spec("tiny_llama_gqa", dtype="float16").load()
    method = KVLatent(train=True, training=SHORT_TRAINING)
    with pytest.raises(MethodConfigError, match="cannot train float16"):
        with open_session(method, model, tokenizer):
            pass
    assert all(type(layer.self_attn).__name__ != "LatentAttention" for layer in model.model.layers)


# --- every tensor on the inputs' device ------------------------------------------------------
def test_every_tensor_factory_in_methods_and_harness_names_its_device():
    """``torch.zeros(n)`` lands on the CPU whatever the model's device: kvbench's own code
    always says where (``device=...``, or ``x.new_zeros``/``zeros_like`` from a tensor)."""
    missing = []
    for path in sorted([*(REPO / "methods").rglob("*.py"), *(REPO / "harness").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
                and node.func.attr in FACTORIES
                and not any(k.arg == "device" for k in node.keywords)
            ):
                missing.append(f"{path.relative_to(REPO)}:{node.lineno} {ast.unparse(node)}")
    assert missing == []


def on_meta(module: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(module).to("meta")


def test_kvheads_merge_builds_on_the_weights_device(tiny_mha):
    """The PCA moments live on the CPU; the merged projections must come out on the weights'
    device (they failed on CUDA before: CPU eigenvectors times CUDA weights)."""
    model, tokenizer = tiny_mha
    shape = HeadShape.of(model)
    groups = Groups.of(shape, 2)
    ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(0))
    moments = collect_moments(model, [ids], groups, shape.head_dim)
    for key_merge, value_merge in (("rope_pca", "pca"), ("mean", "mean")):
        merged = merged_attention(
            on_meta(model.model.layers[0].self_attn),
            shape,
            groups,
            moments[0],
            key_merge,
            value_merge,
        )
        assert {p.device.type for p in merged.parameters()} == {"meta"}
        assert merged.k_proj.out_features == 2 * shape.head_dim


def test_kvlatent_surgery_builds_on_the_weights_device(tiny_gqa):
    model = on_meta(tiny_gqa[0])
    latent_surgery(model, 8, 8, "frequency_aware")
    attn = decoder_layers(model)[0].self_attn
    assert type(attn).__name__ == "LatentAttention"
    tensors = [*model.parameters(), *model.buffers()]
    assert {t.device.type for t in tensors} == {"meta"}


@pytest.mark.parametrize(
    "method",
    [StreamingLLM(sinks=2), SnapKV(window=4), KeyNorm(window=4), H2O(chunk_size=8), PyramidKV()],
    ids=lambda m: m.name,
)
def test_eviction_runs_on_the_device_of_its_inputs(tiny_gqa, method):
    """Scores, masks, positions and the kept tensors of an eviction, computed on ``meta``
    inputs: any tensor made on the CPU on the way fails to combine with them."""
    attn = on_meta(tiny_gqa[0].model.layers[1].self_attn)
    seq, shape = 32, HeadShape.of(tiny_gqa[0])
    hidden = torch.empty(1, seq, tiny_gqa[0].config.hidden_size, device="meta")
    keys = torch.empty(1, shape.num_kv_heads, seq, shape.head_dim, device="meta")
    values = torch.empty_like(keys)
    cos = torch.empty(1, seq, shape.head_dim, device="meta")
    kwargs = {
        "position_embeddings": (cos, torch.empty_like(cos)),
        "position_ids": torch.arange(seq, device="meta")[None],
    }
    kept_keys, kept_values = method.reduce_kv(attn, hidden, keys, values, kwargs)
    assert kept_keys.device.type == kept_values.device.type == "meta"
    assert kept_keys.shape[-2] < seq


# --- the clock and the peak-memory probe on a CUDA device ---------------------------------------
def test_cuda_clock_and_peak_memory_synchronise_and_reset_their_device(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: calls.append(("sync", d)))
    monkeypatch.setattr(
        torch.cuda, "reset_peak_memory_stats", lambda d=None: calls.append(("reset", d))
    )
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: 12345)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: 100)
    gpu = torch.device("cuda", 0)

    measure.synchronized_clock(gpu)
    assert calls == [("sync", gpu)]
    calls.clear()
    probe = measure.PeakMemory(gpu)
    probe.reset()
    assert calls[-1] == ("reset", gpu) and ("sync", gpu) in calls
    calls.clear()
    assert probe.peak_bytes() == 12345
    assert calls == [("sync", gpu)]  # the peak is read after the queued work has run


def test_cpu_clock_and_probe_touch_no_cuda(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a CPU measurement called into torch.cuda")

    for name in ("synchronize", "reset_peak_memory_stats", "max_memory_allocated"):
        monkeypatch.setattr(torch.cuda, name, refuse)
    cpu = torch.device("cpu")
    measure.synchronized_clock(cpu)
    probe = measure.PeakMemory(cpu, weights_bytes=1000)
    probe.reset()
    assert probe.read(24)["peak_memory_bytes"] == 1024
