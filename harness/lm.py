"""The lm-eval LM adapter: lm-eval builds the requests and scores the answers; a kvbench
:class:`~harness.session.Session` runs every request under the methods and measures it.

Tokenisation, stop sequences and post-processing follow lm-eval's ``hf`` backend, so the
adapter changes measurement, not results (``tests/test_lm_adapter.py`` checks this).
"""

from __future__ import annotations

from collections.abc import Callable
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

from harness.preflight import DEFAULT_MAX_GEN_TOKS, check_prompt_lengths, generation_limit
from harness.session import Session
from methods.base import PromptParts


def _tag(request: Any) -> dict[str, Any]:
    """The task and doc id of an lm-eval request, to label its measurement."""
    if request is None:
        return {}
    return {"task": getattr(request, "task_name", None), "doc_id": getattr(request, "doc_id", -1)}


class KVBenchLM(TemplateLM):
    """An lm-eval model that runs every request through ``session`` (one method applied).

    ``max_gen_toks`` caps every request's generation, the task's own limit included (None:
    the task's own, or lm-eval's 256 for a task that sets none)."""

    backend = "causal"

    def __init__(
        self,
        session: Session,
        *,
        split_prompt: Callable[[str], PromptParts] | None = None,
        truncation: str = "left",
        max_gen_toks: int | None = None,
        reference_answer: Callable[[dict[str, Any] | None], str | None] | None = None,
        reference_tokens: int = 64,
    ) -> None:
        super().__init__()
        self.session = session
        self.tokenizer = session.tokenizer
        self.split_prompt = split_prompt or (lambda text: PromptParts(text, ""))
        self.truncation = truncation
        self.max_gen_toks = max_gen_toks
        self.reference_answer = reference_answer
        self.reference_tokens = reference_tokens

    # --- tokenisation, as lm-eval's hf backend does it -----------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.session.prefix_token_id

    @property
    def device(self) -> torch.device:
        return self.session.device

    @property
    def max_length(self) -> int:
        return self.session.max_length

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "kvbench").replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kw) -> list[int]:
        return self.session.encode(string, add_special_tokens)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.session.decode(tokens)

    # --- generate_until ---------------------------------------------------------------------
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        eos_text = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        # before the first request: a cache method these prompts cannot honour is refused
        # now, not after the whole run (harness.preflight.check_prompt_lengths)
        lengths = [len(self.session.encode(request.args[0])) for request in requests]
        check_prompt_lengths(
            self.session.method, [min(n, self.session.max_length) for n in lengths]
        )
        outputs = []
        for request in tqdm(requests, desc="kvbench generate_until", disable=disable_tqdm):
            context, gen_kwargs = request.args
            outputs.append(self._generate_one(request, context, gen_kwargs, eos_text))
        return outputs

    def _generate_one(self, request: Any, context: str, gen_kwargs: dict, eos_text: str) -> str:
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks or DEFAULT_MAX_GEN_TOKS)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
        max_gen_toks = generation_limit(kwargs.pop("max_gen_toks"), self.max_gen_toks)
        if kwargs.get("do_sample"):
            raise ValueError(
                "kvbench decodes greedily; the task asks for do_sample=True. Set "
                "generation_kwargs.do_sample=false in the task."
            )
        out = self.session.generate(
            context,
            max_new_tokens=max_gen_toks,
            stop=until,
            truncation=self.truncation,
            split=self.split_prompt,
            tag=_tag(request),
            reference=self._reference_answer(request),
            reference_tokens=self.reference_tokens,
        )
        return postprocess_generated_text(generation=out.text, stop=until, think_end_token=None)

    def _reference_answer(self, request: Any) -> str | None:
        """The task's reference answer to the request's document (scored by the session)."""
        if self.reference_answer is None:
            return None
        return self.reference_answer(getattr(request, "doc", None))

    # --- log-likelihood ---------------------------------------------------------------------
    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple]:
        """Each (context, continuation) through :meth:`Session.loglikelihood`: prompt methods
        shorten the context, then the pair is tokenised as lm-eval's ``TemplateLM`` does."""
        return [
            self.session.loglikelihood(*request.args, split=self.split_prompt, tag=_tag(request))
            for request in tqdm(requests, desc="kvbench loglikelihood", disable=disable_tqdm)
        ]

    def _loglikelihood_tokens(
        self, requests: list[tuple], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """requests: (lm-eval's cache key, context ids, continuation ids), scored as they are."""
        return [
            self.session.logprob(context, continuation)
            for _, context, continuation in tqdm(
                requests, desc="kvbench loglikelihood", disable=disable_tqdm
            )
        ]

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
        return self.session.measurement_rows()
