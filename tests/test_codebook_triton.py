"""SpindleKV's Triton kernels (its GPU decoding step: the attention over the codebooks and the
codebook match) against the PyTorch operations and the decoded cache, run on the CPU by
Triton's interpreter (``TRITON_INTERPRET=1``, set by tests/conftest.py where no GPU is
visible), plus their compilation for the H200 and, on a GPU, the compiled kernels."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cache_methods import load, prompt, run
from test_codebook_kernels import codebook_layer, rotate_half_rope
from test_spindlekv import sharp_gqa

from methods.cache.attention import apply_rope
from methods.cache.spindlekv import SpindleKV, codebook_attention, codebook_triton
from methods.cache.spindlekv.codebook import Codebook
from methods.cache.spindlekv.codebook_layer import CodebookLayer, RopeTable

triton = pytest.importorskip("triton", reason="Triton is not installed (the test extra holds it)")
INTERPRETED = (
    type(getattr(triton.language.standard, "zeros", None)).__name__ == "InterpretedFunction"
)
on_cpu = pytest.mark.skipif(
    not INTERPRETED,
    reason="Triton is not under its interpreter (a GPU is visible, or TRITON_INTERPRET was set "
    "after Triton loaded; tests/conftest.py sets it): test_the_kernels_on_the_gpu checks them",
)


@pytest.fixture(autouse=True)
def interpreted(monkeypatch):
    """SpindleKV's kernel choice reads the variable: keep it set (a test may unset it)."""
    if INTERPRETED:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def by_triton(layer: CodebookLayer, query: torch.Tensor, softcap, **options) -> torch.Tensor:
    def kernel(*args):
        return codebook_triton.attend(*args, **options)

    return codebook_attention.attend_fused(layer, query, 0.25, softcap, kernel)


@on_cpu
@pytest.mark.parametrize("heads", [True, False])
@pytest.mark.parametrize("magnitudes", [True, False])
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("splits", [1, 2])
def test_triton_attention_equals_the_pytorch_operations_and_the_decoded_cache(
    heads, magnitudes, softcap, splits
):
    """40 slots in blocks of 16, one program per KV head (three blocks) or two (blocks of 16
    and 4 slots; the partial softmaxes joined), KV head 0's last query head seeing no slot,
    one newest token waiting."""
    layer = codebook_layer(0, heads, magnitudes)
    query = torch.randn(1, 6, 1, 16, generator=torch.Generator().manual_seed(1)) * 3
    out = by_triton(layer, query, softcap, splits=splits, block=16)
    eager = codebook_attention.attend_codebook(layer, query, 0.25, softcap)
    plain = codebook_attention.attend_materialized(layer, query, None, 0.25, softcap)
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out, plain, atol=1e-5, rtol=1e-4)
    if heads:  # the head that sees no slot reads only the newest token's value
        torch.testing.assert_close(out[0, 0, 2], layer.values[0, 0, 0])


@on_cpu
def test_triton_attention_reads_bfloat16_storage_in_float32():
    """Entries, magnitudes, RoPE table and newest tokens stored in bfloat16: the kernel
    computes in float32, so it gives the float32 operations on the same rounded values."""
    layer = codebook_layer(5, heads=True, magnitudes=True)
    table = layer.table.upto(layer.last_position, layer.key_book.entries)
    parts = [layer.key_book.entries, layer.key_book.magnitudes, layer.value_book.entries,
             layer.value_book.magnitudes, table, layer.keys, layer.values]  # fmt: skip
    for part in parts:
        part.copy_(part.bfloat16().float())  # in place: the layer now holds bf16 values
    query = torch.randn(1, 6, 1, 16, generator=torch.Generator().manual_seed(6))
    kb, vb = layer.key_book, layer.value_book
    q = query.view(1, 2, 3, 16) * 0.25
    out = codebook_triton.attend(
        q, kb.entries.bfloat16(), kb.refs, kb.magnitudes.bfloat16(), table.bfloat16(),
        layer.positions, layer.heads, vb.entries.bfloat16(), vb.refs, vb.magnitudes.bfloat16(),
        layer.keys.bfloat16(), layer.values.bfloat16(), None, block=16,
    )  # fmt: skip
    eager = codebook_attention.attend_codebook(layer, query, 0.25, None)
    torch.testing.assert_close(out.view(1, 6, 1, 16).transpose(1, 2), eager, atol=1e-5, rtol=1e-4)


@on_cpu
def test_a_query_head_that_sees_no_token_reads_zero_as_the_cpp_kernel_reports():
    layer = codebook_layer(2, heads=True, magnitudes=True)
    layer.keys, layer.values = layer.keys[..., :0, :], layer.values[..., :0, :]
    query = torch.randn(1, 6, 1, 16, generator=torch.Generator().manual_seed(3))
    out = by_triton(layer, query, None, block=16)
    assert torch.equal(out[0, 0, 2], torch.zeros(16))  # KV head 0's last query head
    seen = [0, 1, 3, 4, 5]
    eager = codebook_attention.attend_codebook(layer, query, 0.25, None)
    torch.testing.assert_close(out[:, :, seen], eager[:, :, seen], atol=1e-5, rtol=1e-4)


@on_cpu
@pytest.mark.parametrize("kind", ["sharp", "sharp_fold3", "gemma", "gemma_sliding"])
def test_spindlekv_decodes_through_triton_as_through_the_pytorch_operations(kind, monkeypatch):
    """Whole decodes on the tiny models (the sharp one: copies keeping different tokens and
    padding slots, and with fold_every 3: up to 3 newest tokens waiting; Gemma-3: sliding
    layers, coded and sliding too with compress_sliding) give the same logits and the same
    codebook refs and positions as ``decode_attention: codebook``; every step's attention and
    codebook match (one token folded at a time) went through the Triton kernels."""
    model = sharp_gqa() if kind.startswith("sharp") else load(kind.split("_")[0])
    ids = prompt(40 if kind == "gemma_sliding" else 96)
    calls = {"attend": 0, "append": 0}
    for name in calls:
        real = getattr(codebook_triton, name)

        def spy(*args, _real=real, _name=name):
            calls[_name] += 1
            return _real(*args)

        monkeypatch.setattr(codebook_triton, name, spy)
    fields = dict(window=8, ratio=0.3, key_threshold=0.9, value_threshold=0.8)
    if kind == "gemma_sliding":
        fields["compress_sliding"] = True
    if kind == "sharp_fold3":  # three tokens join the codebooks together (the PyTorch match)
        fields["fold_every"] = 3
    method = SpindleKV(decode_attention="triton", **fields)
    triton_logits, triton_cache = run(model, ids, [method], steps=4)
    assert calls["attend"] and (calls["append"] or kind == "sharp_fold3")
    assert method.last_stats()["decode_kernel"] == "triton"
    eager = SpindleKV(decode_attention="codebook", **fields)
    eager_logits, eager_cache = run(model, ids, [eager], steps=4)
    torch.testing.assert_close(triton_logits, eager_logits, atol=1e-5, rtol=1e-4)
    assert triton_logits.argmax(-1).tolist() == eager_logits.argmax(-1).tolist()
    layers = [(a, b) for a, b in zip(triton_cache.layers, eager_cache.layers, strict=True)
              if isinstance(a, CodebookLayer)]  # fmt: skip
    assert layers
    for a, b in layers:
        assert torch.equal(a.key_book.refs, b.key_book.refs)
        assert torch.equal(a.value_book.refs, b.value_book.refs)
        assert torch.equal(a.positions, b.positions)
        assert (a.heads is None) == (b.heads is None)
        assert a.heads is None or torch.equal(a.heads, b.heads)


@on_cpu
def test_a_bfloat16_decode_through_triton_keeps_the_pytorch_operations_tokens_and_refs():
    """The GPU's dtype rehearsed on the CPU: the tiny model in bfloat16 (codebooks stored so,
    the kernels computing in float32, the PyTorch operations partly in bfloat16): the same
    tokens and codebook refs, entries and logits within the bfloat16 model's rounding."""
    model, ids = copy.deepcopy(load("gqa")).to(torch.bfloat16), prompt()
    fields = dict(window=8, ratio=0.3, key_threshold=0.9, value_threshold=0.8)
    ours, our_cache = run(model, ids, [SpindleKV(decode_attention="triton", **fields)], steps=6)
    eager, eager_cache = run(model, ids, [SpindleKV(decode_attention="codebook", **fields)], 6)
    assert ours.argmax(-1).tolist() == eager.argmax(-1).tolist()
    torch.testing.assert_close(ours.float(), eager.float(), atol=2e-2, rtol=2e-2)
    for a, b in zip(our_cache.layers, eager_cache.layers, strict=True):
        assert a.key_book.entries.dtype == torch.bfloat16
        assert torch.equal(a.key_book.refs, b.key_book.refs)
        assert torch.equal(a.value_book.refs, b.value_book.refs)
        for ours_, theirs in [(a.key_book, b.key_book), (a.value_book, b.value_book)]:
            # unit vectors; a decoded token's own carries the bfloat16 model's rounding, which
            # differs with the attention's (float32 here, partly bfloat16 there)
            torch.testing.assert_close(ours_.entries, theirs.entries, atol=2e-2, rtol=0)


@on_cpu
def test_a_kernel_that_cannot_run_falls_back_with_one_warning_recorded(monkeypatch):
    """Triton asked for on a CPU without the interpreter: the PyTorch operations run, with a
    warning naming why, recorded in the stats; same logits and refs as asked for directly."""
    monkeypatch.delenv("TRITON_INTERPRET")
    model, ids = load("gqa"), prompt()
    fields = dict(window=8, ratio=0.3, key_threshold=0.9, value_threshold=0.8)
    method = SpindleKV(decode_attention="triton", **fields)
    with pytest.warns(RuntimeWarning, match="TRITON_INTERPRET=1") as caught:
        logits, cache = run(model, ids, [method], steps=2)
    assert len([w for w in caught if "SpindleKV" in str(w.message)]) == 1
    stats = method.last_stats()
    assert stats["decode_kernel"] == "codebook"
    assert "interpreter" in stats["decode_kernel_fallback"]
    eager_logits, eager_cache = run(
        model, ids, [SpindleKV(decode_attention="codebook", **fields)], steps=2
    )
    assert torch.equal(logits, eager_logits)
    for a, b in zip(cache.layers, eager_cache.layers, strict=True):
        assert torch.equal(a.positions, b.positions)  # the same kept tokens
        assert torch.equal(a.key_book.refs, b.key_book.refs)
        assert torch.equal(a.value_book.refs, b.value_book.refs)


def test_the_kernel_follows_the_device_dtype_and_head_dim(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    resolve = codebook_triton.resolve
    assert resolve("fused", cpu, torch.float32, {16}) == ("fused", None)  # C++ on a CPU
    assert resolve("fused", cuda, torch.bfloat16, {128}) == ("triton", None)
    assert resolve("triton", cpu, torch.float32, {16}) == ("triton", None)  # interpreted
    assert resolve("codebook", cuda, torch.bfloat16, {128}) == ("codebook", None)
    kernel, why = resolve("fused", cpu, torch.bfloat16, {16})
    assert kernel == "codebook" and "float32 only" in why
    kernel, why = resolve("fused", cuda, torch.float64, {128})
    assert kernel == "codebook" and "torch.float64" in why
    kernel, why = resolve("fused", cuda, torch.bfloat16, {128, 300})
    assert kernel == "codebook" and "not 300" in why
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n: None if n == "triton" else real(n))
    assert resolve("fused", cuda, torch.bfloat16, {128}) == ("codebook", "Triton is not installed")


def step_book(magnitudes: bool, dtype: torch.dtype) -> Codebook:
    """Four groups (batch 2 x 2 KV heads) of 6 entries each, group 0's entry 4 twice (4, 5),
    group 3 with none: 24 entries in all, stored in ``dtype``."""
    g = torch.Generator().manual_seed(9)
    rows = torch.randn(24, 16, generator=g)
    rows[5] = rows[4]
    rows = rows / rows.norm(dim=-1, keepdim=True) if magnitudes else rows
    owner = torch.tensor([0] * 6 + [1] * 6 + [2] * 12, dtype=torch.int32)
    refs = torch.randint(0, 6, (2, 2, 10), generator=g, dtype=torch.int32)
    norms = torch.rand(2, 2, 10, generator=g).to(dtype) + 0.5 if magnitudes else None
    return Codebook(rows.to(dtype), owner, refs, norms, 0.9, "head")


@on_cpu
@pytest.mark.parametrize("magnitudes", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_step_joins_and_opens_the_entries_the_pytorch_operations_do(magnitudes, dtype):
    """One decoding step, a key per group given post-RoPE: back to pre-RoPE in the kernel,
    then it joins its own group's nearest entry (the first of two equal ones) or opens one,
    numbered in group order, as :meth:`Codebook.append` does (refs, owners, entries and
    magnitudes); group 3 has no entry, group 1's key is unlike its entries."""
    book = step_book(magnitudes, dtype)
    twin = copy.deepcopy(book)
    pre = torch.randn(2, 2, 1, 16, generator=torch.Generator().manual_seed(10))
    pre[0, 0, 0] = book.entries[4].float() * 3.0  # group 0: entries 4 and 5, the first wins
    pre[1, 0, 0] = book.entries[20].float() * 0.5  # group 2 joins entry 20
    position = torch.tensor([[310], [77]])
    rope = rotate_half_rope(16)
    cos, sin = rope(position, pre)
    post = apply_rope(pre, cos.unsqueeze(1), sin.unsqueeze(1))
    table = RopeTable(rope).upto(310, pre)
    book.append_step(post, table, position, codebook_triton.append)
    twin.append(pre)
    assert book.refs[..., -1].tolist() == [[4, 24], [20, 25]]
    assert torch.equal(book.refs, twin.refs) and torch.equal(book.owner, twin.owner)
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(book.entries, twin.entries, **tolerance)
    if magnitudes:
        torch.testing.assert_close(book.magnitudes, twin.magnitudes, **tolerance)


def test_the_kernels_compile_for_the_h200_without_spilling(tmp_path):
    """What the interpreter cannot check: each kernel compiles for sm_90 (H100/H200) with
    Llama-3-8B's head shapes and bfloat16 storage, and ptxas spills no register; the
    attention's slot loop fits in 128 registers a thread (four programs per SM resident)."""
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this Triton build has no NVIDIA backend (ptxas)")
    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    path = os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")]))
    env |= {"TRITON_CACHE_DIR": str(tmp_path), "PYTHONPATH": path}
    script = Path(__file__).with_name("triton_compile_check.py")
    done = subprocess.run(
        [sys.executable, str(script)], env=env, cwd=repo, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    usage = json.loads(done.stdout)
    assert set(usage) == {"slots", "join", "match", "open"}
    assert all(used["spilled_bytes"] == 0 for used in usage.values()), usage
    assert usage["slots"]["registers"] <= 128, usage


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled kernels need a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernels_on_the_gpu(dtype):
    """The compiled kernels (default splits and block) against the float32 PyTorch operations
    on the same values, the codebooks stored in ``dtype`` on the GPU."""
    layer = codebook_layer(7, heads=True, magnitudes=True)
    table = layer.table.upto(layer.last_position, layer.key_book.entries)
    kb, vb = layer.key_book, layer.value_book
    stored = [kb.entries, kb.magnitudes, vb.entries, vb.magnitudes, table, layer.keys, layer.values]
    for part in stored:
        part.copy_(part.to(dtype).float())
    query = torch.randn(1, 6, 1, 16, generator=torch.Generator().manual_seed(8))
    eager = codebook_attention.attend_codebook(layer, query, 0.25, 5.0)

    def gpu(t):
        return t.cuda() if t.dtype in (torch.int32, torch.bool) else t.to("cuda", dtype)

    out = codebook_triton.attend(
        (query.view(1, 2, 3, 16) * 0.25).cuda(), gpu(kb.entries), gpu(kb.refs),
        gpu(kb.magnitudes), gpu(table), gpu(layer.positions), gpu(layer.heads), gpu(vb.entries),
        gpu(vb.refs), gpu(vb.magnitudes), gpu(layer.keys), gpu(layer.values), 5.0,
    )  # fmt: skip
    out = out.cpu().view(1, 6, 1, 16).transpose(1, 2)
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-4)
