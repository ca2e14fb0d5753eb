"""RULER common words extraction, generated offline: lm-eval's ``cwe_utils`` (0.4.13) line for
line, drawing from generators passed in instead of lm-eval's module-level ones (seeded alike,
they draw what lm-eval draws; ``tests/test_ruler.py``).

A sample is a numbered list of words (wonderwords' nouns, adjectives and verbs) in which 10
words appear often and the rest rarely; the answer is those 10 words. lm-eval draws the words
with the global ``random`` module (here ``rng``, seeded with the task's seed) and shuffles with
its own ``random.Random(42)`` that first shuffled the word list at import (here a fresh one per
length, advanced the same way: :func:`shuffle_rng`). The prompt is lm-eval's: ``input`` alone
(lm-eval builds a worked example, ``input_example``, sizes the list with it, then leaves it out
of the prompt; kvbench keeps that). There is no needle: ``depth``, ``needle_position`` and
``needle_depth`` are None.
"""

from __future__ import annotations

import random
from functools import cache
from typing import Any

TEMPLATE = """Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?"""
ANSWER_PREFIX = """ Answer: The top 10 words that appear most often in the list are:"""
TOKENS_TO_GENERATE = 120
NO_NEEDLE = {"depth": None, "needle_position": None, "needle_depth": None}


@cache
def words() -> tuple[str, ...]:
    """lm-eval's ``WORDS`` before its shuffle: wonderwords' nouns, adjectives and verbs, sorted."""
    import wonderwords

    categories = wonderwords.RandomWord()._categories  # the lists lm-eval reads
    return tuple(sorted({w for kind in ("noun", "adjective", "verb") for w in categories[kind]}))


def shuffle_rng() -> tuple[random.Random, list[str]]:
    """lm-eval's module state right after import: ``RNG = random.Random(42)`` once it has
    shuffled ``WORDS``; returns (RNG, WORDS)."""
    rng = random.Random(42)
    shuffled = list(words())
    rng.shuffle(shuffled)
    return rng, shuffled


def numbered(word_list: list[str]) -> str:
    return " ".join([f"{i + 1}. {word}" for i, word in enumerate(word_list)])


def get_example(
    num_words: int,
    common_repeats: int,
    uncommon_repeats: int,
    common_nums: int,
    *,
    rng: random.Random,
    shuffler: random.Random,
    vocabulary: list[str],
) -> tuple[str, list[str]]:
    word_list_full = rng.sample(vocabulary, num_words)
    common, uncommon = word_list_full[:common_nums], word_list_full[common_nums:]
    word_list = common * int(common_repeats) + uncommon * int(uncommon_repeats)
    shuffler.shuffle(word_list)
    return numbered(word_list), common


def generate_input_output(
    num_words: int,
    max_seq_length: int,
    *,
    rng: random.Random,
    shuffler: random.Random,
    vocabulary: list[str],
    freq_cw: int = 30,
    freq_ucw: int = 3,
    num_cw: int = 10,
) -> tuple[str, str, list[str]]:
    """lm-eval's ``generate_input_output``: (worked example, prompt, answer)."""
    draw = dict(rng=rng, shuffler=shuffler, vocabulary=vocabulary)
    if max_seq_length < 4096:
        context_example, answer_example = get_example(20, 3, 1, num_cw, **draw)
        context, answer = get_example(num_words, 6, 1, num_cw, **draw)
    else:
        context_example, answer_example = get_example(40, 10, 3, num_cw, **draw)
        context, answer = get_example(num_words, freq_cw, freq_ucw, num_cw, **draw)
    template = TEMPLATE + ANSWER_PREFIX
    input_example = template.format(context=context_example, query="") + numbered(answer_example)
    input_text = template.format(context=context, query="")
    return input_example, input_text, answer


def sized_text(tokenizer: Any, input_example: str, input_text: str, answer: list[str]) -> int:
    """The tokens lm-eval sizes the list by: example, prompt and numbered answer together."""
    text = input_example + "\n" + input_text + " " + numbered(answer)
    return len(tokenizer(text).input_ids)


def generate_samples(
    tokenizer: Any,
    *,
    seed: int,
    max_seq_length: int,
    num_samples: int,
    incremental: int = 10,
    tokens_to_generate: int = TOKENS_TO_GENERATE,
) -> list[dict[str, Any]]:
    """lm-eval's ``sys_word_pair_random`` for one length: grow the list by ``incremental``
    words until it fills ``max_seq_length`` tokens, then draw ``num_samples`` samples."""
    rng = random.Random(seed)
    shuffler, vocabulary = shuffle_rng()
    draw = dict(rng=rng, shuffler=shuffler, vocabulary=vocabulary)
    num_words, total_tokens = incremental, 0
    while total_tokens + tokens_to_generate < max_seq_length:
        example, text, answer = generate_input_output(num_words, max_seq_length, **draw)
        total_tokens = sized_text(tokenizer, example, text, answer)
        if total_tokens + tokens_to_generate > max_seq_length:
            num_words -= incremental
            break
        num_words += incremental
        if num_words > len(vocabulary):
            num_words = len(vocabulary)
            break
    if num_words < incremental:  # lm-eval would draw an empty list (and divide by 0 scoring)
        raise ValueError(
            f"not even {incremental} words fit max_seq_length={max_seq_length} with the "
            "template, the worked example and the generated tokens"
        )

    samples = []
    for index in range(num_samples):
        used_words = num_words
        while True:  # lm-eval shrinks the list until the sample fits
            example, text, answer = generate_input_output(used_words, max_seq_length, **draw)
            length = len(tokenizer(text).input_ids) + tokens_to_generate
            if length <= max_seq_length:
                break
            if used_words <= incremental:  # lm-eval would loop for ever here
                raise ValueError(
                    f"no common-words sample fits max_seq_length={max_seq_length}: it leaves "
                    f"no room for the template and {incremental} words"
                )
            used_words -= incremental
        samples.append(
            {
                "index": index,
                "input": text[: text.rfind(ANSWER_PREFIX)].strip(),
                "input_example": example,
                "outputs": answer,
                "length": length,
                "max_length": max_seq_length,
                "gen_prefix": ANSWER_PREFIX.strip(),
                **NO_NEEDLE,
            }
        )
    return samples


def minimum_length(tokenizer: Any, seed: int = 42, incremental: int = 10) -> int:
    """The shortest length lm-eval's sizing accepts: its first draw of ``incremental`` words
    (the 10 common ones, each 6 times), the worked example and the generated tokens. Exact for
    lengths under 4096 (the draw is :func:`generate_samples`' first); longer ones repeat the
    words more, but hold them easily."""
    shuffler, vocabulary = shuffle_rng()
    example, text, answer = generate_input_output(
        incremental, 1, rng=random.Random(seed), shuffler=shuffler, vocabulary=vocabulary
    )
    return sized_text(tokenizer, example, text, answer) + TOKENS_TO_GENERATE
