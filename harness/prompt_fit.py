"""A prompt fitted into the model's window: the window's cut and the prompt methods' split
(:meth:`harness.session.Session.fit`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from methods.base import PromptParts


@dataclass
class PromptFit:
    """A prompt fitted into the window and passed through the prompt methods.

    Token accounting: ``original_tokens`` = ``len(ids)`` + ``truncated_tokens`` + what the
    prompt methods removed; ``window_tokens`` is what the prompt methods were given (the
    prompt after the window's first cut), the full-cache reference of the KV ratios.
    """

    ids: list[int]  # what the model sees
    original_tokens: int  # the whole prompt, before any cut
    truncated_tokens: int  # removed by the window (before and after prompt methods)
    prompt_method_s: float
    fields: dict[str, Any] = field(default_factory=dict)  # the prompt-method fields
    window_tokens: int | None = None  # in the window before prompt methods (default: ids)

    def __post_init__(self) -> None:
        if self.window_tokens is None:
            self.window_tokens = len(self.ids)


def prompt_fields(before: int, after: int, stats: dict[str, Any] | None) -> dict[str, Any]:
    """The prompt-method fields of a request's measurement: the compressible tokens
    ``before`` and ``after`` the prompt methods, and what they said they did (``stats``:
    ``Method.prompt_stats``)."""
    stats = stats or {}
    return {
        "compressible_tokens_original": before,
        "compressible_tokens": after,
        "prompt_rate_requested": stats.get("requested_rate", 0.0),
        "prompt_rate_achieved": 1.0 - after / before if before else 0.0,
        "compressor_rate_achieved": stats.get("achieved_rate", 0.0),
        "compressor_passes": int(stats.get("compressor_passes", 0)),
        "compressor_chunks": int(stats.get("compressor_chunks", 0)),
    }


def truncate(ids: list[int], limit: int, how: str) -> list[int]:
    """Fit ``ids`` into ``limit`` tokens: ``left`` drops the start (lm-eval's ``hf``),
    ``middle`` keeps the first and last halves (LongBench's ``pred.py``)."""
    if len(ids) <= limit:
        return ids
    if how == "left":
        return ids[-limit:]
    head = limit // 2
    return ids[:head] + ids[len(ids) - (limit - head) :]


def keep_protected(parts: PromptParts) -> Callable[[str], PromptParts]:
    """A splitter for a prompt given as parts: the same parts for the whole text; after a
    window cut, the protected end stays protected where it survived the cut."""

    def split(text: str) -> PromptParts:
        if parts.protected and text.endswith(parts.protected):
            return PromptParts(text[: len(text) - len(parts.protected)], parts.protected)
        return PromptParts(text, "") if parts.compressible else PromptParts("", text)

    return split
