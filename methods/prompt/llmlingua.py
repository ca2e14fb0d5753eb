"""LLMLingua (Jiang et al., EMNLP 2023), the algorithm of ``llmlingua`` 0.2.2's
``PromptCompressor.compress_prompt`` (``rank_method="llmlingua"``), re-implemented here.

Why not the package itself: 0.2.2 does not run under transformers 5 (it passes caches as
lists of (k, v) tuples) and its constructor fetches a tiktoken vocabulary from the network
(only to count GPT-3.5 tokens for its report), which fails offline. It runs as a peer in its
own venv instead (``bench/peers/compare_llmlingua.py``, table in BENCHMARKS.md): same
demonstrations kept, 71-77 % of our kept tokens kept by the package too. This
implementation runs on the same compressor (the benchmarked model by default), the same
requests and the same token accounting as DAC and the baselines.

1. **Budget controller** (``control_context_budget``): the compressible text is cut into
   demonstrations after each ``separator`` ("\\n\\n": a few-shot example, or a paragraph of
   a LongBench context). Each is scored by its perplexity alone (mean self-information,
   one compressor pass each); demonstrations are taken from the highest perplexity down
   until ``target + context_budget`` tokens are spent (the one that crosses is taken), and
   kept in their original order. ``target = round(n * ratio)`` of the n tokens.
2. **Iterative token-level compression** (``iterative_compress_prompt``): the kept
   demonstrations are walked in segments of ``iterative_size`` tokens; each segment is
   scored conditioned on the already *compressed* prefix (held in a KV cache, the previous
   segment's kept tokens re-fed with it), and its highest self-information tokens are kept,
   at the rate ``tau = target / kept_demonstration_tokens``.

Choices (documented): the per-segment threshold is a top-k over the segment at ratio tau,
and the rounding is cumulative, so the total is exact (the package takes a quantile of the
losses of the whole prompt, from a first pass with no compressed prefix, and its tau counts
two extra tokens per demonstration: its achieved rate misses the target by up to ~10 % on
one prompt, 3-4 % on average); token t is kept by its own self-information (the package's
``need_idx`` is shifted by one: it keeps token t - 1 when token t is surprising); the first
token is always kept; each demonstration is tokenised alone and ends with its "\\n\\n"
separator token, which counts in its perplexity and its length; demonstrations are not
reordered (``reorder_context="original"``) and no question conditioning is used (LLMLingua
v1, not LongLLMLingua). When the compressed prefix would outgrow the compressor's window,
the conditioning restarts from the current segment (``compressor_chunks`` in
:meth:`last_stats` counts the windows). The prefix is held in a plain ``DynamicCache()``,
whose layers keep every token: a config-built one would give a sliding-window layer
(Gemma-3) only its last ``window - 1`` tokens, and could not be cropped past them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from methods.base import MethodConfigError, cache_kwarg
from methods.prompt.compressor import self_information
from methods.prompt.tokens import TokenDropMethod


@dataclass
class LLMLingua(TokenDropMethod):
    """Coarse (demonstrations) then fine (iterative tokens) deletion by perplexity.

    Attributes (besides ``ratio``, ``compressor``):
        iterative_size: tokens per segment of the token-level pass (the package: 200).
        context_budget: extra tokens the budget controller may keep over the target before
            the token-level pass (the package: "+100"); null skips the demonstration level.
        separator: what ends a demonstration (the package takes a list of demonstrations).
    ``chunk_size`` is not used: the segments and the KV-cached prefix bound the memory.
    """

    name: str = "llmlingua"
    iterative_size: int = 200
    context_budget: int | None = 100
    separator: str = "\n\n"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.iterative_size < 2:
            raise MethodConfigError(
                f"method.iterative_size={self.iterative_size} must be >= 2 tokens (the "
                "package uses 200)"
            )
        if self.context_budget is not None and self.context_budget < 0:
            raise MethodConfigError(
                f"method.context_budget={self.context_budget} must be >= 0 tokens, or null "
                "to skip the demonstration-level filter"
            )
        if not self.separator:
            raise MethodConfigError("method.separator is empty: pass e.g. '\\n\\n'")

    def select_text(self, text: str) -> tuple[list[int], list[int]]:
        pieces = [p for p in re.split(f"(?<={re.escape(self.separator)})", text) if p]
        demos = [self.scorer.encode(p) for p in pieces]
        starts = [sum(len(d) for d in demos[:i]) for i in range(len(demos))]
        ids = [t for d in demos for t in d]
        target = self.kept_count(len(ids))
        self._chunks = 1
        if target >= len(ids):
            return ids, list(range(len(ids)))
        chosen = self.control_context_budget(demos, target)
        kept_ids = [starts[i] + j for i in chosen for j in range(len(demos[i]))]
        kept = self.iterative_compress([ids[i] for i in kept_ids], target)
        return ids, [kept_ids[i] for i in kept]

    def control_context_budget(self, demos: list[list[int]], target: int) -> list[int]:
        """Indices of the demonstrations kept, in order (all of them if there is one)."""
        if self.context_budget is None or len(demos) < 2:
            return list(range(len(demos)))
        ppl = [self.scorer.token_scores(d, attention=False).self_info[1:].mean().item() if len(d) > 1
               else 0.0 for d in demos]  # fmt: skip
        budget, chosen = target + self.context_budget, []
        for i in sorted(range(len(demos)), key=lambda i: -ppl[i]):
            chosen.append(i)
            budget -= len(demos[i])
            if budget < 0:
                break
        return sorted(chosen)

    @torch.no_grad()
    def iterative_compress(self, ids: list[int], target: int) -> list[int]:
        """Indices of ids (n,) kept, ``target`` of them, increasing; segment by segment, each
        scored given the compressed prefix (in ``cache``: ``cached`` tokens) and ``pending``,
        the previous segment's kept tokens, fed again with it."""
        n = len(ids)
        if target >= n:
            return list(range(n))
        scorer, tau = self.scorer, target / n
        cache, cached, kept, pending = DynamicCache(), 0, [0], [0]
        self._chunks = 1
        for begin in range(1, n, self.iterative_size):
            segment = list(range(begin, min(begin + self.iterative_size, n)))
            if not pending:  # feed the prefix's last token again to score segment[0]
                cache.crop(-1)
                cached, pending = cached - 1, [kept[-1]]
            if cached + len(pending) + len(segment) > scorer.max_positions:
                cache, cached = DynamicCache(), 0
                self._chunks += 1
            inputs = torch.tensor([ids[i] for i in pending + segment], device=scorer.device)
            positions = torch.arange(cached, cached + len(inputs), device=scorer.device)
            logits = scorer.model(
                input_ids=inputs[None],
                position_ids=positions[None],
                **cache_kwarg(scorer.model, cache),
                use_cache=True,
            ).logits[0]
            scorer.forward_passes += 1
            info = self_information(logits, inputs)[len(pending) :]
            quota = round(tau * (segment[-1] + 1)) - len(kept)  # cumulative: exact in total
            quota = max(0, min(quota, len(segment)))
            best = info.topk(quota).indices.sort().values.tolist() if quota else []
            cache.crop(-len(segment))  # the segment leaves the cache; `pending` joins it
            cached, pending = cached + len(pending), [segment[j] for j in best]
            kept += pending
        return kept
