"""Captured decoding steps (``model.decode_capture``, :mod:`harness.decode_graph`), proven on
the CPU through ``replay``: the same recorded-and-replayed step a CUDA graph runs, which bakes
in every Python value of the step it recorded. Every method that can be captured generates
the tokens, logits and bytes of eager decoding, on a GQA Llama and on a Gemma-3 with sliding
layers; a step that reads Python state per token, or a device value on the host, fails here."""

from __future__ import annotations

import time

import pytest
import torch

from harness import records, static_cache
from harness.decode_graph import CaptureError, DecodeGraphs, plan
from harness.generation import greedy_generate
from harness.models import ModelConfigError, ModelSpec, byte_tokenizer
from harness.session import open_session
from harness.static_cache import StaticLayer, capacity
from methods.base import CacheMethod, Compose
from methods.cache.h2o import H2O
from methods.cache.knorm import KeyNorm
from methods.cache.pyramidkv import PyramidKV
from methods.cache.snapkv import SnapKV
from methods.cache.spindlekv.spindlekv import SpindleKV
from methods.cache.streamingllm import StreamingLLM
from methods.full import FullCache
from methods.model.kvheads import KVHeads
from methods.model.kvlatent import KVLatent
from methods.prompt.random_deletion import RandomDeletion
from tests.test_prefill_chunk import ARCHS, ids, load

NEW_TOKENS = 24  # Gemma's sliding layers (window 16) slide while decoding
METHODS = {
    "full": FullCache,
    "streamingllm": lambda: StreamingLLM(ratio=0.3),
    "knorm": lambda: KeyNorm(ratio=0.3, window=8),
    "snapkv": lambda: SnapKV(ratio=0.3, window=8),
    "pyramidkv": lambda: PyramidKV(ratio=0.3, window=8),  # a different length per layer
    "snapkv_sliding": lambda: SnapKV(ratio=0.3, window=8, compress_sliding=True),
    "kvlatent": lambda: KVLatent(train=False, variant="kv", dim=8, rope="standard"),
    "kvheads": lambda: KVHeads(num_kv_heads=1, calibration_tokens=512, calibration_seq_len=64),
    "random_deletion+snapkv": lambda: Compose(
        methods=[RandomDeletion(ratio=0.7), SnapKV(ratio=0.3, window=8)]
    ),
}
FIELDS = (
    "tokens",
    "prompt_tokens",
    "decode_steps",
    "kv_bytes_prefill",
    "kv_bytes_final",
    "cached_tokens_final",
)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def generations(arch: str, method, capture: str | None, lengths=(150, 157, 150)) -> tuple:
    """Greedy generations of prompts of ``lengths`` in one session (a fresh model: model
    methods change it in place), EOS off so every request decodes ``NEW_TOKENS`` steps;
    then the steps captured, and a continuation's log-likelihood and its measurement (cache
    methods score it token by token, in the captured step)."""
    model = load.__wrapped__(arch)
    model.generation_config.eos_token_id = []
    with open_session(method, model, byte_tokenizer(), decode_capture=capture) as session:
        session.eos_token_ids = []
        out = [session.generate(ids(n, seed=n), max_new_tokens=NEW_TOKENS) for n in lengths]
        captures = session.graphs.captures if session.graphs is not None else 0
        scored = session.logprob(ids(150), ids(12, seed=1)), session.measurements[-1]
    return [o.generation for o in out], captures, scored


CASES = [(a, n) for a in ARCHS for n in METHODS if (a, n) != ("gemma", "kvheads")]  # k_norm


@pytest.mark.parametrize(("arch", "name"), CASES)
def test_captured_steps_generate_what_eager_steps_do(arch, name):
    want, _, (want_logprob, want_scored) = generations(arch, METHODS[name](), None)
    got, captures, (logprob, scored) = generations(arch, METHODS[name](), "replay")
    for mine, theirs in zip(got, want, strict=True):
        for field in FIELDS:
            assert getattr(mine, field) == getattr(theirs, field), field
        torch.testing.assert_close(mine.last_logits, theirs.last_logits, rtol=1e-4, atol=1e-4)
    # the third request has the first's shapes: its step is the one captured for the first
    assert 1 <= captures <= 3
    assert logprob[0] == pytest.approx(want_logprob[0], abs=1e-3)
    assert logprob[1] == want_logprob[1]
    assert scored.kv_bytes_final == want_scored.kv_bytes_final


def test_capturing_a_new_shape_is_timed_apart_from_decoding(monkeypatch):
    """A capture (slowed here by a second) is the first request's ``capture_s``, not part of
    its ``decode_s``; a request whose shapes were captured before pays none."""
    from harness import decode_graph

    capture = decode_graph.Replay.__init__

    def slow_capture(self, *args, **kwargs):
        time.sleep(1.0)
        capture(self, *args, **kwargs)

    monkeypatch.setattr(decode_graph.Replay, "__init__", slow_capture)
    got, captures, (_, scored) = generations("llama", FullCache(), "replay", lengths=(300, 307))
    assert captures == 1  # 300 and 307 tokens (+ 24) share one capacity: one capture
    assert got[0].capture_s >= 1.0 and got[0].decode_s < 1.0
    assert got[1].capture_s == 0.0
    # the stepwise score of 150 + 12 tokens needs a smaller capacity: a capture of its own
    assert scored.capture_s >= 1.0


def test_a_step_that_bakes_in_a_python_value_decodes_wrong_tokens(monkeypatch):
    """The negative control: a step that writes at a host-side index (a Python int, frozen
    when the step was recorded, as a CUDA graph freezes it) writes every token to one slot;
    eager decoding (it runs the Python each step) would not notice."""

    def update(self, key_states, value_states, *args, **kwargs):
        slot = self.loaded  # host state: right for the recorded step only
        self.key_buffer[:, :, slot : slot + 1].copy_(key_states)
        self.value_buffer[:, :, slot : slot + 1].copy_(value_states)
        self.mask = (self.slots <= slot).view(1, 1, 1, -1)
        self.loaded += 1
        return self.key_buffer, self.value_buffer

    want = generations("llama", FullCache(), None, lengths=(150,))[0]
    monkeypatch.setattr(StaticLayer, "update", update)
    got = generations("llama", FullCache(), "replay", lengths=(150,))[0]
    assert got[0].tokens[0] == want[0].tokens[0]  # from the prefill, not a step
    assert got[0].tokens != want[0].tokens


def test_a_step_that_reads_a_device_value_on_the_host_is_refused(monkeypatch):
    """``.item()`` in a step is a host sync that a CUDA graph cannot capture: refused as the
    step is recorded, on the CPU too."""
    original = StaticLayer.update

    def update(self, key_states, value_states, *args, **kwargs):
        if int(self.length) > 10**9:  # a host read of the device length
            raise AssertionError
        return original(self, key_states, value_states, *args, **kwargs)

    monkeypatch.setattr(StaticLayer, "update", update)
    with pytest.raises(CaptureError, match="reads a device value on the host"):
        generations("llama", FullCache(), "replay", lengths=(150,))


def test_the_prefill_writes_into_the_captured_steps_buffers():
    """Requests of one shape reuse one captured step, and a full cache's prefill writes
    straight into its buffers: no second copy of the cache, none made per request."""
    model = load("llama")
    graphs = DecodeGraphs("replay")
    prompt = torch.tensor([ids(150)])
    greedy_generate(model, prompt, max_new_tokens=8, graphs=graphs)
    buffers = [layer.key_buffer.data_ptr() for layer in graphs.step.cache.layers]
    out = greedy_generate(model, prompt[:, :140], max_new_tokens=8, graphs=graphs)
    assert graphs.captures == 1
    assert [layer.key_buffer.data_ptr() for layer in graphs.step.cache.layers] == buffers
    # what the request allocated is the captured step's buffers, sized by capacity()
    per_token = sum(layer.nbytes(1) for layer in graphs.step.cache.layers)
    assert out.kv_allocated_bytes_prefill == per_token * capacity(140 + 7)


def test_capacities_round_up_by_an_eighth_at_most_past_2k_tokens():
    for tokens in (1, 255, 257, 4000, 8192 + 255, 131072 + 1000):
        slots = capacity(tokens)
        assert slots >= tokens and slots % static_cache.MIN_CAPACITY_STEP == 0
        assert slots - tokens < max(tokens / 8, static_cache.MIN_CAPACITY_STEP)
    assert capacity(8100) == capacity(8150)  # nearby lengths: one captured step


def test_every_cache_method_that_decodes_says_so():
    """A cache method that overrides ``reduce_kv_decode`` changes the cache while decoding:
    it must declare it, or its steps would be captured without it."""
    seen = set()
    stack = list(CacheMethod.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        seen.add(cls)
    for cls in seen:
        if "reduce_kv_decode" in vars(cls):
            assert cls.acts_while_decoding, cls.__name__
    assert H2O.acts_while_decoding and SpindleKV.acts_while_decoding


GEMMA_CONFIG = type("Config", (), {"attn_logit_softcapping": 50.0})()
LLAMA_CONFIG = type("Config", (), {})()


@pytest.mark.parametrize(
    ("choice", "device", "method", "config", "attn", "backend", "want"),
    [
        ("auto", "cuda", FullCache(), LLAMA_CONFIG, "sdpa", "auto", "graph"),
        ("auto", "cpu", FullCache(), LLAMA_CONFIG, "sdpa", "auto", "eager: CUDA graphs need"),
        ("auto", "cuda", H2O(ratio=0.3), LLAMA_CONFIG, "sdpa", "auto", "eager: method h2o"),
        ("auto", "cuda", SpindleKV(ratio=0.3), LLAMA_CONFIG, "sdpa", "auto", "eager: method"),
        ("auto", "cuda", FullCache(), LLAMA_CONFIG, "eager", "auto", "eager: a captured step"),
        ("auto", "cuda", FullCache(), GEMMA_CONFIG, "sdpa", "auto", "eager: the model soft"),
        (
            "replay",
            "cpu",
            KVHeads(num_kv_heads=1, calibration_tokens=512),
            LLAMA_CONFIG,
            "sdpa",
            "auto",
            "replay",
        ),
        ("off", "cuda", FullCache(), LLAMA_CONFIG, "sdpa", "auto", "eager: model.decode_capture"),
    ],
)
def test_the_plan_names_what_runs_and_why(choice, device, method, config, attn, backend, want):
    assert plan(choice, device, method, config, attn, backend).startswith(want)


def test_the_auto_sdpa_backend_is_captured_and_a_named_flash_is_not():
    """``model.sdpa_backend=auto`` on CUDA lets masked calls fall to the memory-efficient
    kernel; a named flash allows flash alone, which takes no mask."""
    assert plan("auto", "cuda", FullCache(), LLAMA_CONFIG, "sdpa", "auto") == "graph"
    got = plan("auto", "cuda", FullCache(), LLAMA_CONFIG, "sdpa", "flash")
    assert got == "eager: model.sdpa_backend=flash takes no mask, which the captured step needs"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"decode_capture": "cudagraph"}, r"^model.decode_capture='cudagraph' is unknown: use"),
        ({"decode_capture": "graph"}, r"^model.decode_capture=graph captures CUDA graphs, and "),
        ({"decode_capture": "replay", "attn_implementation": "eager"}, "runs sdpa attention"),
    ],
)
def test_a_capture_that_cannot_be_had_fails_before_the_weights_load(fields, message):
    arch = ARCHS["llama"]
    with pytest.raises(ModelConfigError, match=message):
        spec = ModelSpec(name="llama", source="random", architecture=arch, **fields)
        spec.decode_plan(FullCache(), spec.load_config())


def test_a_named_capture_refuses_a_method_that_decodes():
    spec = ModelSpec(name="llama", source="random", architecture=ARCHS["llama"])
    spec.decode_capture = "replay"
    with pytest.raises(ModelConfigError, match=r"^model.decode_capture=replay: method h2o"):
        spec.decode_plan(H2O(ratio=0.3), spec.load_config())


def test_a_run_records_how_it_decoded_and_replay_changes_no_output(tmp_path):
    """Through Hydra: ``model.decode_capture=replay`` decodes GSM8K's answers with the captured
    step; the same outputs, score and bytes as eager decoding, and the record names it."""
    from harness.run import execute
    from tests.test_run import TINY, composed

    got = {}
    for choice in ("off", "replay"):
        folder = execute(composed(tmp_path / choice, *TINY, f"model.decode_capture={choice}"))
        got[choice] = records.read_record(folder)
    off, replay = got["off"], got["replay"]
    assert off["model"]["decode_capture"] == "eager: model.decode_capture=off"
    assert replay["model"]["decode_capture"] == "replay"
    assert replay["score"] == off["score"]
    assert [s["output"] for s in replay["samples"]] == [s["output"] for s in off["samples"]]
    for field in ("kv_bytes_final", "generated_tokens"):
        assert replay["measurements"][field] == off["measurements"][field]
    # capturing the step is measured apart from decoding, and only where a step is captured
    assert replay["measurements"]["capture_s"]["total"] > 0
    assert off["measurements"]["capture_s"]["total"] == 0
    from harness.report.tables import run_row

    assert run_row(replay, "replay")["capture_ms"] > 0
    assert run_row(off, "off")["capture_ms"] == 0
