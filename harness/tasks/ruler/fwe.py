"""RULER frequent words extraction, generated offline: lm-eval's ``fwe_utils`` (0.4.13) line
for line, drawing the coded words from a ``random.Random`` passed in instead of the global
``random`` module (seeded alike, it draws what lm-eval draws; ``tests/test_ruler.py``).

A sample is a text of random 6-letter "coded words" whose counts follow a Zipf law (word k of
the vocabulary appears ``num_words * k**-2 / zeta(2)`` times; the most frequent is ``...``,
noise); the answer is the next three. As lm-eval: the vocabulary is ``max_seq_length // 50``
words, every shuffle uses ``random.Random(42)`` (lm-eval's constant ``SEED``, so each sample
orders its words alike and only the words differ), and the prompt alone is sized to
``max_seq_length`` tokens (the 50 generated tokens come on top: ``length`` may exceed
``max_length`` by up to 50). There is no needle: ``depth``, ``needle_position`` and
``needle_depth`` are None.
"""

from __future__ import annotations

import random
import string
from typing import Any

import numpy as np
from scipy.special import zeta

from harness.tasks.ruler.cwe import NO_NEEDLE

TEMPLATE = """Read the following coded text and track the frequency of each coded word. Find the three most frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three most frequently appeared words in the above coded text?"""
ANSWER_PREFIX = (
    """ Answer: According to the coded text above, the three most frequently appeared words are:"""
)
TOKENS_TO_GENERATE = 50
SEED = 42  # lm-eval's shuffling seed, whatever the task's seed


def vocabulary(rng: random.Random, vocab_size: int, coded_wordlen: int = 6) -> list[str]:
    """lm-eval's vocabulary: distinct random lowercase words, sorted, shuffled with ``SEED``,
    the first replaced by ``...``."""
    vocab = [
        "".join(rng.choices(string.ascii_lowercase, k=coded_wordlen)) for _ in range(vocab_size)
    ]
    while len(set(vocab)) < vocab_size:
        vocab.append("".join(rng.choices(string.ascii_lowercase, k=coded_wordlen)))
    vocab = sorted(set(vocab))
    random.Random(SEED).shuffle(vocab)
    vocab[0] = "..."  # treat the top ranked as noise
    return vocab


def word_counts(num_words: int, vocab_size: int, alpha: float = 2.0) -> np.ndarray:
    """How often each rank appears: lm-eval's truncated Zipf counts."""
    k = np.arange(1, vocab_size + 1)
    return (num_words * (k**-alpha) / zeta(alpha)).astype(int)


def gen_text(vocab: list[str], num_words: int, alpha: float = 2.0) -> tuple[str, list[str]]:
    counts = word_counts(num_words, len(vocab), alpha)
    sampled_words = [[w] * zi for w, zi in zip(vocab, counts, strict=False)]
    sampled_words = [x for wlst in sampled_words for x in wlst]
    random.Random(SEED).shuffle(sampled_words)
    return (TEMPLATE + ANSWER_PREFIX).format(context=" ".join(sampled_words), query=""), vocab[1:4]


def generate_input_output(
    max_len: int,
    tokenizer: Any,
    *,
    rng: random.Random,
    num_words: int = -1,
    coded_wordlen: int = 6,
    vocab_size: int = 2000,
    incremental: int = 10,
    alpha: float = 2.0,
) -> tuple[str, list[str], int]:
    """lm-eval's ``generate_input_output``: (prompt, answer, words used). With ``num_words``
    unset it finds how many words fill ``max_len`` tokens."""
    vocab = vocabulary(rng, vocab_size, coded_wordlen)
    if num_words > 0:
        text, answer = gen_text(vocab, num_words, alpha)
        while len(tokenizer(text).input_ids) > max_len:
            num_words -= incremental
            text, answer = gen_text(vocab, num_words, alpha)
    else:
        num_words = max_len // coded_wordlen  # init
        text, answer = gen_text(vocab, num_words, alpha)
        while len(tokenizer(text).input_ids) < max_len:
            num_words += incremental
            text, answer = gen_text(vocab, num_words, alpha)
        num_words -= incremental
    text, answer = gen_text(vocab, num_words, alpha)
    return text, answer, num_words


def generate_samples(
    tokenizer: Any,
    *,
    seed: int,
    max_seq_length: int,
    num_samples: int,
    coded_wordlen: int = 6,
    alpha: float = 2.0,
    tokens_to_generate: int = TOKENS_TO_GENERATE,
) -> list[dict[str, Any]]:
    """lm-eval's ``sys_kwext`` for one length (``vocab_size=-1``: ``max_seq_length // 50``
    words), with ``random.Random(seed)`` for lm-eval's global generator."""
    rng = random.Random(seed)
    settings = dict(
        rng=rng,
        coded_wordlen=coded_wordlen,
        vocab_size=max_seq_length // 50,
        incremental=max_seq_length // 32,
        alpha=alpha,
    )
    _, _, num_example_words = generate_input_output(max_seq_length, tokenizer, **settings)
    samples = []
    for index in range(num_samples):
        text, answer, _ = generate_input_output(
            max_seq_length, tokenizer, num_words=num_example_words, **settings
        )
        samples.append(
            {
                "index": index,
                "input": text[: text.rfind(ANSWER_PREFIX)].strip(),
                "outputs": answer,
                "length": len(tokenizer(text).input_ids) + tokens_to_generate,
                "max_length": max_seq_length,
                "gen_prefix": ANSWER_PREFIX.strip(),
                **NO_NEEDLE,
            }
        )
    return samples


def fewest_words(alpha: float = 2.0, vocab_size: int = 5) -> int:
    """The fewest words for which the three answer words (ranks 2-4) each appear, and more
    often than the rank below them: fewer, and the answer is a tie or absent."""
    num_words = 1
    while True:
        counts = word_counts(num_words, vocab_size, alpha)
        if counts[3] > 0 and counts[1] > counts[2] > counts[3] > counts[4]:
            return num_words
        num_words += 1


def minimum_length(tokenizer: Any, seed: int = 42) -> int:
    """The shortest length that holds the template and :func:`fewest_words` coded words (and
    a vocabulary of at least 5 words, ``length // 50``): shorter, and lm-eval's answer words
    tie or vanish, or its sizing loops for ever on a template longer than the length."""
    vocab = vocabulary(random.Random(seed), 5)
    text, _ = gen_text(vocab, fewest_words())
    return max(5 * 50, len(tokenizer(text).input_ids))
