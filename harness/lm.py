"""The lm-eval LM adapter: lm-eval builds the requests and scores the answers; kvbench owns
the generation loop, applies the methods to every request and measures it.

Batch size is 1 (each request gets its own KV cache and its own measurements). On a CPU
that costs nothing; on a GPU it trades throughput for exact per-request figures.
Tokenisation, stop sequences and post-processing follow lm-eval's ``hf`` backend, so the
adapter changes measurement, not results (``tests/test_lm_adapter.py`` checks this).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from tqdm import tqdm

from harness.generation import greedy_generate, score_continuation
from harness.measure import KVLayout, PeakMemory, synchronized_clock
from harness.taskspec import TRUNCATIONS
from methods.base import CacheMethod, PromptMethod, PromptParts


@dataclass
class RequestMeasurement:
    """What one request cost. Byte counts are of the KV cache; ``kv_full_*`` is what an
    unmodified model's full cache holds for the same (uncompressed) prompt."""

    task: str
    doc_id: int
    request_type: str
    prompt_tokens_original: int
    prompt_tokens: int
    truncated_tokens: int
    prompt_method_s: float
    prefill_s: float
    decode_s: float
    decode_steps: int
    generated_tokens: int
    kv_bytes_prefill: int
    kv_bytes_final: int
    kv_full_bytes_prefill: int
    kv_full_bytes_final: int
    peak_memory_bytes: int
    # with prompt methods only (None otherwise): the compressible part (demonstrations,
    # context) in the target model's tokens before/after them, the rate of it they were
    # asked to remove, the rate removed (in target tokens), the rate removed in the
    # methods' own (compressor) tokens, and the compressor's forward passes
    compressible_tokens_original: int | None = None
    compressible_tokens: int | None = None
    prompt_rate_requested: float | None = None
    prompt_rate_achieved: float | None = None
    compressor_rate_achieved: float | None = None
    compressor_passes: int | None = None
    # with a reference answer only (TaskSpec.reference_field): its mean NLL in nats per
    # token, teacher-forced after the prompt the model saw, under the same cache methods
    reference_nll: float | None = None
    reference_tokens: int | None = None


@dataclass
class _Scoring:
    """What a log-likelihood request carries besides its tokens: the lm-eval ``Instance``
    (for task and doc id) and what prompt methods did to its context."""

    request: Any
    prompt_method_s: float
    prompt_fields: dict[str, Any]


def truncate(ids: list[int], limit: int, how: str) -> list[int]:
    """Fit ``ids`` into ``limit`` tokens: ``left`` drops the start (lm-eval's ``hf``),
    ``middle`` keeps the first and last halves (LongBench's ``pred.py``)."""
    if len(ids) <= limit:
        return ids
    if how == "left":
        return ids[-limit:]
    head = limit // 2
    return ids[:head] + ids[len(ids) - (limit - head) :]


class KVBenchLM(TemplateLM):
    """An lm-eval model that runs ``model`` with the given prompt and cache methods."""

    backend = "causal"

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        max_length: int,
        kv_layout: KVLayout,
        cache_methods: Sequence[CacheMethod] = (),
        prompt_methods: Sequence[PromptMethod] = (),
        split_prompt: Callable[[str], PromptParts] | None = None,
        truncation: str = "left",
        max_gen_toks: int = 256,
        add_bos_token: bool | None = None,
        reference_answer: Callable[[dict[str, Any] | None], str | None] | None = None,
        reference_tokens: int = 64,
    ) -> None:
        super().__init__()
        if truncation not in TRUNCATIONS:
            raise ValueError(f"truncation={truncation!r}: use one of {TRUNCATIONS}")
        self.model = model
        self.tokenizer = tokenizer
        self._max_length = max_length
        self.kv_layout = kv_layout
        self.cache_methods = list(cache_methods)
        self.prompt_methods = list(prompt_methods)
        self.split_prompt = split_prompt or (lambda text: PromptParts(text, ""))
        self.truncation = truncation
        self.max_gen_toks = max_gen_toks
        self.add_bos_token = add_bos_token
        self.reference_answer = reference_answer
        self.reference_tokens = reference_tokens
        self._device = next(model.parameters()).device
        self.peak_memory = PeakMemory(self._device)
        self.measurements: list[RequestMeasurement] = []
        eos = model.generation_config.eos_token_id
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos_token_ids = [eos] if isinstance(eos, int) else list(eos)

    # --- tokenisation, as lm-eval's hf backend does it -----------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "kvbench").replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kw) -> list[int]:
        kwargs = {}
        if add_special_tokens is not None:
            kwargs["add_special_tokens"] = add_special_tokens
        elif self.add_bos_token is not None:
            kwargs["add_special_tokens"] = self.add_bos_token
        bos = self.tokenizer.bos_token
        if add_special_tokens is None and bos is not None and string.startswith(bos):
            kwargs["add_special_tokens"] = False
        return self.tokenizer.encode(string, **kwargs)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    # --- prompt methods ---------------------------------------------------------------------
    def _apply_prompt_methods(self, context: str) -> tuple[str, float, dict[str, Any]]:
        """(text, seconds, prompt fields of :class:`RequestMeasurement`)."""
        if not self.prompt_methods or not context.strip():
            return context, 0.0, {}
        start = synchronized_clock(self.device)
        parts = original = self.split_prompt(context)
        kept_share, done_share, passes = 1.0, 1.0, 0
        for method in self.prompt_methods:
            text = method.compress(parts)
            if not text.endswith(parts.protected):
                raise RuntimeError(
                    f"prompt method {method.name!r} changed the protected end of the prompt"
                )
            parts = PromptParts(text[: len(text) - len(parts.protected)], parts.protected)
            stats = method.last_stats() or {}
            kept_share *= 1.0 - stats.get("requested_rate", 0.0)
            done_share *= 1.0 - stats.get("achieved_rate", 0.0)
            passes += int(stats.get("compressor_passes", 0))
        seconds = synchronized_clock(self.device) - start
        before = len(self.tok_encode(original.compressible, add_special_tokens=False))
        after = len(self.tok_encode(parts.compressible, add_special_tokens=False))
        return (
            parts.text,
            seconds,
            {
                "compressible_tokens_original": before,
                "compressible_tokens": after,
                "prompt_rate_requested": 1.0 - kept_share,
                "prompt_rate_achieved": 1.0 - after / before if before else 0.0,
                "compressor_rate_achieved": 1.0 - done_share,
                "compressor_passes": passes,
            },
        )

    def _measure(self, request: Any, request_type: str, **values: Any) -> None:
        self.measurements.append(
            RequestMeasurement(
                task=getattr(request, "task_name", None) or "",
                doc_id=int(getattr(request, "doc_id", -1) if request is not None else -1),
                request_type=request_type,
                **values,
            )
        )

    # --- generate_until ---------------------------------------------------------------------
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        eos_text = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        outputs = []
        for request in tqdm(requests, desc="kvbench generate_until", disable=disable_tqdm):
            context, gen_kwargs = request.args
            outputs.append(self._generate_one(request, context, gen_kwargs, eos_text))
        return outputs

    def _generate_one(self, request: Any, context: str, gen_kwargs: dict, eos_text: str) -> str:
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
        max_gen_toks = kwargs.pop("max_gen_toks")
        if kwargs.get("do_sample"):
            raise ValueError(
                "kvbench decodes greedily; the task asks for do_sample=True. Set "
                "generation_kwargs.do_sample=false in the task."
            )
        max_context = self.max_length - max_gen_toks
        if max_context <= 0:
            raise ValueError(
                f"max_gen_toks={max_gen_toks} leaves no room for the prompt in "
                f"model.max_length={self.max_length}: raise model.max_length"
            )
        full_ids = self.tok_encode(context)
        original_ids = truncate(full_ids, max_context, self.truncation)
        # prompt methods shorten what the model would see: a prompt too long for the window
        # is truncated first (LongBench's middle cut), so their rate is of the tokens sent
        seen = context if len(original_ids) == len(full_ids) else self.tok_decode(original_ids)
        text, prompt_method_s, prompt_fields = self._apply_prompt_methods(seen)
        encoded = self.tok_encode(text) if text is not seen else original_ids
        ids = truncate(encoded, max_context, self.truncation)

        def should_stop(tokens: list[int]) -> bool:
            generated = self.tok_decode(tokens)
            return any(stop in generated for stop in until)

        self.peak_memory.reset()
        gen = greedy_generate(
            self.model,
            torch.tensor([ids], device=self.device),
            max_new_tokens=max_gen_toks,
            cache_methods=self.cache_methods,
            eos_token_ids=self.eos_token_ids,
            should_stop=should_stop,
        )
        peak_memory_bytes = self.peak_memory.peak_bytes()
        reference = len(original_ids)
        self._measure(
            request,
            "generate_until",
            prompt_tokens_original=reference,
            prompt_tokens=len(ids),
            truncated_tokens=len(encoded) - len(ids),
            prompt_method_s=prompt_method_s,
            prefill_s=gen.prefill_s,
            decode_s=gen.decode_s,
            decode_steps=gen.decode_steps,
            generated_tokens=len(gen.tokens),
            kv_bytes_prefill=gen.kv_bytes_prefill,
            kv_bytes_final=gen.kv_bytes_final,
            kv_full_bytes_prefill=self.kv_layout.full_bytes(reference),
            kv_full_bytes_final=self.kv_layout.full_bytes(reference + gen.decode_steps),
            peak_memory_bytes=peak_memory_bytes,
            **prompt_fields,
            **self._reference_nll(request, ids),
        )
        generated = self.tok_decode(gen.tokens)
        return postprocess_generated_text(generation=generated, stop=until, think_end_token=None)

    def _reference_nll(self, request: Any, ids: list[int]) -> dict[str, Any]:
        """``reference_nll``/``reference_tokens`` of the request's reference answer after
        the prompt ``ids`` (as the model saw it), or {} without a reference answer.

        The answer is scored in a pass of its own (a second prefill), after the request's
        time and peak memory were read, so it changes none of the other measurements.
        """
        if self.reference_answer is None:
            return {}
        answer = self.reference_answer(getattr(request, "doc", None))
        if answer is None:
            return {}
        prompt = self.tok_decode(ids[-8:])
        text = answer.strip() if prompt[-1:].isspace() else " " + answer.strip()
        answer_ids = self.tok_encode(text, add_special_tokens=False)[: self.reference_tokens]
        if not answer_ids:
            return {}
        context = ids[-(self.max_length - len(answer_ids)) :]
        scored = score_continuation(
            self.model, context, answer_ids, cache_methods=self.cache_methods
        )
        return {
            "reference_nll": -scored.logprob / len(answer_ids),
            "reference_tokens": len(answer_ids),
        }

    # --- log-likelihood ---------------------------------------------------------------------
    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple]:
        """Prompt methods shorten each context; then tokenise as lm-eval's ``TemplateLM``."""
        encoded = []
        for request in requests:
            context, continuation = request.args
            text, seconds, fields = self._apply_prompt_methods(context)
            if text == "":
                cont = self.tok_encode(continuation, add_special_tokens=False)
                pair = (
                    ([self.prefix_token_id], cont)
                    if self.prefix_token_id != cont[0]
                    else (cont[:1], cont[1:])
                )
            else:
                pair = self._encode_pair(text, continuation)
            encoded.append((_Scoring(request, seconds, fields), *pair))
        return self._loglikelihood_tokens(encoded, disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(
        self, requests: list[tuple], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """requests: (_Scoring or lm-eval's cache key, context ids, continuation ids)."""
        results = []
        for meta, context_enc, continuation_enc in tqdm(
            requests, desc="kvbench loglikelihood", disable=disable_tqdm
        ):
            meta = meta if isinstance(meta, _Scoring) else _Scoring(None, 0.0, {})
            whole = (list(context_enc) + list(continuation_enc))[-(self.max_length + 1) :]
            context = whole[: len(whole) - len(continuation_enc)]
            self.peak_memory.reset()
            scored = score_continuation(
                self.model, context, list(continuation_enc), cache_methods=self.cache_methods
            )
            full = self.kv_layout.full_bytes(len(context))
            self._measure(
                meta.request,
                "loglikelihood",
                prompt_tokens_original=len(context_enc),
                prompt_tokens=len(context),
                truncated_tokens=len(context_enc) - len(context),
                prompt_method_s=meta.prompt_method_s,
                prefill_s=scored.prefill_s,
                decode_s=0.0,
                decode_steps=0,
                generated_tokens=0,
                kv_bytes_prefill=scored.kv_bytes_prefill,
                kv_bytes_final=scored.kv_bytes_prefill,
                kv_full_bytes_prefill=full,
                kv_full_bytes_final=full,
                peak_memory_bytes=self.peak_memory.peak_bytes(),
                **meta.prompt_fields,
            )
            results.append((scored.logprob, scored.is_greedy))
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        totals = []
        for request in tqdm(requests, desc="kvbench loglikelihood_rolling", disable=disable_tqdm):
            (string,) = request.args
            windows = [
                lm_utils.make_disjoint_window(w)
                for w in lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            scored = self._loglikelihood_tokens([(None, c, t) for c, t in windows], True)
            totals.append(sum(logprob for logprob, _ in scored))
        return totals

    def measurement_rows(self) -> list[dict[str, Any]]:
        return [asdict(m) for m in self.measurements]
