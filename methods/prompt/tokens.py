"""Token deletion: the base of the prompt methods that drop compressor tokens.

A request's compressible part (demonstrations, context) is tokenised with the compressor's
tokenizer, a subclass picks which tokens to keep (:meth:`TokenDropMethod.select`, in order,
token 0 always kept), and the kept tokens are decoded back to text and joined to the
protected part, which comes back byte-identical.

An input is scored whole while it fits the compressor's window (``chunk_size: null``, the
default: the compressor's ``max_position_embeddings``; as the authors' DAC code, which never
chunks). A longer one is cut into chunks of at most ``chunk_size`` tokens, each ending after
a line or a sentence (newline, ".", "?", "!") in its second half where there is one, and
compressed chunk by chunk at the same rate; :meth:`last_stats` records the chunk count and
the limit (``compressor_chunks``, ``compressor_window``).

``ratio`` is the fraction of the compressible tokens kept, in (0, 1]: 1 is a no-op (the
prompt is returned unchanged, nothing is tokenised), and so is a compressible part that
is empty or only whitespace. Each chunk keeps about ``n * ratio`` of its n tokens
(:meth:`TokenDropMethod.kept_count`, or DAC's own schedule).
:meth:`last_stats` tells the LM adapter what the last request asked for and got.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from methods.base import MethodConfigError, PromptMethod, PromptParts
from methods.prompt.compressor import Compressor, chunk_spans


@dataclass
class TokenDropMethod(PromptMethod):
    """Keeps a ``ratio`` share of the compressible tokens; subclasses choose which.

    Attributes:
        ratio: fraction of the compressible tokens kept, in (0, 1] (1: unchanged); None: 0.5.
        rate: deprecated alias, the fraction removed (``ratio = 1 - rate``); warns.
        compressor: None (the benchmarked model, shared: no second load) or the name of a
            model config (e.g. ``smollm2_135m``): the method never resolves it; the harness
            loads that model and hands it over (:meth:`use_compressor`) before ``prepare``.
        chunk_size: the most compressor tokens scored in one pass; longer inputs are cut into
            chunks. None: the compressor's window (inputs that fit are never chunked).
    """

    ratio: float | None = None
    rate: float | None = None
    compressor: str | None = None
    chunk_size: int | None = None

    needs_model: ClassVar[bool] = True  # random deletion needs only the tokenizer

    def __post_init__(self) -> None:
        super().__post_init__()
        self.ratio = ratio_from_rate(self.ratio, self.rate)
        self.rate = None
        if not (0.0 < float(self.ratio) <= 1.0):
            raise MethodConfigError(
                f"method.ratio={self.ratio!r} is outside (0, 1]: it is the fraction of the "
                "compressible prompt tokens kept (1 leaves the prompt unchanged); pass "
                "e.g. method.ratio=0.5"
            )
        if self.chunk_size is not None and self.chunk_size < 16:
            raise MethodConfigError(
                f"method.chunk_size={self.chunk_size} is too small: pass >= 16 tokens, or null "
                "(the compressor's window: no chunking while the input fits, as the authors)"
            )
        self._handed: tuple[nn.Module, Any] | None = None  # the named compressor's
        self._compressor: Compressor | None = None
        self._stats: dict[str, float] | None = None
        self._chunks = 0

    def use_compressor(self, model: nn.Module, tokenizer: Any) -> None:
        """Hand over the model and tokenizer that the named ``compressor`` stands for (the
        harness loads them on the benchmarked model's device); call before :meth:`prepare`."""
        self._handed = (model, tokenizer)

    def prepare(self, model: nn.Module, tokenizer: Any) -> None:
        """Score with ``model`` and ``tokenizer`` (the benchmarked model's), or with the
        compressor handed over by :meth:`use_compressor` when ``compressor`` names one."""
        if self.compressor is not None:
            if self._handed is None:
                raise RuntimeError(
                    f"{self.name}: method.compressor={self.compressor!r} was not handed over: "
                    "call use_compressor(model, tokenizer) with that model before prepare() "
                    "(the harness's open_session loads and hands it over)"
                )
            model, tokenizer = self._handed
        self._compressor = Compressor(
            model if self.needs_model else None, tokenizer, attention=self.uses_attention()
        )

    def uses_attention(self) -> bool:
        """Whether :meth:`select` needs attention received (checked once in ``prepare``)."""
        return False

    @property
    def scorer(self) -> Compressor:
        if self._compressor is None:
            raise RuntimeError(f"{self.name}: call prepare(model, tokenizer) before shorten_text()")
        return self._compressor

    def shorten_text(self, prompt: PromptParts) -> str:
        start = time.perf_counter()
        scorer = self.scorer
        passes = scorer.forward_passes
        self._chunks = 0
        if self.ratio == 1 or not prompt.compressible.strip():
            self._record(0, 0, 0, start)
            return prompt.text
        ids, kept = self.select_text(prompt.compressible)
        text = scorer.decode([ids[i] for i in kept])
        self._record(len(ids), len(kept), scorer.forward_passes - passes, start)
        return text + prompt.protected

    def select_text(self, text: str) -> tuple[list[int], list[int]]:
        """Tokenise ``text`` and choose the tokens to keep, chunk by chunk: (ids, kept
        indices into ids, increasing)."""
        ids = self.scorer.encode(text)
        window = self.window()
        if window is None or len(ids) <= window:
            self._chunks = 1
            return ids, self.select(ids)
        kept: list[int] = []
        spans = chunk_spans(self.scorer.boundaries(ids), window)
        for begin, end in spans:
            kept += [begin + i for i in self.select(ids[begin:end])]
        self._chunks = len(spans)
        return ids, kept

    def window(self) -> int | None:
        """The most tokens scored at once: ``chunk_size``, else the compressor's window (None
        without a model: random deletion draws over the whole input)."""
        if self.chunk_size is not None:
            return int(self.chunk_size)
        return self.scorer.max_positions if self.scorer.model is not None else None

    def select(self, ids: list[int]) -> list[int]:
        """Indices of the tokens of ids (n,) to keep, increasing, starting with 0."""
        raise NotImplementedError

    def kept_count(self, n: int) -> int:
        return max(1, round(n * self.ratio))

    def _record(self, total: int, kept: int, passes: int, start: float) -> None:
        self._stats = {
            "requested_rate": round(1.0 - float(self.ratio), 12),  # fraction removed
            "achieved_rate": 1.0 - kept / total if total else 0.0,
            "compressor_tokens": float(total),
            "compressor_passes": float(passes),
            "compressor_chunks": float(self._chunks),
            "compressor_window": float(self.window() or 0),
            "compress_s": time.perf_counter() - start,
        }

    def last_stats(self) -> dict[str, float] | None:
        return self._stats


def ratio_from_rate(ratio: float | None, rate: float | None) -> float:
    """The fraction kept from ``ratio`` or the deprecated ``rate`` (fraction removed): ``rate``
    alone warns and converts (rounded to 12 digits, so 1 - 0.7 reads 0.3); both fail."""
    if rate is None:
        return 0.5 if ratio is None else float(ratio)
    if ratio is not None:
        raise MethodConfigError(
            f"method.ratio={ratio!r} and method.rate={rate!r} are both set: pass only "
            "method.ratio (the fraction kept; method.rate, the fraction removed, is deprecated)"
        )
    warnings.warn(
        f"method.rate={rate!r} is deprecated: pass method.ratio={round(1.0 - float(rate), 12)!r} "
        "(the fraction of the compressible prompt tokens kept)",
        FutureWarning,
        stacklevel=4,
    )
    return round(1.0 - float(rate), 12)
