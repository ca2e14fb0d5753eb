"""Prompt methods (methods/prompt): DAC, self-information, random deletion, LLMLingua.

Tiny random Llamas (byte-level tokenizer: one token per byte) and prompts rendered by
lm-eval from the offline tasks, split by each task's TaskSpec.
"""

from __future__ import annotations

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lm_eval.tasks import TaskManager
from omegaconf import OmegaConf
from transformers import GPT2Config, GPT2LMHeadModel

from harness.api import build as api_build
from harness.compressors import load_compressor
from harness.lm import KVBenchLM
from harness.results import aggregate
from harness.session import open_session
from harness.tasks import TASKS_DIR
from methods.base import Compose, MethodConfigError, PromptParts
from methods.prompt.compressor import chunk_spans
from methods.prompt.dac import DAC
from methods.prompt.llmlingua import LLMLingua
from methods.prompt.random_deletion import RandomDeletion
from methods.prompt.tokens import TokenDropMethod
from tests.conftest import REPO, model_spec

SHOT = (
    "Question: Natalia sold clips to {i} of her friends in April, and then she sold half as "
    "many clips in May. How many clips did Natalia sell altogether?\nAnswer: {j}\n\n"
)
TEXT = "".join(SHOT.format(i=40 + i, j=60 + i) for i in range(3))  # ~460 bytes
QUESTION = "Question: Weng earns $12 an hour. How much did she earn?\nAnswer:"


def build(name: str, **overrides) -> TokenDropMethod:
    cfg = OmegaConf.merge(OmegaConf.load(REPO / "conf" / "method" / f"{name}.yaml"), overrides)
    return instantiate(cfg, _convert_="all")


def fast(name: str, **overrides) -> TokenDropMethod:
    """The config's method, with a few steps and segments sized for the tiny models."""
    small = {"dac": {"iterations": 2}, "llmlingua": {"iterative_size": 100}}.get(name, {})
    return build(name, **{**small, **overrides})


METHODS = ["dac", "selfinfo", "random_deletion", "llmlingua"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and far faster on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return model_spec("tiny_llama_gqa").load()


@pytest.fixture(scope="module")
def rendered() -> dict[str, tuple[str, str]]:
    """(prompt, final question text) of one document per task, as lm-eval renders them."""
    names = {
        "gsm8k": "kvbench_gsm8k",
        "bbh": "kvbench_bbh_cot_fewshot_navigate",
        "longbench_qasper": "kvbench_longbench_qasper",
    }
    loaded = TaskManager(include_path=str(TASKS_DIR), include_defaults=False).load(
        list(names.values())
    )["tasks"]
    out = {}
    for name, lm_name in names.items():
        task = loaded[lm_name]
        task.set_fewshot_seed(1234)
        doc = task.eval_docs[0]
        prompt = task.fewshot_context(doc, task.config.num_fewshot or 0)
        out[name] = (prompt, task.doc_to_text(doc))
    return out


@pytest.mark.parametrize("name", METHODS)
def test_rate_zero_and_blank_prompts_are_returned_unchanged(tiny, name):
    method = fast(name, ratio=1.0)
    method.prepare(*tiny)
    parts = PromptParts(TEXT, QUESTION)
    assert method.shorten_text(parts) == parts.text
    assert method.last_stats()["compressor_passes"] == 0
    method = fast(name, ratio=0.5)
    method.prepare(*tiny)
    for blank in (PromptParts("", ""), PromptParts(" \n\t ", QUESTION), PromptParts("", "x")):
        assert method.shorten_text(blank) == blank.text
        assert method.last_stats()["achieved_rate"] == 0.0


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("rate", [0.3, 0.5])
def test_output_is_an_ordered_subsequence_at_the_requested_rate(tiny, name, rate):
    method = fast(
        name, ratio=round(1 - rate, 12), chunk_size=200
    )  # chunked: ~460 tokens in 3 chunks
    method.prepare(*tiny)
    ids, kept = method.select_text(TEXT)
    assert kept[0] == 0 and kept == sorted(set(kept)) and kept[-1] < len(ids)
    assert abs((1 - len(kept) / len(ids)) - rate) <= 0.02
    out = method.shorten_text(PromptParts(TEXT, QUESTION))
    assert out == method.scorer.decode([ids[i] for i in kept]) + QUESTION
    stats = method.last_stats()
    assert stats["requested_rate"] == rate and abs(stats["achieved_rate"] - rate) <= 0.02
    assert stats["compressor_tokens"] == len(ids) and stats["compress_s"] > 0
    assert (stats["compressor_passes"] > 0) == (name != "random_deletion")


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("task", ["gsm8k", "bbh", "longbench_qasper"])
def test_only_the_demonstrations_or_context_are_compressed(tiny, rendered, name, task):
    """The split of each task, on the prompt lm-eval renders: the final question (and the
    answer cue) is protected and comes back byte-identical; the rest shrinks."""
    from tests.test_tasks import spec

    prompt, question = rendered[task]
    parts = spec(task).split_prompt(prompt)
    if task == "longbench_qasper":  # the article is compressible, the question protected
        assert "Article:" in parts.compressible and question not in parts.compressible
        assert parts.protected.startswith("\n\n Answer the question based on the above")
        assert "Question:" in parts.protected
        parts = PromptParts(parts.compressible[-3000:], parts.protected)  # tiny-model sized
    else:  # every few-shot example is compressible; the protected part is the question
        assert parts.protected == question
        shots = parts.compressible.count("Q: " if task == "bbh" else "Question:")
        assert shots == (3 if task == "bbh" else 5)
    method = fast(name, ratio=0.5, **({"iterations": 1} if name == "dac" else {}))
    method.prepare(*tiny)
    out = method.shorten_text(parts)
    assert out.endswith(parts.protected) and out[-len(parts.protected) :] == parts.protected
    assert len(out) - len(parts.protected) < 0.6 * len(parts.compressible)


def test_dac_rescoring_counts_passes_and_changes_the_selection(tiny):
    one, three = DAC(ratio=0.5, iterations=1), DAC(ratio=0.5, iterations=3)
    for method in (one, three):
        method.prepare(*tiny)
        method.shorten_text(PromptParts(TEXT, QUESTION))
    assert one.last_stats()["compressor_passes"] == 1
    assert three.last_stats()["compressor_passes"] == 3
    _, kept_one = one.select_text(TEXT)
    _, kept_three = three.select_text(TEXT)
    assert len(kept_three) == three.step_sizes(len(three.scorer.encode(TEXT)))[-1]
    assert kept_one != kept_three
    auto = DAC(ratio=0.5)  # T = min(max(1, n // 100), 15)
    assert (auto.steps(99), auto.steps(460), auto.steps(5000)) == (1, 4, 15)


def test_selfinfo_keeps_the_most_surprising_tokens(tiny):
    method = build("selfinfo", ratio=0.5)
    method.prepare(*tiny)
    ids, kept = method.select_text(TEXT)
    info = method.scorer.token_scores(ids, attention=False).self_info
    dropped = sorted(set(range(1, len(ids))) - set(kept))
    assert info[kept[1:]].min() >= info[dropped].max()


def test_llmlingua_token_level_conditions_on_the_compressed_prefix(tiny):
    """The KV-cached segment loop equals a plain re-computation: each segment scored after
    the tokens kept so far, keeping its most surprising tokens."""
    method = LLMLingua(ratio=0.4, iterative_size=70, context_budget=None)
    method.prepare(*tiny)
    ids = method.scorer.encode(TEXT)
    target = method.kept_count(len(ids))
    got = method.iterative_compress(ids, target)
    kept, tau = [0], target / len(ids)
    for begin in range(1, len(ids), 70):
        segment = list(range(begin, min(begin + 70, len(ids))))
        info = method.scorer.token_scores([ids[i] for i in kept + segment], False).self_info
        quota = max(0, min(round(tau * (segment[-1] + 1)) - len(kept), len(segment)))
        kept += [segment[j] for j in info[len(kept) :].topk(quota).indices.sort().values]
    assert got == kept and len(got) == target


def test_llmlingua_budget_controller_drops_whole_low_perplexity_demonstrations(tiny):
    method = LLMLingua(ratio=0.2, context_budget=0)
    method.prepare(*tiny)
    demos = [method.scorer.encode(SHOT.format(i=i, j=i)) for i in range(5)]
    chosen = method.control_context_budget(demos, target=len(demos[0]) + 5)
    assert chosen == sorted(chosen) and len(chosen) == 2  # the one that crosses is kept
    one_segment = LLMLingua(ratio=0.5, iterative_size=10_000, context_budget=None)
    selfinfo = build("selfinfo", ratio=0.5)
    for m in (one_segment, selfinfo):
        m.prepare(*tiny)
    assert one_segment.select_text(TEXT) == selfinfo.select_text(TEXT)


def test_random_deletion_is_seeded_by_text_and_seed(tiny):
    a, b = RandomDeletion(ratio=0.5), RandomDeletion(ratio=0.5, seed=1)
    for m in (a, b):
        m.prepare(None, tiny[1])  # no model needed
    assert a.select_text(TEXT) == a.select_text(TEXT) != b.select_text(TEXT)


def test_a_named_compressor_is_loaded_once_and_used(tiny):
    """open_session loads the named compressor (on the benchmarked model's device) and hands
    it over; a second method naming it shares the one already loaded."""
    first, second = DAC(ratio=0.5, compressor="tiny_llama_mha"), DAC(compressor="tiny_llama_mha")
    for method in (first, second):
        with open_session(method, *tiny) as session:
            session.shorten_prompt(PromptParts(TEXT, QUESTION))
    assert first.scorer.model is second.scorer.model is not tiny[0]
    assert first.scorer.model.config.num_key_value_heads == 4
    assert first.last_stats()["compressor_passes"] >= 1
    assert load_compressor.cache_info().misses >= 1 and load_compressor.cache_info().hits >= 1


def test_a_named_compressor_not_handed_over_fails_in_prepare(tiny):
    """The method never loads its named compressor itself, nor falls back on the model."""
    method = DAC(ratio=0.5, compressor="tiny_llama_mha")
    with pytest.raises(RuntimeError, match=r"compressor='tiny_llama_mha' was not handed over"):
        method.prepare(*tiny)
    method.use_compressor(*load_compressor("tiny_llama_mha", "cpu"))
    method.prepare(*tiny)
    assert method.scorer.model is load_compressor("tiny_llama_mha", "cpu")[0]


def test_an_unknown_compressor_fails_before_anything_loads(tiny):
    """The harness checks the name (api.build, job.prepare, open_session: also inside a
    composition), the method never."""
    match = r"^method\.compressor='gpt5' is not a model config: .*tiny_llama_gqa"
    with pytest.raises(MethodConfigError, match=match):
        api_build("method", "selfinfo", compressor="gpt5")
    composed = Compose(methods=[build("streamingllm"), build("selfinfo", compressor="gpt5")])
    with pytest.raises(MethodConfigError, match=match), open_session(composed, *tiny):
        pass


def test_chunks_end_after_a_newline_or_full_stop():
    marks = [False] * 30
    marks[6] = marks[17] = True
    assert chunk_spans(marks, 10) == [(0, 7), (7, 17), (17, 27), (27, 30)]
    assert chunk_spans([False] * 25, 10) == [(0, 10), (10, 20), (20, 25)]


@pytest.mark.parametrize(
    "name, overrides, match",
    [
        ("dac", {"ratio": 0.0}, r"method\.ratio=0\.0 is outside \(0, 1\]"),
        ("dac", {"ratio": -0.1}, r"method\.ratio=-0\.1"),
        ("dac", {"iterations": 0}, r"method\.iterations=0: T must be >= 1"),
        ("dac", {"alpha": 1.5}, r"method\.alpha=1\.5 is outside \[0, 1\]"),
        ("dac", {"chunk_size": 4}, r"method\.chunk_size=4 is too small"),
        ("dac", {"schedule": "linear"}, r"method\.schedule='linear' is unknown"),
        ("random_deletion", {"ratio": 2}, r"method\.ratio=2"),
        ("llmlingua", {"iterative_size": 1}, r"method\.iterative_size=1"),
        ("llmlingua", {"context_budget": -5}, r"method\.context_budget=-5"),
    ],
)
def test_bad_configs_fail_before_anything_loads(name, overrides, match):
    with pytest.raises(InstantiationException, match=match) as err:
        build(name, **overrides)
    assert isinstance(err.value.__cause__, MethodConfigError)


def test_a_compressor_without_attention_fails_in_prepare_and_compress_needs_prepare(tiny):
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=260)).eval()
    with pytest.raises(MethodConfigError, match=r"self_attn"):
        DAC(ratio=0.5).prepare(gpt2, tiny[1])
    selfinfo = build("selfinfo")  # self-information needs no attention: works on GPT-2
    selfinfo.prepare(gpt2, tiny[1])
    assert selfinfo.shorten_text(PromptParts(TEXT, QUESTION)).endswith(QUESTION)
    with pytest.raises(RuntimeError, match=r"call prepare"):
        DAC().shorten_text(PromptParts(TEXT, QUESTION))


def test_the_adapter_records_requested_and_achieved_rates(tiny, rendered):
    from tests.test_tasks import spec

    model, tokenizer = tiny
    method = build("random_deletion", ratio=0.7)
    composed = Compose(methods=[method, build("streamingllm")])
    assert [m.kind for m in composed.flatten()] == ["prompt", "cache"]
    split = spec("gsm8k").split_prompt
    prompt, question = rendered["gsm8k"]
    with open_session(method, model, tokenizer, max_length=4096) as session:
        text, seconds, fields = session.shorten_prompt(split(prompt))
        blank = session.shorten_prompt(split("   "))
    assert text.endswith(question) and seconds > 0
    assert fields["prompt_rate_requested"] == pytest.approx(0.3)
    assert abs(fields["prompt_rate_achieved"] - 0.3) <= 0.02  # byte tokenizer: same tokens
    assert fields["compressible_tokens"] < fields["compressible_tokens_original"]
    assert blank == ("   ", 0.0, {})
    summary = aggregate([fields, {}])  # a request without prompt methods has no such fields
    assert summary["prompt_rate_requested"]["n"] == 1
    assert summary["compressible_ratio"] == pytest.approx(1 - fields["prompt_rate_achieved"])


def test_a_prompt_too_long_for_the_window_is_truncated_before_it_is_compressed(tiny):
    """The methods shorten what the model would see: with middle truncation (LongBench) the
    rate applies to the tokens left after the cut, and the final question survives."""
    from tests.test_tasks import spec

    model, tokenizer = tiny
    method = build("random_deletion", ratio=0.5)
    with open_session(method, model, tokenizer, max_length=304) as session:
        lm = KVBenchLM(
            session, split_prompt=spec("gsm8k").split_prompt, truncation="middle", max_gen_toks=4
        )
        lm._generate_one(None, TEXT * 3 + QUESTION, {"until": ["\n\n"]}, "</s>")
    [row] = lm.measurement_rows()
    whole = len(TEXT * 3 + QUESTION)  # byte tokenizer: one token per byte
    assert row["prompt_tokens_original"] == whole  # before any cut
    assert row["truncated_tokens"] == whole - 300  # the window: 304 - 4 generated
    assert row["compressible_tokens_original"] == 300 - len(QUESTION)
    assert row["prompt_tokens"] == 300 - round(0.5 * (300 - len(QUESTION)))
    assert method.last_stats()["compressor_tokens"] == 300 - len(QUESTION)
