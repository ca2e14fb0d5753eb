"""RULER variable tracking, generated offline: lm-eval's ``vt_utils`` (0.4.13) line for line,
drawing from a ``random.Random`` and a ``numpy.random.RandomState`` passed in instead of the
global generators (seeded alike, they draw what lm-eval draws; ``tests/test_ruler.py``).

A sample is a chain of 5 assignments (``VAR A = 12345``, ``VAR B = VAR A``, ...) scattered in
a repeated noise text, after one worked example; the answer is every variable of the chain.
``needle_position`` is the token index of the chain's first assignment.
"""

from __future__ import annotations

import random
import string
from typing import Any

import numpy as np

from harness.tasks.ruler.niah import needle_location

TEMPLATE = """Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\nQuestion: Find all variables that are assigned the value {query} in the text above."""
ANSWER_PREFIX = """ Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are assgined the value {query}, they are: """
NOISE = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
)


def generate_chains(
    num_chains: int, num_hops: int, rng: random.Random, np_rng: np.random.RandomState, is_icl: bool
) -> tuple[list[list[str]], list[list[str]]]:
    k = 5 if not is_icl else 3
    num_hops = num_hops if not is_icl else min(10, num_hops)
    vars_all = [
        "".join(rng.choices(string.ascii_uppercase, k=k)).upper()
        for _ in range((num_hops + 1) * num_chains)
    ]
    while len(set(vars_all)) < num_chains * (num_hops + 1):
        vars_all.append("".join(rng.choices(string.ascii_uppercase, k=k)).upper())
    vars_ret, chains_ret = [], []
    for i in range(0, len(vars_all), num_hops + 1):
        this_vars = vars_all[i : i + num_hops + 1]
        vars_ret.append(this_vars)
        this_chain = [f"VAR {this_vars[0]} = {np_rng.randint(10000, 99999)}"]
        for j in range(num_hops):
            this_chain.append(f"VAR {this_vars[j + 1]} = VAR {this_vars[j]} ")
        chains_ret.append(this_chain)
    return vars_ret, chains_ret


def generate_input_output(
    num_noises: int,
    num_chains: int,
    num_hops: int,
    rng: random.Random,
    np_rng: np.random.RandomState,
    is_icl: bool = False,
) -> tuple[str, list[str]]:
    _vars, chains = generate_chains(num_chains, num_hops, rng, np_rng, is_icl=is_icl)
    sentences = [NOISE] * num_noises
    if len(sentences) <= len(chains[0]):
        sentences = [
            n + "." if len(n.strip()) > 0 else n
            for n in [x for noise in sentences for x in noise.split(".")]
        ]
        if len(sentences) <= len(chains[0]):
            chains = [chain[: len(sentences) - 1] for chain in chains]
    for chain_i in chains:
        positions = sorted(rng.sample(range(len(sentences)), len(chain_i)))
        for insert_pi, j in zip(positions, range(len(chain_i)), strict=False):
            sentences.insert(insert_pi + j, chain_i[j])
    context = " ".join(sentences).replace(". \n", ".\n")
    value = chains[0][0].split("=")[-1].strip()
    text = (TEMPLATE + ANSWER_PREFIX).format(context=context, query=value, num_v=num_hops + 1)
    return text, _vars[0]


def _randomize_icl(icl_example: str, rng: random.Random) -> str:
    cut = icl_example.index(ANSWER_PREFIX[-10:])
    for item in icl_example[cut + 10 :].strip().split():
        new_item = "".join(rng.choices(string.ascii_uppercase, k=len(item))).upper()
        icl_example = icl_example.replace(item, new_item)
    return icl_example


def vartrack_samples(
    tokenizer: Any,
    *,
    rng: random.Random,
    np_rng: np.random.RandomState,
    num_samples: int,
    max_seq_length: int,
    incremental: int = 10,
    num_chains: int = 1,
    num_hops: int = 4,
    tokens_to_generate: int = 30,
    icl_example: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """lm-eval's ``sys_vartrack_w_noise_random`` (``add_fewshot=True``)."""
    example_tokens = 0
    if icl_example is not None:
        icl_text = icl_example["input"] + " " + " ".join(icl_example["outputs"]) + "\n\n"
        example_tokens = len(tokenizer(icl_text).input_ids)
    is_icl = icl_example is None
    num_noises, total_tokens = incremental, 0
    while total_tokens + tokens_to_generate + example_tokens < max_seq_length:
        input_text, answer = generate_input_output(
            num_noises, num_chains, num_hops, rng, np_rng, is_icl=is_icl
        )
        total_tokens = len(tokenizer(input_text + f" {answer}").input_ids)
        if total_tokens + tokens_to_generate + example_tokens > max_seq_length:
            num_noises -= incremental
            break
        num_noises += incremental

    if num_noises < 1:  # lm-eval would fail (or loop) on an empty noise list
        raise ValueError(f"not even {incremental} noise lines fit {max_seq_length} tokens")
    samples = []
    for index in range(num_samples):
        used_noises = num_noises
        while True:  # lm-eval shrinks the noise until the sample fits
            input_text, answer = generate_input_output(
                used_noises, num_chains, num_hops, rng, np_rng, is_icl=is_icl
            )
            length = len(tokenizer(input_text).input_ids) + tokens_to_generate + example_tokens
            if length <= max_seq_length:
                break
            if used_noises <= incremental:  # lm-eval would loop for ever here
                raise ValueError(
                    f"no variable-tracking sample fits max_seq_length={max_seq_length}: it "
                    "leaves no room for the template, the example and the chain"
                )
            used_noises -= incremental
        if icl_example is not None:
            cutoff = input_text.index(TEMPLATE[:20])
            input_text = (
                input_text[:cutoff] + _randomize_icl(icl_text, rng) + "\n\n" + input_text[cutoff:]
            )
        gen_prefix_index = input_text.rfind(
            " Answer: According to the chain(s) of variable assignment"
        )
        gen_prefix = input_text[gen_prefix_index:].strip()
        if icl_example is not None:
            input_text = input_text[:gen_prefix_index]
        sample = {
            "index": index,
            "input": input_text,
            "outputs": answer,
            "length": length,
            "max_length": max_seq_length,
            "gen_prefix": gen_prefix.strip(),
        }
        if icl_example is not None:
            first = input_text.index(f"VAR {answer[0]} = ", input_text.index(TEMPLATE[:20], 1))
            sample |= {"depth": None, **needle_location(tokenizer, input_text, first)}
        samples.append(sample)
    return samples


def generate_samples(
    tokenizer: Any, *, seed: int, max_seq_length: int, num_samples: int
) -> list[dict[str, Any]]:
    """lm-eval's ``get_dataset`` for one length: a worked example (at 500 tokens), then the
    samples, drawn from generators seeded with ``seed``."""
    rng, np_rng = random.Random(seed), np.random.RandomState(seed)
    icl = vartrack_samples(
        tokenizer, rng=rng, np_rng=np_rng, num_samples=1, max_seq_length=500, incremental=5
    )[0]
    return vartrack_samples(
        tokenizer,
        rng=rng,
        np_rng=np_rng,
        num_samples=num_samples,
        max_seq_length=max_seq_length,
        icl_example=icl,
    )
