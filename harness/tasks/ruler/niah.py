"""RULER needle-in-a-haystack samples, generated offline: lm-eval's ``prepare_niah`` (0.4.13)
line for line, with three changes that leave its output unchanged where they do not apply.

- **Randomness** comes from a ``random.Random`` passed in, not the global ``random`` module:
  seeded with the same number, it draws exactly what lm-eval draws (``tests/test_ruler.py``).
- **Depths.** With ``depth`` set, the needle goes after that fraction of the haystack (lines
  for the repeated and needle haystacks, sentences for essays) instead of at lm-eval's random
  place; lm-eval's random draw for the place is still made, so keys and values stay those of
  lm-eval's sample. Only for tasks with one needle.
- **No network.** The essay haystack (Paul Graham's essays, downloaded by lm-eval) is
  replaced by whatever word list the caller passes (kvbench: GSM8K train questions), and
  nltk's ``sent_tokenize`` (whose ``punkt_tab`` data lm-eval downloads) by
  :func:`split_sentences`. Both are named as substitutions in the task names.

Each sample also records where the needle landed: ``needle_position`` (index of the needle's
first token in the tokenised prompt) and ``needle_depth`` (that over the prompt's tokens).
"""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from harness.tasks.ruler.words import needle_words

NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
REPEAT_HAYSTACK = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
)
TEMPLATE = """Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic {type_needle_v} for {query} mentioned in the provided text?"""
# lm-eval's random needle depths for essays (percent)
DEPTHS = list(np.round(np.linspace(0, 100, num=40, endpoint=True)).astype(int))


def split_sentences(text: str) -> list[str]:
    """Sentences: split after ``.``, ``!`` or ``?`` followed by white space (kvbench's stand-in
    for nltk's punkt ``sent_tokenize``, whose data would be downloaded)."""
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if s]


def generate_random(type_needle: str, rng: random.Random) -> str:
    if type_needle == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if type_needle == "words":
        return rng.choice(needle_words())
    if type_needle == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise NotImplementedError(f"{type_needle} is not implemented.")


def generate_input_output(
    num_haystack: int,
    haystack: list[str] | str,
    *,
    rng: random.Random,
    type_haystack: str,
    num_needle_k: int,
    type_needle_k: str,
    num_needle_v: int,
    type_needle_v: str,
    template: str,
    num_needle_q: int = 1,
    random_seed: int = 42,
    depth: float | None = None,
    sent_tokenize: Callable[[str], list[str]] = split_sentences,
) -> tuple[str, list[str], str]:
    """lm-eval's ``generate_input_output``: (prompt, answers, query)."""
    keys, values, needles = [], [], []
    for _ in range(num_needle_k):
        keys.append(generate_random(type_needle_k, rng))
        value = []
        for _ in range(num_needle_v):
            value.append(generate_random(type_needle_v, rng))
            needles.append(
                NEEDLE.format(type_needle_v=type_needle_v, key=keys[-1], value=value[-1])
            )
        values.append(value)
    random.Random(random_seed).shuffle(needles)
    if depth is not None and len(needles) != 1:
        raise ValueError(f"a needle depth needs one needle; this task places {len(needles)}")

    if type_haystack == "essay":
        document_sents = sent_tokenize(" ".join(haystack[:num_haystack]).strip())
        places = [int(len(document_sents) * (d / 100)) for d in rng.sample(DEPTHS, len(needles))]
        if depth is not None:
            places = [int(len(document_sents) * depth)]
        insertion_positions = [0] + sorted(places) + [len(document_sents)]
        document_sents_list = []
        for i in range(1, len(insertion_positions)):
            last_pos, next_pos = insertion_positions[i - 1], insertion_positions[i]
            document_sents_list.append(" ".join(document_sents[last_pos:next_pos]))
            if i - 1 < len(needles):
                document_sents_list.append(needles[i - 1])
        context = " ".join(document_sents_list)
    else:
        if type_haystack == "repeat":
            sentences = [haystack] * num_haystack
        elif type_haystack == "needle":
            sentences = [
                haystack.format(
                    type_needle_v=type_needle_v,
                    key=generate_random(type_needle_k, rng),
                    value=generate_random(type_needle_v, rng),
                )
                for _ in range(num_haystack)
            ]
        else:
            raise NotImplementedError(f"{type_haystack} is not implemented.")
        indexes = sorted(rng.sample(range(num_haystack), len(needles)), reverse=True)
        if depth is not None:
            indexes = [round(num_haystack * depth)]
        for index, element in zip(indexes, needles, strict=False):
            sentences.insert(index, element)
        context = "\n".join(sentences)

    indices = rng.sample(range(num_needle_k), num_needle_q)
    queries = [keys[i] for i in indices]
    answers = [a for i in indices for a in values[i]]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    if num_needle_q * num_needle_v == 1:
        template = template.replace("Some", "A").replace("are all", "is").replace("are", "is")
        template = template.replace("answers", "answer")
        type_needle_v = type_needle_v[:-1]
    return (
        template.format(type_needle_v=type_needle_v, context=context, query=query),
        answers,
        query,
    )


def generate_samples(
    haystack: list[str] | str,
    tokenizer: Any,
    *,
    rng: random.Random,
    max_seq_length: int,
    type_haystack: str,
    type_needle_k: str,
    type_needle_v: str,
    template: str = TEMPLATE,
    num_samples: int = 500,
    tokens_to_generate: int = 128,
    num_needle_v: int = 1,
    num_needle_k: int = 1,
    num_needle_q: int = 1,
    random_seed: int = 42,
    depths: Sequence[float] | None = None,
    sent_tokenize: Callable[[str], list[str]] = split_sentences,
) -> list[dict[str, Any]]:
    """lm-eval's ``generate_samples``: size the haystack to ``max_seq_length`` tokens (the
    prompt plus ``tokens_to_generate``), then draw ``num_samples`` samples. Sample ``i`` puts
    its needle at ``depths[i % len(depths)]`` when depths are given."""
    num_needle_k = max(num_needle_k, num_needle_q)
    num_needles = num_needle_k * num_needle_v
    if depths and num_needles != 1:
        raise ValueError(f"needle depths need a task with one needle; this one has {num_needles}")
    kwargs = dict(
        rng=rng,
        type_haystack=type_haystack,
        num_needle_k=num_needle_k,
        type_needle_k=type_needle_k,
        num_needle_v=num_needle_v,
        type_needle_v=type_needle_v,
        template=template,
        num_needle_q=num_needle_q,
        random_seed=random_seed,
        sent_tokenize=sent_tokenize,
    )
    incremental = 500 if type_haystack == "essay" else 25
    if type_haystack != "essay" and max_seq_length < 4096:
        incremental = 5
    num_haystack = max(incremental, num_needles)

    total_tokens = 0
    while total_tokens + tokens_to_generate < max_seq_length:
        input_text, answer, _ = generate_input_output(num_haystack, haystack, **kwargs)
        total_tokens = len(tokenizer(input_text + " ".join(answer)).input_ids)
        if total_tokens + tokens_to_generate > max_seq_length:
            num_haystack -= incremental
            break
        if type_haystack == "essay" and num_haystack > len(haystack):
            num_haystack = len(haystack)
            break
        if num_haystack > max_seq_length:
            raise ValueError(
                f"Haystack for '{type_haystack}' grew past {max_seq_length} units without "
                f"reaching max_seq_length={max_seq_length}: the tokenizer under-reports lengths"
            )
        num_haystack += incremental
    num_haystack = max(num_haystack, num_needles)

    samples = []
    for index in range(num_samples):
        depth = depths[index % len(depths)] if depths else None
        used_haystack, sample = num_haystack, None
        while used_haystack > 0:
            try:
                input_text, answer, query = generate_input_output(
                    used_haystack, haystack, depth=depth, **kwargs
                )
                length = len(tokenizer(input_text).input_ids) + tokens_to_generate
                if length <= max_seq_length:
                    sample = (input_text, answer, query, length)
                    break
            except Exception:  # noqa: BLE001 - as lm-eval: any failure means "try smaller"
                pass
            used_haystack -= incremental
        if sample is None:  # lm-eval skips such a sample (and warns)
            continue
        input_text, answer, query, length = sample
        one = num_needle_q * num_needle_v == 1
        samples.append(
            {
                "index": index,
                "input": input_text,
                "outputs": answer,
                "length": length,
                "max_length": max_seq_length,
                "gen_prefix": (
                    f"The special magic {type_needle_v[:-1]} for {query} mentioned in the provided text is"
                    if one
                    else f"The special magic {type_needle_v} for {query} mentioned in the provided text are"
                ),
                "depth": depth,
                **needle_location(tokenizer, input_text, _needle_start(input_text, answer[0])),
            }
        )
    if not samples:
        raise ValueError(
            f"no sample fits max_seq_length={max_seq_length}: it leaves no room for the prompt "
            f"template, {num_needles} needle(s) and {tokens_to_generate} generated tokens"
        )
    return samples


def _needle_start(text: str, value: str) -> int:
    """Character offset of the needle sentence that holds ``value``."""
    at = text.index(value)
    start = text.rfind("One of the special magic", 0, at)
    return start if start >= 0 else at


def needle_location(tokenizer: Any, text: str, char_offset: int) -> dict[str, Any]:
    """``needle_position``: index of the token holding character ``char_offset`` of ``text``
    as the tokenizer encodes it (special tokens included, as the model sees the prompt);
    ``needle_depth``: that index over the prompt's tokens."""
    encoded = tokenizer(text, return_offsets_mapping=True)
    ids, offsets = encoded.input_ids, encoded["offset_mapping"]
    position = next(
        (i for i, (s, e) in enumerate(offsets) if e > char_offset and e > s), len(ids) - 1
    )
    return {"needle_position": position, "needle_depth": position / max(len(ids) - 1, 1)}
