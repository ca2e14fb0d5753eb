"""H2O's Triton prefill kernels (methods/cache/h2o_kernels.py) against the PyTorch path they
replace, run on the CPU by Triton's interpreter (TRITON_INTERPRET=1, set by the fixture
before the kernels are defined): the same attention output and received attention to
float32 rounding, the same kept positions in a whole H2O run, and a named fallback."""

from __future__ import annotations

import functools
import logging
import os

import pytest
import torch
from test_cache_methods import ARCHS, prompt, run
from transformers import DynamicCache

from harness.models import ModelSpec
from methods.base import MethodConfigError
from methods.cache import h2o_kernels
from methods.cache.attention import attention_and_received
from methods.cache.h2o import H2O

CLOSE = dict(atol=1e-5, rtol=1e-4)  # float32 rounding
# Gemma-2-style soft-capped logits on the tiny Gemma-3 (sliding and full layers)
KINDS = {**ARCHS, "gemma_softcap": dict(ARCHS["gemma"], attn_logit_softcapping=2.0)}


@pytest.fixture(scope="module")
def interpreter():
    """Triton's CPU interpreter for the kernels (skipped where Triton is not importable)."""
    pytest.importorskip("triton", reason="triton is not installed (the test extra has it)")
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    yield
    if saved is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = saved


@functools.cache
def load(kind: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.set_num_threads(1)
    spec = ModelSpec(name=kind, source="random", architecture=KINDS[kind])
    return spec.load()[0].to(dtype)


def tensors(seq_len, q_len, head_dim, groups, dtype, kv_heads=2, seed=0, contiguous=False):
    """query (1, H_q, q, D), key and value (1, H_kv, S, D); unless ``contiguous``, views of
    (1, n, H, D) tensors, as transformers' attention modules pass them."""
    g = torch.Generator().manual_seed(seed)

    def rand(heads, n):
        states = torch.randn(1, n, heads, head_dim, generator=g).to(dtype).transpose(1, 2)
        return states.contiguous() if contiguous else states

    return rand(kv_heads * groups, q_len), rand(kv_heads, seq_len), rand(kv_heads, seq_len)


@pytest.mark.parametrize(
    "seq_len, q_len, head_dim, groups, softcap, contiguous",
    [
        (37, 37, 16, 2, None, True),  # shorter than a block
        (200, 200, 16, 2, None, False),  # not a multiple of the blocks
        (128, 128, 64, 1, None, True),  # MHA, a wider head
        (200, 57, 16, 4, None, False),  # fewer queries than keys: the last 57 of 200
        (130, 130, 32, 2, 2.0, False),  # soft-capped logits
    ],
)
def test_kernels_match_the_pytorch_path(
    interpreter, seq_len, q_len, head_dim, groups, softcap, contiguous
):
    query, key, value = tensors(
        seq_len, q_len, head_dim, groups, torch.float32, contiguous=contiguous
    )
    assert query.is_contiguous() == contiguous
    scaling = head_dim**-0.5 * 3  # sharper than 1/sqrt(d): the probabilities differ more
    assert h2o_kernels.unsupported(query, key, value, None) is None
    output, received = h2o_kernels.attention_and_received(
        query, key, value, scaling=scaling, softcap=softcap
    )
    expected_output, expected_received = attention_and_received(
        query, key, value, scaling=scaling, softcap=softcap
    )
    torch.testing.assert_close(output, expected_output, **CLOSE)
    torch.testing.assert_close(received, expected_received, **CLOSE)
    assert received.sum().item() == pytest.approx(q_len * query.shape[1], rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernels_take_half_precision(interpreter, dtype):
    """Half-precision inputs: the logits and sums are float32 (received to float32
    rounding); the output rounds the probabilities to the input's dtype before PV, as
    flash attention does, so it matches to that dtype's rounding."""
    query, key, value = tensors(100, 100, 16, 2, dtype)
    output, received = h2o_kernels.attention_and_received(query, key, value, scaling=0.5)
    expected_output, expected_received = attention_and_received(query, key, value, scaling=0.5)
    assert output.dtype == dtype and received.dtype == torch.float32
    torch.testing.assert_close(output, expected_output, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(received, expected_received, **CLOSE)


@pytest.mark.parametrize("kind", ["gqa", "mha", "gemma", "gemma_softcap"])
@pytest.mark.parametrize("fields", [dict(ratio=0.3, sinks=2), dict(budget=20, recent_ratio=0.0)])
def test_h2o_keeps_the_same_positions_with_the_kernels(interpreter, kind, fields):
    model, ids = load(kind), prompt()
    eager = H2O(prefill_kernel="torch", **fields)
    expected, _ = run(model, ids, [eager], steps=3)
    method = H2O(prefill_kernel="triton", **fields)
    method.validate_runtime("cpu", torch.float32, "sdpa")
    logits, _ = run(model, ids, [method], steps=3, extra=expected[:-1].argmax(-1))
    assert method.last_stats()["prefill_kernel"] == "triton"
    assert "prefill_fallback" not in method.last_stats()
    torch.testing.assert_close(logits, expected, **CLOSE)
    assert set(method._positions) == set(eager._positions) and method._positions
    for layer, positions in eager._positions.items():
        assert torch.equal(method.positions(layer), positions)


@pytest.mark.parametrize("kind", ["gqa", "gemma_softcap"])
def test_h2o_keeps_the_same_positions_in_bfloat16(interpreter, kind):
    """bfloat16 weights: the kernels round the probabilities to bfloat16 before PV (as
    flash attention does; the PyTorch path multiplies in float32), so the layers' outputs
    differ by bfloat16 rounding; the positions kept are still the same."""
    model, ids = load(kind, torch.bfloat16), prompt(seed=1)
    eager = H2O(ratio=0.3, sinks=2, prefill_kernel="torch")
    expected, _ = run(model, ids, [eager], steps=3)
    method = H2O(ratio=0.3, sinks=2, prefill_kernel="triton")
    logits, _ = run(model, ids, [method], steps=3, extra=expected[:-1].argmax(-1))
    assert method.last_stats()["prefill_kernel"] == "triton"
    torch.testing.assert_close(logits, expected, atol=2e-2, rtol=2e-2)
    for layer, positions in eager._positions.items():
        assert torch.equal(method.positions(layer), positions)


def test_a_kernel_that_cannot_run_falls_back_with_one_warning(interpreter, caplog):
    """float64 weights (a dtype the kernels lack): the PyTorch path, one warning for the
    run's four layers, the reason in the stats, the positions the PyTorch path keeps."""
    model, ids = load("gqa", torch.float64), prompt()
    expected = H2O(ratio=0.3, prefill_kernel="torch")
    run(model, ids, [expected], steps=1)
    method = H2O(ratio=0.3, prefill_kernel="triton")
    with caplog.at_level(logging.WARNING, logger="methods.cache.h2o"):
        run(model, ids, [method], steps=1)
        run(model, ids, [method], steps=1)
    warnings = [r.getMessage() for r in caplog.records if "Triton kernels" in r.getMessage()]
    assert len(warnings) == 1 and "dtype torch.float64" in warnings[0]
    stats = method.last_stats()
    assert stats["prefill_kernel"] == "torch" and "float64" in stats["prefill_fallback"]
    for layer, positions in expected._positions.items():
        assert torch.equal(method.positions(layer), positions)


def test_auto_runs_the_pytorch_path_on_the_cpu_without_a_warning(caplog):
    method = H2O(ratio=0.3)
    with caplog.at_level(logging.WARNING, logger="methods.cache.h2o"):
        run(load("gqa"), prompt(), [method], steps=1)
    assert not caplog.records
    assert method.last_stats()["prefill_kernel"] == "torch"
    assert "prefill_fallback" not in method.last_stats()


def test_unsupported_names_why(interpreter, monkeypatch):
    query, key, value = tensors(40, 40, 16, 2, torch.float32)
    assert h2o_kernels.unsupported(query, key, value, None) is None
    mask = torch.ones(1, 1, 40, 40, dtype=torch.bool).tril()
    assert "attention mask" in h2o_kernels.unsupported(query, key, value, mask)
    odd = tensors(40, 40, 24, 2, torch.float32)
    assert "head_dim 24" in h2o_kernels.unsupported(*odd, None)
    monkeypatch.setattr(h2o_kernels, "triton_missing", lambda: "triton is not importable (x)")
    assert "triton is not importable" in h2o_kernels.unsupported(query, key, value, None)


def test_prefill_kernel_is_checked(monkeypatch):
    with pytest.raises(MethodConfigError, match="method.prefill_kernel='cuda'"):
        H2O(prefill_kernel="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(MethodConfigError, match="method.prefill_kernel=triton cannot run"):
        H2O(prefill_kernel="triton").validate_runtime("cpu", torch.float32, "sdpa")
    H2O(prefill_kernel="auto").validate_runtime("cpu", torch.float32, "sdpa")


# On a GPU (bench/gpu/run.sh runs the tests marked cuda): the compiled kernels, at the
# tile sizes the GPU runs. KVBENCH_CUDA_TESTS_ON=cpu rehearses them in the interpreter.
DEVICE = os.environ.get("KVBENCH_CUDA_TESTS_ON", "cuda")


@pytest.fixture
def device(request, monkeypatch) -> str:
    """The device the cuda tests run on: compiled kernels on CUDA (even after this
    module's interpreted tests), the interpreter in a CPU rehearsal."""
    if DEVICE == "cuda":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        request.getfixturevalue("interpreter")
    return DEVICE


@pytest.mark.cuda
@pytest.mark.parametrize(
    "head_dim, dtype, softcap, q_share",
    [
        (128, torch.bfloat16, None, 1.0),  # Llama-3-8B's heads
        (128, torch.float32, None, 1.0),  # IEEE float32 tiles (not TF32)
        (64, torch.float16, None, 0.3),  # the last 30 % of the keys' queries
        (256, torch.bfloat16, 50.0, 1.0),  # Gemma-2's width and soft cap: the small tiles
    ],
)
def test_compiled_kernels_match_the_pytorch_path(device, head_dim, dtype, softcap, q_share):
    seq_len = 1000 if device == "cuda" else 100
    q_len = round(seq_len * q_share)
    query, key, value = (t.to(device) for t in tensors(seq_len, q_len, head_dim, 4, dtype))
    scaling = head_dim**-0.5
    assert h2o_kernels.unsupported(query, key, value, None) is None
    output, received = h2o_kernels.attention_and_received(
        query, key, value, scaling=scaling, softcap=softcap
    )
    expected_output, expected_received = attention_and_received(
        query, key, value, scaling=scaling, softcap=softcap
    )
    half = dict(atol=2e-2, rtol=2e-2) if dtype != torch.float32 else CLOSE
    torch.testing.assert_close(output, expected_output, **half)
    torch.testing.assert_close(received, expected_received, **CLOSE)


@pytest.mark.cuda
def test_h2o_on_the_gpu_runs_the_kernels_and_keeps_the_same_positions(device):
    """The tiny GQA Llama in bfloat16 on the device: ``auto`` picks the kernels on CUDA
    (no warning, ``prefill_kernel: triton`` in the stats), ``triton`` elsewhere."""
    spec = ModelSpec(name="gqa", source="random", architecture=KINDS["gqa"], device=device)
    model = spec.load()[0].to(torch.bfloat16)
    ids = prompt(200).to(device)
    kept = {}
    for kernel in ("torch", "auto" if device == "cuda" else "triton"):
        method = H2O(ratio=0.3, sinks=2, prefill_kernel=kernel)
        method.validate_runtime(device, torch.bfloat16, "sdpa")
        with torch.inference_mode(), method.applied(model):
            model(input_ids=ids, past_key_values=DynamicCache(config=model.config))
        kept[kernel] = method
    torch_path, kernels = kept.values()
    assert kernels.last_stats()["prefill_kernel"] == "triton"
    assert "prefill_fallback" not in kernels.last_stats()
    assert torch_path.last_stats()["prefill_kernel"] == "torch"  # as asked: no fallback
    assert "prefill_fallback" not in torch_path.last_stats()
    for layer, positions in torch_path._positions.items():
        assert torch.equal(kernels.positions(layer), positions)
