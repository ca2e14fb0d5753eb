"""RULER's random needle keys: lm-eval's list of "adjective-noun" words, without building it.

lm-eval's ``prepare_niah`` draws needle keys with ``random.choice(WORDS)`` where
``WORDS = sorted({f"{adj}-{noun}"})`` over wonderwords' 912 adjectives and 6,782 nouns: 6.2
million strings, about 17 s and 1 GB to build on a small CPU, at every import. The draw only
needs ``len(WORDS)`` and ``WORDS[i]``, so :class:`AdjectiveNounWords` gives both from the two
sorted word lists. Adjectives that make their words interleave in sorted order (``blue`` and
``blue-eyed``: ``blue-eagle < blue-eyed-apple < blue-fox``) are merged into one small block
that is sorted for real; every other adjective's words are ``adj-`` + the sorted nouns.
``tests/test_ruler.py`` checks the result against lm-eval's own list.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from functools import cache


class AdjectiveNounWords(Sequence[str]):
    """``sorted({f"{a}-{n}" for a in adjectives for n in nouns})`` as a lazy sequence."""

    def __init__(self, adjectives: Sequence[str], nouns: Sequence[str]) -> None:
        self.nouns = sorted(set(nouns))
        first, last = self.nouns[0], self.nouns[-1]
        spans = sorted((f"{a}-{first}", f"{a}-{last}", a) for a in set(adjectives))
        # blocks of adjectives whose [first word, last word] ranges overlap
        blocks: list[tuple[str, list[str]]] = []  # (highest word so far, adjectives)
        for low, high, adjective in spans:
            if blocks and low <= blocks[-1][0]:
                blocks[-1] = (max(blocks[-1][0], high), blocks[-1][1] + [adjective])
            else:
                blocks.append((high, [adjective]))
        self.blocks: list[str | list[str]] = []  # one adjective, or a merged block's words
        self.starts: list[int] = []  # index of each block's first word
        total = 0
        for _, members in blocks:
            self.starts.append(total)
            if len(members) == 1:
                self.blocks.append(members[0])
                total += len(self.nouns)
            else:
                words = sorted({f"{a}-{n}" for a in members for n in self.nouns})
                self.blocks.append(words)
                total += len(words)
        self.total = total

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        if isinstance(index, slice):
            raise TypeError("AdjectiveNounWords does not slice")
        if index < 0:
            index += self.total
        if not 0 <= index < self.total:
            raise IndexError(index)
        block = bisect.bisect_right(self.starts, index) - 1
        offset = index - self.starts[block]
        entry = self.blocks[block]
        return entry[offset] if isinstance(entry, list) else f"{entry}-{self.nouns[offset]}"


@cache
def needle_words() -> AdjectiveNounWords:
    """lm-eval's ``prepare_niah.WORDS`` (wonderwords' adjectives x nouns), lazily."""
    import wonderwords

    categories = wonderwords.RandomWord()._categories  # the lists lm-eval reads
    return AdjectiveNounWords(categories["adjectives"], categories["nouns"])
