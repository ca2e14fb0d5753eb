"""What :func:`harness.session.open_session` and :class:`harness.session.Session` refuse, each in one
line that says what was passed and what to pass instead: swapped or ``None`` arguments, a
model already inside another ``open_session`` block, a session used after its block, prompts that are
neither text, :class:`~methods.base.PromptParts` nor token ids of the model's vocabulary, and a
``max_new_tokens`` that is not a positive integer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from harness.generation import MIN_PREFILL_CHUNK
from methods.base import CacheMethod, Method, MethodConfigError, PromptParts

# id(model) -> the name of the method applied to it, for every model inside an open_session block
_APPLIED: dict[int, str] = {}


class SessionClosedError(RuntimeError):
    """A session used after its ``with open_session(...)`` block ended (its method no longer acts)."""


class NestedApplyError(RuntimeError):
    """``apply`` on a model that is already inside another ``open_session`` block."""


def _what(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def check_apply_args(method: Any, model: Any, tokenizer: Any, max_length: Any = None) -> None:
    """``open_session(method, model, tokenizer)``: each argument of its kind, in that order."""
    if max_length is not None and (
        not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2
    ):
        raise ValueError(
            f"open_session: max_length={max_length!r} is not a window of at least 2 tokens: pass an "
            "integer, or None for the model's own"
        )
    if isinstance(model, Method) and isinstance(method, nn.Module):
        raise TypeError(
            "open_session(method, model, tokenizer): the method and the model are swapped: "
            "call open_session(method, model, tokenizer)"
        )
    if not isinstance(method, Method):
        raise TypeError(
            f"open_session: method must be a kvbench method (e.g. build('method', 'snapkv', "
            f"ratio=0.2), or build('method', 'full') for none), got {_what(method)}"
        )
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(
            f"open_session: model must be a transformers model (load_model(...)[0]), got {_what(model)}"
        )
    if not callable(getattr(tokenizer, "encode", None)) or not callable(
        getattr(tokenizer, "decode", None)
    ):
        raise TypeError(
            f"open_session: tokenizer must be the model's tokenizer (load_model(...)[1]), got "
            f"{_what(tokenizer)}"
        )
    if id(model) in _APPLIED:
        raise NestedApplyError(
            f"open_session({method.name}): this model is already inside another `with open_session(...)` "
            f"block (method {_APPLIED[id(model)]}), whose method would still act: end that "
            "block first (or load a second model)"
        )


def check_prefill_chunk(method: Method, size: Any, field: str = "prefill_chunk") -> None:
    """``size`` (prompt tokens per prefill forward pass; None: one pass) is an integer of at
    least :data:`~harness.generation.MIN_PREFILL_CHUNK`, and every cache method of ``method``
    can prefill in chunks; ``field`` names the setting (``model.prefill_chunk``: the config's)."""
    unset = f"{field}={'null' if field.startswith('model.') else 'None'}"
    if size is None:
        return
    if not isinstance(size, int) or isinstance(size, bool) or size < MIN_PREFILL_CHUNK:
        raise ValueError(
            f"{field}={size!r} is not a chunk of at least {MIN_PREFILL_CHUNK} prompt tokens: "
            f"pass a larger integer, or {unset} (a one-pass prefill)"
        )
    for m in method.flatten():
        if isinstance(m, CacheMethod) and not m.chunked_prefill:
            raise MethodConfigError(
                f"method {m.name} cannot prefill in chunks (it scores the whole prompt at once, "
                f"so chunks would change what it keeps): set {unset}"
            )


def enter_block(method: Method, *models: nn.Module) -> None:
    for model in models:
        _APPLIED[id(model)] = method.name


def leave_block(*models: nn.Module) -> None:
    for model in models:
        _APPLIED.pop(id(model), None)


def check_open(is_open: bool, method: Method, what: str) -> None:
    if not is_open:
        raise SessionClosedError(
            f"session.{what}: the session's `with open_session(...)` block has ended, so "
            f"{method.name} no longer acts on the model (it would measure the full model): "
            "call it inside the block, or open a new one"
        )


def check_max_new_tokens(value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(
            f"max_new_tokens={value!r} is not a positive integer: pass e.g. max_new_tokens=32"
        )


def prompt_ids(prompt: Any, vocab_size: int | None) -> list[int] | None:
    """None for a text prompt (``str`` or :class:`PromptParts`, not empty), else the token
    ids of ``prompt``, checked against the vocabulary."""
    if isinstance(prompt, str | PromptParts):
        text = prompt if isinstance(prompt, str) else prompt.text
        if not text:
            raise ValueError("prompt is empty: pass some text, PromptParts or token ids")
        return None
    if isinstance(prompt, torch.Tensor) and prompt.dim() == 1 and not prompt.is_floating_point():
        prompt = prompt.tolist()
    if not isinstance(prompt, Sequence) or isinstance(prompt, bytes):
        raise TypeError(
            f"prompt must be text, PromptParts or a list of token ids, got {_what(prompt)}"
        )
    ids = list(prompt)
    if not ids:
        raise ValueError("prompt is an empty list of token ids: pass at least one token")
    for i, token in enumerate(ids):
        if not isinstance(token, int) or isinstance(token, bool):
            raise TypeError(f"prompt[{i}]={token!r} is not a token id (an integer)")
        if token < 0 or (vocab_size is not None and token >= vocab_size):
            raise ValueError(
                f"prompt[{i}]={token} is not in the model's vocabulary of {vocab_size} "
                f"tokens (ids 0 to {vocab_size - 1 if vocab_size else '?'}): pass ids from "
                "its tokenizer"
            )
    return ids


def vocab_size(model: nn.Module) -> int | None:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return getattr(embeddings, "num_embeddings", None)


def check_texts(what: str, **texts: Any) -> None:
    for name, value in texts.items():
        if not isinstance(value, str):
            raise TypeError(f"session.{what}: {name} must be text (a str), got {_what(value)}")
        if not value:
            raise ValueError(f"session.{what}: {name} is empty: pass some text")


def check_ids(what: str, vocab: int | None, **sequences: Any) -> None:
    for name, value in sequences.items():
        if isinstance(value, str):
            raise TypeError(
                f"session.{what}: {name} must be token ids, got text: use "
                "session.loglikelihood for text"
            )
        try:
            prompt_ids(value, vocab)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"session.{what}: {exc}".replace("prompt", name)) from None


def check_generate_options(stop: Any, truncation: Any, tag: Any, **functions: Any) -> None:
    """``stop`` a list of strings (a bare string would stop at each of its characters),
    ``truncation`` one of left/middle, ``tag`` a mapping or None, ``functions`` (split,
    should_stop) callables or None."""
    for name, function in functions.items():
        if function is not None and not callable(function):
            raise TypeError(f"{name} must be a function or None, got {_what(function)}")
    if isinstance(stop, str) or not isinstance(stop, Sequence):
        raise TypeError(
            f"stop={stop!r:.60} is not a list of strings: pass e.g. stop=[{stop!r:.40}] "
            "(a bare string would stop at any of its characters)"
            if isinstance(stop, str)
            else f"stop must be a list of strings, got {_what(stop)}"
        )
    bad = [s for s in stop if s is not None and not isinstance(s, str)]
    if bad:
        raise TypeError(f"stop={list(stop)!r:.80}: {bad[0]!r} is not a string")
    from harness.taskconfig import TRUNCATIONS

    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation={truncation!r} is not one of {', '.join(TRUNCATIONS)}")
    if tag is not None and not isinstance(tag, dict):
        raise TypeError(f"tag must be a dict (e.g. {{'task': 't', 'doc_id': 0}}), got {_what(tag)}")
