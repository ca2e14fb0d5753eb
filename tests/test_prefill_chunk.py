"""Chunked prefill (``model.prefill_chunk``): every method keeps the same positions and gives
the same logits as a one-pass prefill, on a GQA Llama and on a Gemma-3 with sliding layers."""

from __future__ import annotations

import copy
import functools
import operator

import pytest
import torch

from harness import generation, records
from harness.api import build
from harness.generation import Chunking
from harness.job import check_method
from harness.kvcache import InPlaceLayer
from harness.models import ModelConfigError, ModelSpec, byte_tokenizer
from harness.preflight import ConfigError
from harness.session import open_session
from methods.base import CacheMethod, Compose, MethodConfigError
from methods.cache import h2o_kernels
from methods.cache.h2o import H2O
from methods.cache.knorm import KeyNorm
from methods.cache.pyramidkv import PyramidKV
from methods.cache.snapkv import SnapKV
from methods.cache.spindlekv.codebook_layer import CodebookLayer
from methods.cache.spindlekv.spindlekv import SpindleKV
from methods.cache.streamingllm import StreamingLLM
from methods.full import FullCache
from methods.model.kvheads import KVHeads
from methods.model.kvlatent import KVLatent
from methods.prompt.random_deletion import RandomDeletion

LLAMA = dict(
    model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, vocab_size=260, max_position_embeddings=4096,
    bos_token_id=256, eos_token_id=257, pad_token_id=258,
)  # fmt: skip
GEMMA = dict(  # sliding layers of window 16 (each holds 15 tokens) between full ones
    LLAMA, model_type="gemma3_text", head_dim=16, query_pre_attn_scalar=16, sliding_window=16,
    layer_types=["sliding_attention", "full_attention"] * 2,
)  # fmt: skip
ARCHS = {"llama": LLAMA, "gemma": GEMMA}
CONTEXT, CONTINUATION = 173, 9  # prompt lengths that no chunk size divides
CHUNKS = (16, 50)
METHODS = {
    "streamingllm": lambda **kw: StreamingLLM(ratio=0.3, **kw),
    "knorm": lambda **kw: KeyNorm(ratio=0.3, window=8, **kw),
    "snapkv": lambda **kw: SnapKV(ratio=0.3, window=8, **kw),
    "pyramidkv": lambda **kw: PyramidKV(ratio=0.3, window=8, **kw),
    "h2o": lambda **kw: H2O(ratio=0.3, **kw),
    "spindlekv": lambda **kw: SpindleKV(ratio=0.3, window=8, **kw),
}
CASES = [(arch, name, False) for arch in ARCHS for name in METHODS]
CASES += [("gemma", name, True) for name in METHODS]  # compress_sliding: the sliding layers too


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def load(arch: str) -> torch.nn.Module:
    """A tiny random model. Gemma's q/k norms start at scale 1, so every key has the same
    norm and Key-norm's scores tie (fp noise would pick): its norm weights are drawn too."""
    model = ModelSpec(name=arch, source="random", architecture=ARCHS[arch]).load()[0]
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if arch == "gemma" and "norm" in name:
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.3)
    return model


def ids(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture
def caches(monkeypatch):
    """Every KV cache the generation loop creates, in order."""
    made = []

    def spy(*args, **kwargs):
        made.append(generation_new_cache(*args, **kwargs))
        return made[-1]

    generation_new_cache = generation.new_cache
    monkeypatch.setattr(generation, "new_cache", spy)
    return made


def requests(model, method, chunk, caches) -> dict:
    """A generation of one token (its cache: the state right after prefill), then the
    log-likelihood of a continuation (its tokens fed one by one over the kept cache)."""
    context = ids(CONTEXT)
    with open_session(method, model, byte_tokenizer(), prefill_chunk=chunk) as session:
        out = session.generate(context, max_new_tokens=1)
        logprob, greedy = session.logprob(context, ids(CONTINUATION, seed=1))
    return {
        "logits": out.generation.last_logits,
        "cache": caches[-2],
        "logprob": logprob,
        "greedy": greedy,
        "measurement": out.measurement,
    }


def kept_positions(cache, reference) -> list[torch.Tensor]:
    """Per layer, the prompt position of every token it holds (B, H_kv, n): SpindleKV's codebook
    layers record them; other layers' keys are matched to the full cache's (``reference``)."""
    out = []
    for layer, full in zip(cache.layers, reference.layers, strict=True):
        if isinstance(layer, CodebookLayer):
            out.append(torch.cat((layer.positions.long(), layer.heads.long().flatten(2, 3)), -1))
            continue
        distance = torch.cdist(
            layer.keys.float(), full.keys.float(), compute_mode="donot_use_mm_for_euclid_dist"
        )
        assert float(distance.min(-1).values.max()) < 1e-3  # every held key is a prompt key
        out.append(distance.argmin(-1))
    return out


def assert_same(got: dict, want: dict) -> None:
    torch.testing.assert_close(got["logits"], want["logits"], rtol=1e-4, atol=1e-4)
    assert got["logprob"] == pytest.approx(want["logprob"], abs=1e-3)
    assert got["greedy"] == want["greedy"]
    for field in ("kv_bytes_prefill", "method_stats"):
        assert getattr(got["measurement"], field) == getattr(want["measurement"], field)
    # a sliding layer's one-pass prefill keeps a view of the whole prompt's keys; chunks do not
    allocated = (m.kv_allocated_bytes_prefill for m in (got["measurement"], want["measurement"]))
    assert operator.le(*allocated)


@pytest.mark.parametrize(("arch", "name", "sliding"), CASES)
def test_chunked_prefill_keeps_the_same_positions_and_logits(arch, name, sliding, caches):
    model = load(arch)
    reference = requests(model, FullCache(), None, caches)["cache"]
    want = requests(model, METHODS[name](compress_sliding=sliding), None, caches)
    positions = kept_positions(want["cache"], reference)
    assert sum(p.shape[-1] for p in positions) < sum(
        layer.keys.shape[-2] for layer in reference.layers
    )
    for chunk in CHUNKS:
        got = requests(model, METHODS[name](compress_sliding=sliding), chunk, caches)
        for layer, (mine, theirs) in enumerate(
            zip(kept_positions(got["cache"], reference), positions, strict=True)
        ):
            assert torch.equal(mine, theirs), f"chunk {chunk}, layer {layer}"
        assert_same(got, want)


def test_h2o_kernels_run_the_chunks_of_a_prefill(caches):
    """The chunks' mask is the causal one, which H2O's Triton kernels apply themselves (here
    under Triton's CPU interpreter, on Gemma's two full layers): no fallback, the same
    positions as the PyTorch path."""
    pytest.importorskip("triton", reason="triton is not installed (the test extra has it)")
    if not h2o_kernels.interpreted():
        pytest.skip("TRITON_INTERPRET is not set (tests/conftest.py sets it without a GPU)")
    model = load("gemma")
    reference = requests(model, FullCache(), None, caches)["cache"]
    want = requests(model, H2O(ratio=0.3, prefill_kernel="torch"), None, caches)
    got = requests(model, H2O(ratio=0.3, prefill_kernel="triton"), 50, caches)
    stats = got["measurement"].method_stats
    assert stats["prefill_kernel"] == "triton" and "prefill_fallback" not in stats
    mine, theirs = (kept_positions(run["cache"], reference) for run in (got, want))
    assert all(map(torch.equal, mine, theirs))
    torch.testing.assert_close(got["logits"], want["logits"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_prefill_changes_nothing_for_the_full_cache(arch, caches):
    """No cache method (the model untouched, log-likelihoods in one pass); on Gemma the
    sliding layers' masks with a cache: greedy tokens, logits and bytes as one pass."""
    model = load(arch)
    want = requests(model, FullCache(), None, caches)
    context = ids(CONTEXT)
    with open_session(FullCache(), model, byte_tokenizer()) as session:
        tokens = session.generate(context, max_new_tokens=8).generation.tokens
    for chunk in CHUNKS:
        got = requests(model, FullCache(), chunk, caches)
        assert_same(got, want)
        if arch == "llama":  # the first chunk's buffers have room for the whole prompt
            allocated = want["measurement"].kv_allocated_bytes_prefill
            assert got["measurement"].kv_allocated_bytes_prefill == allocated
        with open_session(FullCache(), model, byte_tokenizer(), prefill_chunk=chunk) as session:
            assert session.generate(context, max_new_tokens=8).generation.tokens == tokens


def test_a_chunked_prefill_allocates_the_cache_once(monkeypatch):
    """The first chunk's buffers hold the whole prompt: later chunks append, never copy."""
    grown = []
    reallocate = InPlaceLayer._reallocate
    monkeypatch.setattr(
        InPlaceLayer, "_reallocate", lambda layer, *args: grown.append(reallocate(layer, *args))
    )
    with open_session(FullCache(), load("llama"), byte_tokenizer(), prefill_chunk=16) as s:
        s.generate(ids(CONTEXT), max_new_tokens=4)
    assert len(grown) == LLAMA["num_hidden_layers"]


def kvlatent():
    return KVLatent(train=False, variant="kv", dim=8, rope="standard")


def kvheads():
    return KVHeads(num_kv_heads=1, calibration_tokens=512, calibration_seq_len=64)


@pytest.mark.parametrize("make", [kvlatent, kvheads], ids=["kvlatent", "kvheads"])
def test_model_methods_prefill_in_chunks(make, caches):
    """A model method changes the model (in place: a fresh copy each time)."""
    model = load("llama")
    want = requests(copy.deepcopy(model), make(), None, caches)
    for chunk in CHUNKS:
        assert_same(requests(copy.deepcopy(model), make(), chunk, caches), want)


def test_a_prompt_method_composed_with_a_cache_method_prefills_in_chunks():
    """The text changes before tokenising; the last chunk holds SnapKV's window."""
    text = "The quick brown fox jumps over the lazy dog. " * 6 + "Question: which animal?"
    outputs = []
    for chunk in (None, *CHUNKS):
        method = Compose(methods=[RandomDeletion(ratio=0.7), SnapKV(ratio=0.3, window=8)])
        with open_session(method, load("llama"), byte_tokenizer(), prefill_chunk=chunk) as s:
            out = s.generate(text, max_new_tokens=4)
            outputs.append(
                (out.prompt_ids, out.generation.tokens, out.measurement.kv_bytes_prefill)
            )
    assert outputs[1] == outputs[0] and outputs[2] == outputs[0]


def test_no_forward_pass_sees_more_than_a_chunk():
    """The deterministic side of the memory claim: the largest activation of a chunked
    prefill is one chunk's (and the window SnapKV needs in the last), not the prompt's."""
    model = load("llama")
    seen = []
    hook = model.model.layers[0].mlp.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].shape[1])
    )
    try:
        largest = {}
        for chunk in (None, 16):
            seen.clear()
            with open_session(
                SnapKV(ratio=0.3, window=8), model, byte_tokenizer(), prefill_chunk=chunk
            ) as s:
                s.generate(ids(CONTEXT), max_new_tokens=2)
            largest[chunk] = max(seen)
        assert largest[None] == CONTEXT
        assert largest[16] <= 16 + 8 - 1  # a chunk, or a shorter remainder joined with 8
    finally:
        hook.remove()


@pytest.mark.parametrize(
    ("length", "size", "tail", "bounds"),
    [
        (173, 50, 1, [0, 50, 100, 150, 173]),
        (130, 50, 32, [0, 50, 130]),  # the 30-token remainder joins the chunk before
        (130, 16, 32, [0, 16, 32, 48, 64, 80, 96, 130]),
        (40, 16, 32, [0, 40]),  # shorter than chunk + window: one pass
        (16, 16, 1, [0, 16]),
    ],
)
def test_chunk_bounds_keep_the_tail_in_the_last_chunk(length, size, tail, bounds):
    assert Chunking(size, tail).bounds(length) == bounds


def test_the_last_chunk_holds_what_every_cache_method_scores_with():
    gemma = load("gemma").config
    method = Compose(methods=[SnapKV(window=8), H2O(compress_sliding=True)])
    assert Chunking.of(32, method, gemma) == Chunking(32, 16)  # H2O's: the sliding window
    assert Chunking.of(32, SnapKV(window=8), gemma) == Chunking(32, 8)
    assert Chunking.of(None, SnapKV(), gemma) is None


class Unchunkable(CacheMethod):
    """A cache method that does not say it can be chunked (its reduce_kv may want every query)."""


def test_a_method_that_cannot_be_chunked_says_so_before_loading():
    spec = ModelSpec(name="m", source="random", architecture=LLAMA, prefill_chunk=16)
    with pytest.raises(
        MethodConfigError,
        match=r"^method unchunkable cannot prefill in chunks .*: set model.prefill_chunk=null$",
    ):
        check_method(spec, Unchunkable(), spec.load_config())
    check_method(spec, Compose(methods=list(m() for m in METHODS.values())), spec.load_config())
    with pytest.raises(MethodConfigError, match=r"set prefill_chunk=None$"):
        with open_session(Unchunkable(), load("llama"), byte_tokenizer(), prefill_chunk=16):
            pass


def test_a_bad_prefill_chunk_is_named():
    with pytest.raises(ModelConfigError, match=r"^model.prefill_chunk=8 is below 16 tokens"):
        build("model", "tiny_llama_gqa", prefill_chunk=8)
    with pytest.raises(ConfigError, match=r"^model.prefill_chunk="):
        build("model", "tiny_llama_gqa", prefill_chunk="big")
    with pytest.raises(ValueError, match=r"^prefill_chunk=0 is not a chunk of at least 16"):
        with open_session(FullCache(), load("llama"), byte_tokenizer(), prefill_chunk=0):
            pass


def test_prefill_chunk_is_hashed_only_when_set():
    """null keeps the run ids made before the field existed; a chunk size is another run."""
    cfg = {"model": {"name": "m", "prefill_chunk": None}, "run": {}}
    assert records.config_hash(cfg) == records.config_hash({"model": {"name": "m"}, "run": {}})
    assert records.config_hash(
        {**cfg, "model": {"name": "m", "prefill_chunk": 512}}
    ) != records.config_hash(cfg)
