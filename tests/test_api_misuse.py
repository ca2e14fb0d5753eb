"""The Python API refuses misuse with one clear line (it used to run with the wrong method, or
fail with a raw AttributeError / TypeError / IndexError from deep inside)."""

from __future__ import annotations

import re

import pytest
import torch

from harness.api import build, compose_config, evaluate, load_model
from harness.models import ModelSpec
from harness.session import open_session
from harness.session_checks import NestedApplyError, SessionClosedError
from methods.base import MethodConfigError, PromptParts

IDS = list(range(5, 45))


@pytest.fixture
def streaming():
    return build("method", "streamingllm", ratio=0.25)


def test_a_session_after_its_block_is_refused(tiny_gqa, streaming):
    """It used to run with the full cache (ratio 1.0) and append that measurement."""
    model, tokenizer = tiny_gqa
    with open_session(streaming, model, tokenizer) as session:
        session.generate(IDS, max_new_tokens=2)
    for call in (
        lambda: session.generate(IDS, max_new_tokens=2),
        lambda: session.loglikelihood("a b c", " d"),
        lambda: session.logprob(IDS, [7]),
    ):
        with pytest.raises(SessionClosedError, match="block has ended.*streamingllm"):
            call()
    assert len(session.measurements) == 1


def test_a_nested_apply_on_the_same_model_is_refused(tiny_gqa, streaming):
    """The inner method used to be ignored, its session recording the outer's ratio."""
    model, tokenizer = tiny_gqa
    with open_session(streaming, model, tokenizer) as outer:
        with pytest.raises(NestedApplyError, match="already inside.*streamingllm"):
            with open_session(build("method", "snapkv", ratio=0.5), model, tokenizer):
                pass
        with pytest.raises(NestedApplyError):
            with open_session(build("method", "full"), outer.model, tokenizer):
                pass
        outer.generate(IDS, max_new_tokens=1)  # the outer block still works
    with open_session(build("method", "full"), model, tokenizer) as after:  # and after it, anew
        after.generate(IDS, max_new_tokens=1)


@pytest.mark.parametrize(
    ("args", "error", "names"),
    [
        ("swapped", TypeError, "swapped"),
        ("method_none", TypeError, "method must be a kvbench method"),
        ("method_str", TypeError, "method must be a kvbench method"),
        ("model_none", TypeError, "model must be a transformers model"),
        ("tokenizer_none", TypeError, "tokenizer must be"),
    ],
)
def test_apply_refuses_swapped_or_missing_arguments(tiny_gqa, streaming, args, error, names):
    model, tokenizer = tiny_gqa
    call = {
        "swapped": (model, streaming, tokenizer),
        "method_none": (None, model, tokenizer),
        "method_str": ("snapkv", model, tokenizer),
        "model_none": (streaming, None, tokenizer),
        "tokenizer_none": (streaming, model, None),
    }[args]
    with pytest.raises(error, match=names):
        with open_session(*call):
            pass


@pytest.mark.parametrize(
    ("prompt", "error", "names"),
    [
        (123, TypeError, "prompt must be text"),
        (None, TypeError, "prompt must be text"),
        ("", ValueError, "prompt is empty"),
        (PromptParts("", ""), ValueError, "prompt is empty"),
        ([], ValueError, "empty list"),
        ([1, 2, 10**9], ValueError, r"prompt\[2\]=1000000000 is not in the model's vocabulary"),
        ([1, -3], ValueError, r"prompt\[1\]=-3"),
        ([1, 2.5], TypeError, r"prompt\[1\]=2.5 is not a token id"),
        ([1, True], TypeError, r"prompt\[1\]=True"),
        (b"bytes", TypeError, "prompt must be text"),
        ({"text": "hi"}, TypeError, "prompt must be text"),
        (torch.tensor([1.0, 2.0]), TypeError, "prompt must be text"),
    ],
)
def test_generate_refuses_prompts_that_are_not_text_parts_or_ids(tiny_gqa, prompt, error, names):
    model, tokenizer = tiny_gqa
    with open_session(build("method", "full"), model, tokenizer) as session:
        with pytest.raises(error, match=names):
            session.generate(prompt, max_new_tokens=2)
        assert session.measurements == []


@pytest.mark.parametrize("value", ["5", 1.5, 0, -1, True, None])
def test_generate_refuses_max_new_tokens_that_is_not_a_positive_int(tiny_gqa, value):
    model, tokenizer = tiny_gqa
    with open_session(build("method", "full"), model, tokenizer) as session:
        with pytest.raises(ValueError, match=f"max_new_tokens={value!r} is not a positive"):
            session.generate(IDS, max_new_tokens=value)


def test_token_ids_as_a_tensor_or_tuple_are_accepted(tiny_gqa):
    model, tokenizer = tiny_gqa
    with open_session(build("method", "full"), model, tokenizer) as session:
        a = session.generate(torch.tensor(IDS), max_new_tokens=2)
        b = session.generate(tuple(IDS), max_new_tokens=2)
    assert a.generation.tokens == b.generation.tokens and a.prompt_ids == IDS


def test_logprob_and_loglikelihood_refuse_the_wrong_kinds(tiny_gqa):
    model, tokenizer = tiny_gqa
    with open_session(build("method", "full"), model, tokenizer) as session:
        with pytest.raises(TypeError, match="context must be text"):
            session.loglikelihood(IDS, " x")
        with pytest.raises(TypeError, match="continuation_ids must be token ids, got text"):
            session.logprob(IDS, " x")
        with pytest.raises(ValueError, match="continuation_ids.*vocabulary"):
            session.logprob(IDS, [10**9])


def test_evaluate_overrides_must_be_a_mapping(tmp_path, monkeypatch):
    """A list used to give "AttributeError: 'list' object has no attribute 'items'"."""
    monkeypatch.setattr(ModelSpec, "load", lambda self: pytest.fail("the model was loaded"))
    with pytest.raises(TypeError, match="overrides must be a mapping.*task.limit"):
        evaluate("tiny_llama_gqa", overrides=["task.limit=1"])
    with pytest.raises(TypeError, match="overrides must be a mapping"):
        evaluate("tiny_llama_gqa", overrides="task.limit=1")


@pytest.mark.parametrize("path", ["/x,y", "it's here", "a=b", "[1,2]", "back\\", "${run.seed}x"])
def test_evaluate_override_values_are_python_values_not_command_line_text(tmp_path, path):
    """``run.results_dir="/x,y"`` used to give Hydra's command-line "Ambiguous value"."""
    folder = str(tmp_path / path) if not path.startswith("/") else str(tmp_path) + path
    if path.startswith("$"):
        folder = path  # an interpolation is still one
        expected = "1234x"
    else:
        expected = folder
    cfg = compose_config("tiny_llama_gqa", overrides={"run.results_dir": folder})
    assert cfg.run.results_dir == expected


def test_a_string_number_is_not_coerced(monkeypatch):
    from harness.job import prepare
    from harness.preflight import ConfigError

    cfg = compose_config("tiny_llama_gqa", "streamingllm", overrides={"method.ratio": "0.2"})
    with pytest.raises(ConfigError, match=r"method.ratio='0.2' \(a string\) is not a number"):
        prepare(cfg)


@pytest.mark.parametrize(
    ("call", "names"),
    [
        (lambda: build("methods", "streamingllm"), "'methods' is not a config group"),
        (lambda: build("method", "no_such"), "method='no_such' is not a config: use one of"),
        (lambda: load_model("../config"), "model='../config' is not a config"),
        (lambda: load_model(None), "model=None is not a config"),
        (lambda: evaluate("tiny_llama_gqa", task="nope"), "task='nope' is not a config"),
    ],
)
def test_unknown_group_or_entry_lists_the_options(call, names):
    """``build("methods", ...)`` used to list no options; ``load_model("../config")`` gave
    Hydra's MissingConfigException for model/sweep/none."""
    with pytest.raises(ValueError, match=names) as info:
        call()
    assert "\n" not in str(info.value)
    assert re.search(r"use one of \w+", str(info.value))  # the options, never an empty list


def test_build_unwraps_a_methods_own_error():
    with pytest.raises(MethodConfigError, match="method.ratio=1.5"):
        build("method", "streamingllm", ratio=1.5)


@pytest.mark.parametrize(
    ("options", "error", "names"),
    [
        # a bare string used to stop at any of its characters
        ({"stop": "###"}, TypeError, r"stop='###' is not a list of strings.*stop=\['###'\]"),
        ({"stop": [3]}, TypeError, "3 is not a string"),
        ({"stop": 5}, TypeError, "stop must be a list of strings"),
        # "right" used to cut token ids in the middle
        ({"truncation": "right"}, ValueError, "truncation='right' is not one of left, middle"),
        ({"tag": "doc1"}, TypeError, "tag must be a dict"),
        ({"should_stop": 3}, TypeError, "should_stop must be a function"),
        ({"split": "x"}, TypeError, "split must be a function"),
        ({"max_new_tokens": 10**9}, ValueError, "leaves no room for the prompt"),
    ],
)
def test_generate_refuses_bad_options(tiny_gqa, options, error, names):
    model, tokenizer = tiny_gqa
    with open_session(build("method", "full"), model, tokenizer) as session:
        with pytest.raises(error, match=names):
            session.generate(IDS, **{"max_new_tokens": 2, **options})
        assert session.measurements == []


@pytest.mark.parametrize("max_length", [0, 1, "100", 1.5, True])
def test_apply_refuses_a_window_that_is_not_a_positive_int(tiny_gqa, max_length):
    model, tokenizer = tiny_gqa
    with pytest.raises(ValueError, match=f"max_length={max_length!r} is not a window"):
        with open_session(build("method", "full"), model, tokenizer, max_length=max_length):
            pass


def test_loglikelihood_refuses_an_empty_continuation(tiny_gqa):
    """An empty text used to fail deep in torch's embedding (a float tensor)."""
    model, tokenizer = tiny_gqa
    with open_session(build("method", "full"), model, tokenizer) as session:
        with pytest.raises(ValueError, match="continuation is empty"):
            session.loglikelihood("abc", "")
        with pytest.raises(ValueError, match="context_ids is an empty list"):
            session.logprob([], [5])


def test_an_empty_context_is_the_prefix_token_as_in_lm_eval(tiny_gqa):
    """lm-eval's ``TemplateLM.loglikelihood`` scores an empty context's continuation after
    the prefix token (BOS, else EOS); the session does the same."""
    model, tokenizer = tiny_gqa
    with open_session(build("method", "full"), model, tokenizer) as session:
        continuation = session.encode(" x y", add_special_tokens=False)
        expected = session.logprob([session.prefix_token_id], continuation)
        assert session.loglikelihood("", " x y") == pytest.approx(expected)


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        ({"task.limit ": 1}, "key 'task.limit ' is not a dotted field name"),
        ({"task.lengths": {1, 2}}, r"overrides\['task.lengths'\]=\{1, 2\} is a set"),
        ({"run.results_dir": object()}, "is a object"),
        ({3: 1}, "key 3 is not a dotted field name"),
    ],
)
def test_evaluate_refuses_keys_and_values_the_grammar_cannot_carry(overrides, names):
    """They used to end in Hydra's OverrideParseException (LexerNoViableAltException)."""
    with pytest.raises(TypeError, match=names):
        compose_config("tiny_llama_gqa", overrides=overrides)


def test_build_names_an_unknown_field_with_the_fields():
    """It used to be OmegaConf's "Key 'no_such' is not in struct"."""
    with pytest.raises(
        ValueError, match="method.no_such is not a field of method=streamingllm: use"
    ):
        build("method", "streamingllm", no_such=1)
