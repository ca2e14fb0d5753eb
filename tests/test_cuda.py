"""kvbench on a CUDA GPU: every method's tensors on the GPU, fp32 on the GPU computing what the
CPU computes, bfloat16 by default, clocks that wait for the GPU, the allocator's peak reset per
request, and a whole ``kvbench`` run.

Every test here is marked ``cuda`` and skipped where no GPU is visible (tests/conftest.py);
``bench/gpu/run.sh`` runs them on a lent GPU machine. ``KVBENCH_CUDA_TESTS_ON=cpu`` rehearses
the ones that do not measure the CUDA clock or allocator on the CPU (how they were checked on
a machine without a GPU). tests/test_device.py holds the CPU half of the device logic.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from harness import records
from harness.api import build
from harness.generation import greedy_generate
from harness.measure import KVLayout, stored_kv_bytes
from harness.models import ModelSpec, byte_tokenizer
from harness.session import open_session
from methods.base import Compose, PromptParts
from methods.cache.spindlekv.grown import Grown
from tests.conftest import model_spec

DEVICE = os.environ.get("KVBENCH_CUDA_TESTS_ON", "cuda")
pytestmark = pytest.mark.cuda
needs_gpu = pytest.mark.skipif(DEVICE != "cuda", reason="measures the CUDA clock or allocator")
TRAIN = {"stage1_steps": 2, "batch_size": 1, "seq_len": 32, "progress": False}
CACHE_METHODS = {
    "streamingllm": {"ratio": 0.25},
    "h2o": {"ratio": 0.25},
    "snapkv": {"ratio": 0.25, "window": 8},
    "knorm": {"ratio": 0.25, "window": 8},
    "pyramidkv": {"ratio": 0.25, "window": 8},
    "spindlekv": {"ratio": 0.25, "window": 8},
}
OTHER_METHODS = {
    "dac": {"ratio": 0.5, "iterations": 2},
    "selfinfo": {"ratio": 0.5},
    "random_deletion": {"ratio": 0.5},
    "llmlingua": {"ratio": 0.5, "iterative_size": 64},
    "kvlatent_k": {"train": False},
    "kvlatent_kv": {"training": TRAIN},
    "kvheads": {"calibration_tokens": 512, "calibration_seq_len": 128},
}
CONTEXT = "Natalia sold clips to 48 of her friends in April. " * 6
QUESTION = "Question: how many clips did she sell?\nAnswer:"


@pytest.fixture(scope="module")
def gpu_model():
    """The tiny GQA Llama on the device, dtype auto (bfloat16 on CUDA)."""
    return model_spec("tiny_llama_gqa", device=DEVICE).load()


def prompt_ids(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def cache_tensors(cache) -> list[torch.Tensor]:
    """Every tensor the cache holds, codebooks and their in-place buffers included."""
    found: list[torch.Tensor] = []

    def collect(value) -> None:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, Grown):  # SpindleKV's growing tensors
            found.append(value.buffer)
        elif hasattr(value, "entries"):  # SpindleKV's codebooks
            for field in vars(value).values():
                collect(field)

    for layer in cache.layers:
        for value in vars(layer).values():
            collect(value)
    return found


@pytest.fixture
def caches(monkeypatch):
    """The KV caches harness.generation creates, kept for inspection."""
    import harness.generation as generation

    made, real = [], generation.new_cache

    def keep(model, *args, **kwargs):
        made.append(real(model, *args, **kwargs))
        return made[-1]

    monkeypatch.setattr(generation, "new_cache", keep)
    return made


def test_auto_gives_bfloat16_weights_on_the_gpu(gpu_model):
    model, _ = gpu_model
    expected = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {(DEVICE, expected)}


@pytest.mark.parametrize("name", list(CACHE_METHODS))
def test_cache_methods_keep_their_cache_on_the_gpu(gpu_model, caches, name):
    model, tokenizer = gpu_model
    with open_session(build("method", name, **CACHE_METHODS[name]), model, tokenizer) as session:
        out = session.generate(prompt_ids(128), max_new_tokens=6)
    m = out.measurement
    assert m.kv_bytes_prefill < 0.5 * m.kv_full_bytes_prefill
    assert out.generation.decode_steps == 5
    tensors = cache_tensors(caches[-1])
    assert tensors and {t.device.type for t in tensors} == {DEVICE}


@pytest.mark.parametrize("name", list(OTHER_METHODS))
def test_prompt_and_model_methods_run_on_the_gpu(name, tmp_path, monkeypatch, caches):
    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path))
    model, tokenizer = model_spec("tiny_llama_gqa", device=DEVICE).load()  # model methods change it
    method = build("method", name, **OTHER_METHODS[name])
    with open_session(method, model, tokenizer) as session:
        out = session.generate(PromptParts(CONTEXT, QUESTION), max_new_tokens=4)
    m = out.measurement
    if "prompt" in method.kinds():
        assert m.prompt_tokens < m.prompt_tokens_original
        assert m.compressor_passes >= (0 if name == "random_deletion" else 1)
    else:
        assert m.kv_bytes_prefill < m.kv_full_bytes_prefill
    params = {p.device.type for p in session.model.parameters()}
    assert params == {DEVICE}
    assert {t.device.type for t in cache_tensors(caches[-1])} == {DEVICE}


def test_a_named_compressor_loads_on_the_benchmarked_models_device(gpu_model):
    model, tokenizer = gpu_model
    method = build("method", "selfinfo", ratio=0.5, compressor="tiny_llama_mha")
    with open_session(method, model, tokenizer) as session:
        session.generate(PromptParts(CONTEXT, QUESTION), max_new_tokens=2)
    assert method.scorer.device.type == DEVICE


@pytest.mark.parametrize("name", [*CACHE_METHODS, "kvlatent_k", "kvheads"])
def test_float32_on_the_gpu_computes_what_the_cpu_computes(name, tmp_path, monkeypatch, caches):
    """Same weights, same prompt, fp32 on both: the same tokens kept (the cached keys equal,
    slot for slot, within float rounding; SnapKV's pooled scores tie at the budget's cut, and
    ties go to the lower index on every device: scorer.top_indices) and next-token logits
    within float rounding (fp32 matmuls: torch leaves TF32 off by default)."""
    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path))
    fields = {**CACHE_METHODS, **OTHER_METHODS}[name]
    cpu_model, tokenizer = model_spec("tiny_llama_gqa", dtype="float32").load()
    gpu_model = copy.deepcopy(cpu_model).to(DEVICE)
    results, held = [], []
    for model in (cpu_model, gpu_model):
        with open_session(build("method", name, **fields), model, tokenizer) as session:
            out = session.generate(prompt_ids(160, seed=1), max_new_tokens=3)
        results.append(out.generation)
        held.append(caches[-1])  # the request's cache
    cpu, gpu = results
    if name == "spindlekv":  # codebook entries may differ where a cosine sits at the threshold
        assert gpu.kv_bytes_prefill == pytest.approx(cpu.kv_bytes_prefill, rel=0.02)
    else:
        assert gpu.kv_bytes_prefill == cpu.kv_bytes_prefill
        for cpu_layer, gpu_layer in zip(held[0].layers, held[1].layers, strict=True):
            torch.testing.assert_close(gpu_layer.keys.cpu(), cpu_layer.keys, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gpu.last_logits.cpu(), cpu.last_logits, rtol=1e-3, atol=1e-3)


def test_full_cache_bytes_follow_the_dtype(gpu_model):
    model, tokenizer = gpu_model
    with open_session(build("method", "full"), model, tokenizer) as session:
        out = session.generate(prompt_ids(100), max_new_tokens=2)
    layout = KVLayout.from_config(model.config, next(model.parameters()).dtype)
    assert layout.dtype_bytes == (2 if DEVICE == "cuda" else 4)
    assert out.measurement.kv_bytes_prefill == layout.full_bytes(100)


@needs_gpu
def test_prefill_and_decode_clocks_wait_for_the_gpu(gpu_model):
    """A GPU-side spin queued in every forward pass must show in the measured times: a clock
    read without synchronising would return while the spin still runs. (A lower bound, not a
    speed check: the spin alone takes that long.)"""
    model, _ = gpu_model
    spin_cycles = 50_000_000
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(spin_cycles)
    end.record()
    torch.cuda.synchronize()
    spin_s = start.elapsed_time(end) / 1000
    handle = model.model.layers[0].register_forward_hook(
        lambda *args: torch.cuda._sleep(spin_cycles)
    )
    try:
        ids = torch.tensor([prompt_ids(64)], device=DEVICE)
        gen = greedy_generate(model, ids, max_new_tokens=4)
    finally:
        handle.remove()
    assert gen.decode_steps == 3
    assert gen.prefill_s >= 0.9 * spin_s
    assert gen.decode_s >= 0.9 * 3 * spin_s


@needs_gpu
def test_peak_memory_is_the_allocators_and_resets_per_request(gpu_model):
    model, tokenizer = gpu_model
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    with open_session(build("method", "full"), model, tokenizer) as session:
        long = session.generate(prompt_ids(6000), max_new_tokens=2).measurement
        short = session.generate(prompt_ids(16), max_new_tokens=2).measurement
    assert long.peak_memory_bytes >= weights + long.kv_bytes_prefill
    assert short.memory_before_bytes >= weights
    # reset per request: the short request's peak does not carry the long one's. What was
    # allocated before it counts: the weights, and the cuBLAS / cuBLASLt workspaces torch's
    # allocator keeps once the first matmul made them (tens of MB on a Hopper GPU)
    assert short.peak_memory_bytes < short.memory_before_bytes + long.kv_bytes_prefill
    assert short.peak_memory_bytes < long.peak_memory_bytes


def test_pretrained_weights_load_onto_the_gpu(tmp_path):
    source, _ = model_spec("tiny_llama_gqa").load()
    source.save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    spec = ModelSpec(name="local", source="local", path=str(tmp_path), device=DEVICE)
    model, _ = spec.load()
    assert {p.device.type for p in model.parameters()} == {DEVICE}
    assert next(model.parameters()).dtype == spec.torch_dtype
    ids = torch.tensor([prompt_ids(32)], device=DEVICE)
    assert greedy_generate(model, ids, max_new_tokens=3).decode_steps == 2


def test_kvbench_run_on_the_gpu_records_dtype_device_and_memory(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    from hydra import compose, initialize_config_dir

    from harness.run import CONF_DIR, execute

    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path / "cache"))
    overrides = [
        f"run.results_dir={tmp_path}",
        "run.report=false",
        "model=tiny_llama_gqa",
        f"model.device={DEVICE}",
        "method=streamingllm",
        "method.ratio=0.25",
        "task=gsm8k",
        "task.limit=1",
        "run.max_gen_toks=8",
        "run.bootstrap_iters=0",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    record = records.read_record(execute(cfg))
    expected = "bfloat16" if DEVICE == "cuda" else "float32"
    assert record["model"]["dtype"] == expected and record["model"]["dtype_requested"] == "auto"
    assert record["model"]["device"].startswith(DEVICE)
    assert record["model"]["sdpa_backend"] == ("flash" if DEVICE == "cuda" else "default")
    captured = "graph" if DEVICE == "cuda" else "eager: CUDA graphs need CUDA (model.device=cpu)"
    assert record["model"]["decode_capture"] == captured  # model.decode_capture=auto
    assert record["config"]["model"]["dtype"] == expected
    m = record["measurements"]
    assert m["kv_ratio"] == pytest.approx(0.25, abs=0.01)
    assert m["peak_memory_bytes"]["min"] > 0 and m["prefill_s"]["min"] > 0
    if DEVICE == "cuda":
        assert record["provenance"]["device"] == torch.cuda.get_device_name(0)


def test_compose_of_prompt_and_cache_methods_on_the_gpu(gpu_model, caches):
    model, tokenizer = gpu_model
    method = Compose(
        methods=[
            build("method", "random_deletion", ratio=0.7),
            build("method", "snapkv", ratio=0.5),
        ]
    )
    with open_session(method, model, tokenizer) as session:
        out = session.generate(PromptParts(CONTEXT, QUESTION), max_new_tokens=3)
    m = out.measurement
    assert m.prompt_tokens < m.prompt_tokens_original
    assert stored_kv_bytes(caches[-1]) < 0.5 * m.kv_full_bytes_final
    assert {t.device.type for t in cache_tensors(caches[-1])} == {DEVICE}


@pytest.mark.parametrize("name", ["full", "snapkv", "pyramidkv", "streamingllm", "kvlatent_k"])
def test_decoding_in_a_cuda_graph_generates_what_eager_decoding_does(name, tmp_path, monkeypatch):
    """float32 (the same kernels either way): the tokens, bytes and last logits of eager
    decoding, requests of two lengths sharing one captured step; bfloat16 (auto) runs too.
    Rehearsed on the CPU with ``replay``, the graph's stand-in."""
    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path))
    mode = "graph" if DEVICE == "cuda" else "replay"
    fields = {"full": {}, **CACHE_METHODS, **OTHER_METHODS}[name]
    for dtype in ("float32", "auto"):
        runs = []
        for capture in (None, mode):
            model, tokenizer = model_spec("tiny_llama_gqa", device=DEVICE, dtype=dtype).load()
            model.generation_config.eos_token_id = []
            method = build("method", name, **fields)
            with open_session(method, model, tokenizer, decode_capture=capture) as session:
                session.eos_token_ids = []
                runs.append(
                    [
                        session.generate(prompt_ids(n, seed=n), max_new_tokens=20).generation
                        for n in (300, 310)
                    ]
                )
                if capture is not None:
                    assert session.graphs.captures == 1
        if dtype != "float32":
            continue
        for eager, captured in zip(*runs, strict=True):
            assert captured.tokens == eager.tokens
            assert captured.kv_bytes_final == eager.kv_bytes_final
            torch.testing.assert_close(
                captured.last_logits, eager.last_logits, rtol=1e-3, atol=1e-3
            )
