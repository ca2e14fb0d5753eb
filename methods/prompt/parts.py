"""What a prompt method may shorten and what it must keep (importable from ``methods.base``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PromptParts:
    """A request's prompt split into what a prompt method may shorten and what it must keep.

    ``compressible`` holds the task description, the few-shot demonstrations or the long
    context; ``protected`` holds the final question and the answer-format line and is
    never changed. ``compressible + protected`` is the original prompt.
    """

    compressible: str
    protected: str

    @property
    def text(self) -> str:
        return self.compressible + self.protected
