"""The generation loop kvbench owns: prefill (cache methods applied to the model shrink the
cache through their hooks), then greedy decoding with explicit positions that continue from
the true sequence length.

Batch size is 1: every request gets its own cache, so per-request measurements (KV bytes,
peak memory, prefill and decode time) are exact and methods may give each request a
different budget. Methods are applied around these functions by :func:`harness.session.open_session`.
The cache appends in place into room for the tokens still to come, and a decoding step's
attention packs the query heads of a KV group (:mod:`harness.kvcache`): a step neither copies
the cache nor pays torch's slow single-query GQA kernel.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from harness.decode_graph import CapturedStep, DecodeGraphs
from harness.kvcache import decode_attention, new_cache
from harness.measure import (
    ForwardCost,
    RequestMeasurement,
    allocated_kv_bytes,
    stored_kv_bytes,
    synchronized_clock,
)
from methods.base import CacheMethod, Method, cache_kwarg
from methods.cache.layers import prefill_chunk

MIN_PREFILL_CHUNK = 16  # tokens: smaller chunks only add forward passes


@dataclass(kw_only=True)
class Generation(ForwardCost):
    """One greedy generation: the new tokens and what producing them cost."""

    tokens: list[int]
    prompt_tokens: int
    cached_tokens_final: int
    last_logits: torch.Tensor  # (vocab,) the logits the last token was chosen from


def _position(value: int, device: torch.device) -> torch.Tensor:
    return torch.tensor([[value]], device=device)


@dataclass(frozen=True)
class Chunking:
    """A prefill in forward passes of ``size`` prompt tokens, the last of which holds at least
    ``tail`` (the queries a cache method scores with: ``CacheMethod.last_chunk_tokens``): a
    shorter remainder joins the chunk before it."""

    size: int
    tail: int = 1

    @classmethod
    def of(cls, size: int | None, method: Method, config: Any) -> Chunking | None:
        """How requests under ``method`` prefill on a model of ``config``: in one pass (None)
        or in chunks of ``size`` tokens, the last holding what every cache method scores with."""
        if size is None:
            return None
        cache = [m for m in method.flatten() if isinstance(m, CacheMethod)]
        return cls(size, max((m.last_chunk_tokens(config) for m in cache), default=1))

    def bounds(self, length: int) -> list[int]:
        """Where each chunk of a ``length``-token prompt starts, then ``length``."""
        last = max(0, length - self.tail) // self.size * self.size
        return [*range(0, last, self.size), last, length] if last else [0, length]


def prefill(
    model: nn.Module,
    input_ids: torch.Tensor,
    cache: Any,
    chunking: Chunking | None = None,
    logits_to_keep: int = 1,
) -> torch.Tensor:
    """Run the prompt ``input_ids`` (1, S) into ``cache`` and return the logits of its last
    ``logits_to_keep`` tokens (1, n, vocab): in one forward pass, or in ``chunking``'s chunks
    at their true positions, each inside :func:`~methods.cache.layers.prefill_chunk` (cache
    methods compress at the last, keeping what one pass keeps)."""
    length = input_ids.shape[1]
    bounds = chunking.bounds(length) if chunking is not None else [0, length]
    if len(bounds) == 2:
        return model(
            input_ids=input_ids,
            **cache_kwarg(model, cache),
            use_cache=True,
            logits_to_keep=logits_to_keep,
        ).logits
    logits = []
    for start, end in itertools.pairwise(bounds):
        keep = min(end - start, end - (length - logits_to_keep))  # of the last logits_to_keep
        positions = torch.arange(start, end, device=input_ids.device).unsqueeze(0)
        with prefill_chunk(start, last=end == length):
            out = model(
                input_ids=input_ids[:, start:end],
                position_ids=positions,
                **cache_kwarg(model, cache),
                use_cache=True,
                logits_to_keep=max(keep, 1),
            ).logits
        if keep > 0:
            logits.append(out[:, -keep:])
    return torch.cat(logits, dim=1)


def _with_decode_attention(fn: Callable) -> Callable:
    """Run ``fn(model, ...)`` with :func:`harness.kvcache.decode_attention` on ``model``."""

    @functools.wraps(fn)
    def wrapper(model: nn.Module, *args, **kwargs):
        with decode_attention(model):
            return fn(model, *args, **kwargs)

    return wrapper


@torch.inference_mode()
@_with_decode_attention
def greedy_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_ids: Sequence[int] = (),
    should_stop: Callable[[list[int]], bool] | None = None,
    chunking: Chunking | None = None,
    graphs: DecodeGraphs | None = None,
) -> Generation:
    """Greedy decoding of ``input_ids`` (1, S) with up to ``max_new_tokens`` new tokens.

    Stops at an EOS id (kept in ``tokens``, like ``model.generate``) or when
    ``should_stop(tokens)`` is true. Decoding step t feeds position S + t - 1, whatever
    the cache holds after eviction. ``chunking``: the prefill in chunks (:func:`prefill`).
    ``graphs``: the decoding steps run captured (:mod:`harness.decode_graph`; the same
    tokens and measurements), else eagerly.
    """
    device = input_ids.device
    prompt_len = input_ids.shape[1]
    reserve = max(max_new_tokens - 1, 0)
    # room for every decoding step (and for a chunked prefill's whole prompt from its start)
    chunked_prompt = prompt_len if chunking is not None else 0
    buffers = graphs.buffers_for(prompt_len, reserve) if graphs is not None else None
    cache = new_cache(model, reserve=reserve, prompt=chunked_prompt, buffers=buffers)
    eos = set(eos_token_ids)
    start = synchronized_clock(device)
    with record_function("prefill"):  # named ranges for bench/profile_generate.py
        logits = prefill(model, input_ids, cache, chunking)
    prefill_end = synchronized_clock(device)
    kv_prefill, allocated_prefill = stored_kv_bytes(cache), allocated_kv_bytes(cache)
    tokens: list[int] = []
    token = int(logits[0, -1].argmax())
    last_logits = logits[0, -1]
    captured: CapturedStep | None = None
    seen, capture_s = 0, 0.0
    while True:
        tokens.append(token)
        if token in eos or len(tokens) >= max_new_tokens:
            break
        if should_stop is not None and should_stop(tokens):
            break
        position = prompt_len + len(tokens) - 1
        with record_function("decode"):
            if graphs is not None:
                if captured is None:  # the prefilled cache moves into the captured step's
                    captured, seen, capture_s = _start(
                        graphs, model, cache, token, position, reserve
                    )
                captured.replay()
                token, last_logits = int(captured.token), captured.logits
            else:
                last_logits = model(
                    input_ids=torch.tensor([[token]], device=device),
                    position_ids=_position(position, device),
                    **cache_kwarg(model, cache),
                    use_cache=True,
                ).logits[0, -1]
                token = int(last_logits.argmax())
    end = synchronized_clock(device)
    steps = len(tokens) - 1
    return Generation(
        tokens=tokens,
        prompt_tokens=prompt_len,
        prefill_s=prefill_end - start,
        decode_s=end - prefill_end - capture_s,
        decode_steps=steps,
        generated_tokens=len(tokens),
        kv_bytes_prefill=kv_prefill,
        last_logits=last_logits.float().clone(),
        kv_allocated_bytes_prefill=allocated_prefill,
        capture_s=capture_s,
        **_final_cache(cache, captured, seen, steps),
    )


def _start(
    graphs: DecodeGraphs, model: nn.Module, cache: Any, token: int, position: int, reserve: int
) -> tuple[CapturedStep, int, float]:
    """:meth:`DecodeGraphs.start` and the seconds it spent capturing a new shape's step
    (0.0 when a captured step was reused): (captured step, tokens it holds, capture_s)."""
    device = next(model.parameters()).device
    captures, begin = graphs.captures, synchronized_clock(device)
    captured, seen = graphs.start(model, cache, token, position, reserve)
    captured_s = synchronized_clock(device) - begin if graphs.captures > captures else 0.0
    return captured, seen, captured_s


def _final_cache(
    cache: Any, captured: CapturedStep | None, seen: int, steps: int
) -> dict[str, int]:
    """What the cache holds after ``steps`` decoding steps: the dynamic ``cache``'s, or (it
    moved there) the captured step's, which holds what the dynamic cache would."""
    if captured is None:
        return {
            "kv_bytes_final": stored_kv_bytes(cache),
            "kv_allocated_bytes_final": allocated_kv_bytes(cache),
            "cached_tokens_final": cache.get_seq_length(),
        }
    return {
        "kv_bytes_final": captured.cache.stored_nbytes_after(steps),
        "kv_allocated_bytes_final": captured.cache.allocated_nbytes(),
        "cached_tokens_final": seen + steps,
    }


@dataclass(kw_only=True)
class Scored(ForwardCost):
    """Log-likelihood of a continuation, whether greedy decoding would produce it, and what
    scoring it cost (recorded as a prefill: the cache after the last continuation token)."""

    logprob: float
    is_greedy: bool


@torch.inference_mode()
@_with_decode_attention
def score_continuation(
    model: nn.Module,
    context_ids: list[int],
    continuation_ids: list[int],
    *,
    stepwise: bool = False,
    chunking: Chunking | None = None,
    graphs: DecodeGraphs | None = None,
) -> Scored:
    """Sum of log p(continuation | context) under the model.

    By default the whole sequence goes through one forward pass (as lm-eval's ``hf``
    backend does). ``stepwise`` (with cache methods applied) prefills the context (which the
    methods compress), then feeds the continuation one token at a time at its true
    positions, so every layer sees exactly the keys the method kept. ``chunking``: the
    prefill (the context, or the whole sequence) in chunks (:func:`prefill`). ``graphs``:
    the stepwise continuation runs in captured decoding steps (:mod:`harness.decode_graph`).
    """
    device = next(model.parameters()).device
    ids = context_ids if stepwise else context_ids + continuation_ids[:-1]
    prompt = len(ids) if chunking is not None else 0
    reserve = max(len(continuation_ids) - 1, 0) if stepwise else 0
    buffers = graphs.buffers_for(len(ids), reserve) if graphs is not None and stepwise else None
    cache = new_cache(model, reserve=reserve, prompt=prompt, buffers=buffers)
    cont = torch.tensor(continuation_ids, device=device)
    ids = torch.tensor([ids], device=device)
    start = synchronized_clock(device)
    captured: CapturedStep | None = None
    capture_s = 0.0
    if not stepwise:
        logits = prefill(model, ids, cache, chunking, logits_to_keep=len(continuation_ids))[0]
        prefill_end = synchronized_clock(device)
    else:
        steps = [prefill(model, ids, cache, chunking)[0, -1].float()]
        prefill_end = synchronized_clock(device)
        for offset, token in enumerate(continuation_ids[:-1]):
            position = len(context_ids) + offset
            if graphs is not None:  # the step feeds the continuation's token, not its argmax
                if captured is None:
                    captured, _, capture_s = _start(graphs, model, cache, token, position, reserve)
                captured.token.fill_(token)
                captured.replay()
                steps.append(captured.logits.clone())
                continue
            out = model(
                input_ids=torch.tensor([[token]], device=device),
                position_ids=_position(position, device),
                **cache_kwarg(model, cache),
                use_cache=True,
            )
            steps.append(out.logits[0, -1].float())
        logits = torch.stack(steps)
    logprobs = F.log_softmax(logits.float(), dim=-1)
    final = _final_cache(cache, captured, 0, len(continuation_ids) - 1)
    kv_bytes, allocated = final["kv_bytes_final"], final["kv_allocated_bytes_final"]
    return Scored(
        logprob=float(logprobs.gather(1, cont.unsqueeze(1)).sum()),
        is_greedy=bool((logprobs.argmax(-1) == cont).all()),
        prefill_s=prefill_end - start,
        kv_bytes_prefill=kv_bytes,
        kv_bytes_final=kv_bytes,
        kv_allocated_bytes_prefill=allocated,
        kv_allocated_bytes_final=allocated,
        capture_s=capture_s,
    )


@dataclass
class Generated:
    """One generation request: the text (decoded new tokens), the prompt ids the model saw,
    the raw generation and its measurement."""

    text: str
    prompt_ids: list[int]
    generation: Generation
    measurement: RequestMeasurement
