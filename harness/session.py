"""The one way to run a model under KV-reduction methods and measure every request.

::

    from harness.session import open_session

    with open_session(method, model, tokenizer) as session:
        out = session.generate("Some long document ... Question: ...", max_new_tokens=32)
        print(out.text, out.measurement.kv_bytes_prefill / out.measurement.kv_full_bytes_prefill)
        logprob, is_greedy = session.loglikelihood("The capital of France is", " Paris")

:func:`open_session` enters the method (model methods change the model, prompt methods are
prepared, cache hooks stay until the block ends) and yields a :class:`Session`, which owns the
request path every front door shares: fit the prompt into the window, let prompt methods shorten
it, prefill and decode greedily (:mod:`harness.generation`), and measure what the request cost
(:class:`RequestMeasurement`). Batch size is 1: every request gets its own KV cache, so its
measurements are its own and cache methods may give each request its own budget.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, replace
from typing import Any

import torch
from torch import nn

from harness import session_checks as checks
from harness.compressors import hand_over_compressors
from harness.decode_graph import DecodeGraphs, decode_steps
from harness.generation import Chunking, Generated, greedy_generate, score_continuation
from harness.measure import (
    ForwardCost,
    KVLayout,
    PeakMemory,
    RequestMeasurement,
    floor_bytes,
    synchronized_clock,
)
from harness.prompt_fit import PromptFit, keep_protected, prompt_fields, truncate
from harness.taskconfig import TRUNCATIONS
from methods.base import Method, PromptParts


class Session:
    """A model with a method applied: generates, scores and measures one request at a time.
    Built by :func:`open_session`; ``model`` is the model the method returned (a model method's
    reduced model), ``kv_layout`` the full cache of the model *before* any model method (the
    denominator of every KV ratio), ``measurements`` one :class:`RequestMeasurement` per
    request, in order; ``chunking``, ``graphs``: how prefills and decoding steps run.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        method: Method,
        *,
        kv_layout: KVLayout,
        max_length: int,
        add_bos_token: bool | None = None,
        chunking: Chunking | None = None,
        graphs: DecodeGraphs | None = None,
    ) -> None:
        self.model = model
        self.chunking = chunking
        self.graphs = graphs
        self.tokenizer = tokenizer
        self.method = method
        self.kv_layout = kv_layout
        self.max_length = max_length
        self.add_bos_token = add_bos_token
        self.device = next(model.parameters()).device
        self.is_open = True  # False once the open_session block ends: requests are then refused
        self.vocab_size = checks.vocab_size(model)
        self.peak_memory = PeakMemory.of_model(model)
        self.measurements: list[RequestMeasurement] = []
        self.compresses_prompts = "prompt" in method.kinds()
        # cache methods score token by token (as they decode); the untouched model in one pass
        self.stepwise_scoring = bool(method.kinds() & {"cache"})
        eos = getattr(model.generation_config, "eos_token_id", None)
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos_token_ids = [eos] if isinstance(eos, int) else list(eos)
        bos = tokenizer.bos_token_id  # lm-eval's prefix token: an empty context's stand-in
        self.prefix_token_id = bos if bos is not None else tokenizer.eos_token_id

    # --- tokenisation (as lm-eval's hf backend) ------------------------------------------
    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        kwargs = {}
        if add_special_tokens is not None:
            kwargs["add_special_tokens"] = add_special_tokens
        elif self.add_bos_token is not None:
            kwargs["add_special_tokens"] = self.add_bos_token
        bos = self.tokenizer.bos_token
        if add_special_tokens is None and bos is not None and text.startswith(bos):
            kwargs["add_special_tokens"] = False
        return self.tokenizer.encode(text, **kwargs)

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    # --- prompts -------------------------------------------------------------------------
    def shorten_prompt(self, prompt: PromptParts) -> tuple[str, float, dict[str, Any]]:
        """(text, seconds, prompt fields of :class:`RequestMeasurement`) of ``prompt`` after
        the prompt methods; unchanged (and no fields) without one or for an empty prompt."""
        if not self.compresses_prompts or not prompt.text.strip():
            return prompt.text, 0.0, {}
        start = synchronized_clock(self.device)
        parts = self.method.shorten(prompt)
        seconds = synchronized_clock(self.device) - start
        before = len(self.encode(prompt.compressible, add_special_tokens=False))
        after = len(self.encode(parts.compressible, add_special_tokens=False))
        return parts.text, seconds, prompt_fields(before, after, self.method.prompt_stats())

    def fit(
        self,
        prompt: str | PromptParts,
        *,
        max_context: int,
        truncation: str = "left",
        split: Callable[[str], PromptParts] | None = None,
    ) -> PromptFit:
        """The token ids the model sees for ``prompt``: cut to ``max_context`` tokens (a
        prompt too long for the window is truncated first, so prompt methods' rates are of
        the tokens sent), shortened by the prompt methods, then cut again if needed. Both
        cuts count as ``truncated_tokens``; ``original_tokens`` is the prompt before either.

        ``split`` tells prompt methods what they may shorten (the task's ``split_prompt``);
        a :class:`PromptParts` prompt carries its own split; a plain text without ``split``
        is compressible as a whole.
        """
        if truncation not in TRUNCATIONS:
            raise ValueError(f"truncation={truncation!r}: use one of {TRUNCATIONS}")
        if isinstance(prompt, PromptParts):
            split, prompt = keep_protected(prompt), prompt.text
        split = split or (lambda text: PromptParts(text, ""))
        full_ids = self.encode(prompt)
        window_ids = truncate(full_ids, max_context, truncation)
        seen = prompt if len(window_ids) == len(full_ids) else self.decode(window_ids)
        text, seconds, fields = self.shorten_prompt(split(seen))
        encoded = self.encode(text) if text != seen else window_ids
        ids = truncate(encoded, max_context, truncation)
        cut = len(full_ids) - len(window_ids) + len(encoded) - len(ids)
        return PromptFit(ids, len(full_ids), cut, seconds, fields, len(window_ids))

    # --- requests ------------------------------------------------------------------------
    def generate(
        self,
        prompt: str | PromptParts | Sequence[int],
        *,
        max_new_tokens: int = 256,
        stop: Sequence[str] = (),
        truncation: str = "left",
        split: Callable[[str], PromptParts] | None = None,
        should_stop: Callable[[list[int]], bool] | None = None,
        tag: dict[str, Any] | None = None,
        reference: str | None = None,
        reference_tokens: int = 64,
    ) -> Generated:
        """Greedy generation of up to ``max_new_tokens`` tokens after ``prompt`` (text, a
        :class:`PromptParts` whose ``protected`` end prompt methods keep verbatim, or token
        ids sent as they are). Stops at EOS, at any of ``stop`` in the decoded text, or when
        ``should_stop(tokens)``. ``split``: see :meth:`fit`. ``tag`` (e.g. task and doc_id)
        labels the measurement. ``reference``: an answer whose NLL after the prompt (its first
        ``reference_tokens`` tokens) the measurement records (:meth:`reference_nll`)."""
        checks.check_open(self.is_open, self.method, "generate")
        checks.check_max_new_tokens(max_new_tokens)
        checks.check_generate_options(stop, truncation, tag, split=split, should_stop=should_stop)
        ids = checks.prompt_ids(prompt, self.vocab_size)
        max_context = self.max_length - max_new_tokens
        if max_context <= 0:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} leaves no room for the prompt in "
                f"max_length={self.max_length}: raise model.max_length or lower the tokens "
                "generated (run.max_gen_toks)"
            )
        if ids is None:
            fit = self.fit(prompt, max_context=max_context, truncation=truncation, split=split)
        else:
            kept = truncate(ids, max_context, truncation)
            fit = PromptFit(kept, len(ids), len(ids) - len(kept), 0.0)
        stops = [s for s in stop if s]

        def stopped(tokens: list[int]) -> bool:
            if should_stop is not None and should_stop(tokens):
                return True
            return bool(stops) and any(s in self.decode(tokens) for s in stops)

        self.peak_memory.reset()
        gen = greedy_generate(
            self.model,
            torch.tensor([fit.ids], device=self.device),
            max_new_tokens=max_new_tokens,
            eos_token_ids=self.eos_token_ids,
            should_stop=stopped if (stops or should_stop) else None,
            chunking=self.chunking,
            graphs=self.graphs,
        )
        # the reference answer is scored after the measurement read the peak memory and the
        # method's stats, so it changes neither
        measurement = self._measure(tag, "generate_until", gen, fit, fit.window_tokens)
        measurement = replace(
            measurement, **self.reference_nll(reference, fit.ids, reference_tokens)
        )
        self.measurements.append(measurement)
        return Generated(self.decode(gen.tokens), fit.ids, gen, measurement)

    def reference_nll(
        self, answer: str | None, ids: list[int], max_tokens: int = 64
    ) -> dict[str, Any]:
        """``reference_nll`` (mean nats per token) and ``reference_tokens`` of ``answer``'s
        first ``max_tokens`` tokens after the prompt ``ids`` as the model saw it, teacher-forced
        in a pass of its own (a second prefill, not measured); {} without an answer."""
        if answer is None:
            return {}
        prompt = self.decode(ids[-8:])
        text = answer.strip() if prompt[-1:].isspace() else " " + answer.strip()
        answer_ids = self.encode(text, add_special_tokens=False)[:max_tokens]
        if not answer_ids:
            return {}
        context = ids[-(self.max_length - len(answer_ids)) :]
        logprob, _ = self.logprob(context, answer_ids, measure=False)
        return {"reference_nll": -logprob / len(answer_ids), "reference_tokens": len(answer_ids)}

    def logprob(
        self,
        context_ids: Sequence[int],
        continuation_ids: Sequence[int],
        *,
        tag: dict[str, Any] | None = None,
        measure: bool = True,
        prompt_method_s: float = 0.0,
        prompt_fields: dict[str, Any] | None = None,
        original_tokens: int | None = None,
    ) -> tuple[float, bool]:
        """(sum of log p(continuation | context), whether greedy decoding produces it), with
        the context cut on the left to fit the window. ``measure=False`` scores without
        recording a measurement (e.g. a reference answer scored after a generation).
        ``original_tokens``: the context's length before prompt methods shortened it into
        ``context_ids`` (default: ``len(context_ids)``, no prompt method)."""
        checks.check_open(self.is_open, self.method, "logprob")
        checks.check_ids(
            "logprob", self.vocab_size, context_ids=context_ids, continuation_ids=continuation_ids
        )
        continuation = list(continuation_ids)
        room = max(self.max_length + 1 - len(continuation), 0)  # context tokens that fit
        whole = (list(context_ids) + continuation)[-(self.max_length + 1) :]
        context = whole[: len(whole) - len(continuation)]
        original = len(context_ids) if original_tokens is None else original_tokens
        self.peak_memory.reset()
        scored = score_continuation(
            self.model,
            context,
            continuation,
            stepwise=self.stepwise_scoring,
            chunking=self.chunking,
            graphs=self.graphs,
        )
        if measure:
            cut = len(context_ids) - len(context)
            # the full cache's window: the context before prompt methods, cut to fit
            fit = PromptFit(context, original, cut, prompt_method_s, prompt_fields or {})
            fit.window_tokens = min(original, room)
            self.measurements.append(
                self._measure(tag, "loglikelihood", scored, fit, floor_tokens=len(context))
            )
        return scored.logprob, scored.is_greedy

    def loglikelihood(
        self,
        context: str,
        continuation: str,
        *,
        split: Callable[[str], PromptParts] | None = None,
        tag: dict[str, Any] | None = None,
    ) -> tuple[float, bool]:
        """log p(continuation | context) of two texts. The prompt methods shorten the context
        first (``split``: what they may shorten, as in :meth:`fit`; default all of it), then
        the pair is tokenised as lm-eval's ``TemplateLM.loglikelihood`` does
        (:meth:`encode_pair`)."""
        checks.check_open(self.is_open, self.method, "loglikelihood")
        checks.check_texts("loglikelihood", continuation=continuation)
        if not isinstance(context, str):
            checks.check_texts("loglikelihood", context=context)
        split = split or (lambda text: PromptParts(text, ""))
        text, seconds, fields = self.shorten_prompt(split(context))
        original = None  # no prompt method changed the context
        if text != context:
            original = len(self.encode_pair(context, continuation)[0])
        return self.logprob(
            *self.encode_pair(text, continuation),
            tag=tag,
            prompt_method_s=seconds,
            prompt_fields=fields,
            original_tokens=original,
        )

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) as lm-eval's ``TemplateLM`` makes them: the
        context's trailing spaces move to the continuation and the pair is encoded whole,
        then split at the context's length; an empty context is the prefix token (BOS, or
        EOS without one)."""
        if context == "":
            ids = self.encode(continuation, add_special_tokens=False)
            prefix = [self.prefix_token_id] if self.prefix_token_id != ids[0] else []
            return (prefix, ids) if prefix else (ids[:1], ids[1:])
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        context_ids = self.encode(context)
        return context_ids, self.encode(context + continuation)[len(context_ids) :]

    def _measure(
        self,
        tag: dict[str, Any] | None,
        request_type: str,
        cost: ForwardCost,
        fit: PromptFit,
        floor_tokens: int,
    ) -> RequestMeasurement:
        """The measurement of one request: ``cost`` of its forward passes, ``fit`` of its
        prompt (the full cache's reference is of ``fit.window_tokens``), the peak memory
        since the last reset and the method's stats on it."""
        tag = tag or {}
        allocated = max(cost.kv_allocated_bytes_prefill, cost.kv_allocated_bytes_final)
        return RequestMeasurement(
            task=str(tag.get("task") or ""),
            doc_id=int(tag.get("doc_id", -1)),
            request_type=request_type,
            prompt_tokens_original=fit.original_tokens,
            prompt_tokens=len(fit.ids),
            truncated_tokens=fit.truncated_tokens,
            prompt_method_s=fit.prompt_method_s,
            kv_full_bytes_prefill=self.kv_layout.full_bytes(fit.window_tokens),
            kv_full_bytes_final=self.kv_layout.full_bytes(fit.window_tokens + cost.decode_steps),
            kv_floor_bytes_prefill=floor_bytes(self.kv_layout, self.method, floor_tokens),
            method_stats=self.method.last_stats(),
            **cost.cost_fields(),
            **self.peak_memory.read(allocated),
            **fit.fields,
        )

    def measurement_rows(self) -> list[dict[str, Any]]:
        return [asdict(m) for m in self.measurements]


@contextmanager
def open_session(
    method: Method,
    model: nn.Module,
    tokenizer: Any,
    *,
    max_length: int | None = None,
    add_bos_token: bool | None = None,
    check_runtime: bool = True,
    prefill_chunk: int | None = None,
    decode_capture: str | DecodeGraphs | None = None,
) -> Iterator[Session]:
    """``with open_session(method, model, tokenizer) as session:`` run ``model`` under ``method``.

    ``max_length``: the window (default: the model's ``max_position_embeddings``). The full-cache
    reference is taken from ``model`` before the method acts on it; prompt methods get their
    named compressors on its device (:mod:`harness.compressors`). Cache hooks go when the block
    ends, even on error; model methods change the model in place (compare with a fresh one).
    Requests are refused after the block; a model in a block cannot be applied again
    (:mod:`harness.session_checks`). ``check_runtime=False``: the caller validated the runtime
    (:func:`harness.job.load_session`). ``prefill_chunk``: prefill in chunks of that many tokens
    (None: one pass); cache methods keep what they keep in one pass. ``decode_capture``:
    :func:`harness.decode_graph.decode_steps` (default: eager decoding).
    """
    checks.check_apply_args(method, model, tokenizer, max_length)
    checks.check_prefill_chunk(method, prefill_chunk)
    config = model.config.get_text_config()
    weights = next(model.parameters())
    if check_runtime:
        method.validate_runtime(
            weights.device, weights.dtype, getattr(model.config, "_attn_implementation", None) or ""
        )
    kv_layout = KVLayout.from_config(config, weights.dtype)
    window = max_length or getattr(config, "max_position_embeddings", None) or 2048
    hand_over_compressors(method, model)
    with decode_steps(decode_capture) as graphs, method.applied(model, tokenizer) as applied_model:
        session = Session(
            applied_model,
            tokenizer,
            method,
            kv_layout=kv_layout,
            max_length=window,
            add_bos_token=add_bos_token,
            chunking=Chunking.of(prefill_chunk, method, config),
            graphs=graphs,
        )
        checks.enter_block(method, model, applied_model)
        try:
            yield session
        finally:
            session.is_open = False
            checks.leave_block(model, applied_model)
