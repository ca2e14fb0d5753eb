"""RULER (lm-eval's ``tasks/ruler``) generated offline with the benchmarked model's tokenizer.

lm-eval's RULER generators download nltk's ``punkt_tab``, Paul Graham's essays and SQuAD /
HotpotQA, and load the tokenizer by hub name. kvbench reproduces the generators (``niah.py``,
``vt.py``, ``cwe.py``, ``fwe.py``: lm-eval's templates and sampling, checked against lm-eval's
own functions in ``tests/test_ruler.py``) and keeps lm-eval's scoring (``common_utils.process_results``).
The tasks that read essays run over an offline haystack instead, GSM8K's training questions,
and say so in their name (``..._gsm8k_haystack``). ``qa_squad`` and ``qa_hotpot`` read SQuAD
and HotpotQA: only lm-eval's own tasks (``task.source=hub``, network) run them.

:data:`TASKS` maps kvbench's task names (``ruler_*``; their lm-eval YAMLs are
``kvbench_ruler_*`` in this folder) to how they are generated; :func:`generate` builds one
task's samples for several lengths, each length drawn from a generator seeded with ``seed``
(so adding a length never changes another length's samples).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from harness.tasks.ruler import cwe, fwe, niah, vt

DEFAULT_LENGTHS = (1024, 2048, 4096)
GSM8K_HAYSTACK = "gsm8k_haystack"  # what replaces Paul Graham's essays


@dataclass(frozen=True)
class RulerTask:
    """One RULER task: lm-eval's name for it and the generator's settings.

    ``niah`` holds ``niah.generate_samples``'s keyword arguments (``None`` for the other
    generators, named by ``generator``); ``needles`` is how many needles a sample places
    (depths need exactly one; 0: no needle). ``prompt_fills_length``: lm-eval sizes the prompt
    alone to the length (fwe), so the generated tokens come on top of it.
    """

    stock: str
    haystack: str
    niah: dict[str, Any] | None = field(default=None, hash=False)
    needles: int = 1
    tokens_to_generate: int = 128
    generator: str = "niah"
    prompt_fills_length: bool = False

    @property
    def takes_depths(self) -> bool:
        return self.niah is not None and self.needles == 1


def _niah(stock: str, haystack: str, k: str, v: str, **counts: int) -> RulerTask:
    needles = max(counts.get("num_needle_k", 1), counts.get("num_needle_q", 1))
    needles *= counts.get("num_needle_v", 1)
    kind = "essay" if haystack == GSM8K_HAYSTACK else haystack
    settings = {"type_haystack": kind, "type_needle_k": k, "type_needle_v": v, **counts}
    return RulerTask(stock=stock, haystack=haystack, niah=settings, needles=needles)


TASKS: dict[str, RulerTask] = {
    "ruler_niah_single_1": _niah("niah_single_1", "repeat", "words", "numbers"),
    "ruler_niah_single_2_gsm8k_haystack": _niah("niah_single_2", GSM8K_HAYSTACK, "words", "numbers"),
    "ruler_niah_single_3_gsm8k_haystack": _niah("niah_single_3", GSM8K_HAYSTACK, "words", "uuids"),
    "ruler_niah_multikey_1_gsm8k_haystack": _niah("niah_multikey_1", GSM8K_HAYSTACK, "words", "numbers", num_needle_k=4),
    "ruler_niah_multikey_2": _niah("niah_multikey_2", "needle", "words", "numbers"),
    "ruler_niah_multikey_3": _niah("niah_multikey_3", "needle", "uuids", "uuids"),
    "ruler_niah_multivalue_gsm8k_haystack": _niah("niah_multivalue", GSM8K_HAYSTACK, "words", "numbers", num_needle_v=4),
    "ruler_niah_multiquery_gsm8k_haystack": _niah("niah_multiquery", GSM8K_HAYSTACK, "words", "numbers", num_needle_q=4),
    "ruler_vt": RulerTask(stock="ruler_vt", haystack="noise", needles=5, tokens_to_generate=30, generator="vt"),
    "ruler_cwe": RulerTask(stock="ruler_cwe", haystack="words", needles=0, tokens_to_generate=cwe.TOKENS_TO_GENERATE, generator="cwe"),
    "ruler_fwe": RulerTask(stock="ruler_fwe", haystack="coded_words", needles=0, tokens_to_generate=fwe.TOKENS_TO_GENERATE, generator="fwe", prompt_fills_length=True),
}  # fmt: skip
# lm-eval's RULER tasks that need data from the hub: no offline version
HUB_ONLY = {"ruler_qa_squad": "ruler_qa_squad", "ruler_qa_hotpot": "ruler_qa_hotpot"}
# lm-eval's ruler group, offline: every task in TASKS
GROUP = "ruler"


@cache
def gsm8k_haystack() -> list[str]:
    """The essay stand-in: GSM8K's 7,473 training questions, in file order, as one list of
    words (lm-eval's ``get_haystack("essay")`` shape)."""
    from harness.tasks import local_data

    text = " ".join(r["question"] for r in local_data.read_jsonl("gsm8k/train.jsonl"))
    return re.sub(r"\s+", " ", text).split(" ")


def _haystack(task: RulerTask) -> list[str] | str:
    if task.haystack == GSM8K_HAYSTACK:
        return gsm8k_haystack()
    return niah.NEEDLE if task.haystack == "needle" else niah.REPEAT_HAYSTACK


def generate(
    name: str,
    tokenizer: Any,
    *,
    lengths: Sequence[int],
    samples_per_length: int,
    depths: Sequence[float] | None = None,
    seed: int = 42,
) -> list[dict[str, Any]]:
    """Samples of task ``name`` at every length (lm-eval's fields ``index``, ``input``,
    ``outputs``, ``length``, ``max_length``, ``gen_prefix``, plus ``depth`` (requested, or
    None), ``needle_position``, ``needle_depth`` (None for the tasks without a needle: cwe,
    fwe) and ``haystack``). ``depths`` apply to tasks with one needle and are ignored by the
    others (lm-eval's random placement)."""
    task = TASKS[name]
    rows: list[dict[str, Any]] = []
    for length in lengths:
        if task.niah is None:
            generator = {"vt": vt, "cwe": cwe, "fwe": fwe}[task.generator]
            samples = generator.generate_samples(
                tokenizer, seed=seed, max_seq_length=int(length), num_samples=samples_per_length
            )
        else:
            samples = niah.generate_samples(
                _haystack(task),
                tokenizer,
                rng=random.Random(seed),
                max_seq_length=int(length),
                num_samples=samples_per_length,
                tokens_to_generate=task.tokens_to_generate,
                depths=list(depths) if depths and task.takes_depths else None,
                **task.niah,
            )
        rows += [{**s, "haystack": task.haystack} for s in samples]
    return rows


def minimum_length(name: str, tokenizer: Any, seed: int = 42) -> int:
    """About the shortest length that holds task ``name``'s template, its needles (or the
    variable-tracking example and chain) and the tokens it generates, in ``tokenizer``'s
    tokens: the prompt with the least haystack lm-eval's generator can use (cwe, fwe: the
    fewest words their answer needs)."""
    task = TASKS[name]
    rng = random.Random(seed)
    if task.generator == "cwe":
        return cwe.minimum_length(tokenizer, seed=seed)
    if task.generator == "fwe":
        return fwe.minimum_length(tokenizer, seed=seed)
    if task.niah is None:
        np_rng = vt.np.random.RandomState(seed)
        try:
            icl = vt.vartrack_samples(
                tokenizer, rng=rng, np_rng=np_rng, num_samples=1, max_seq_length=500, incremental=5
            )[0]
        except ValueError as err:  # lm-eval itself would loop for ever here
            raise ValueError(
                "lm-eval sizes variable tracking's worked example to 500 tokens, and this "
                f"tokenizer cannot fit it there ({err})"
            ) from err
        example = icl["input"] + " " + " ".join(icl["outputs"]) + "\n\n"
        text, _ = vt.generate_input_output(1, 1, 4, rng, np_rng)
        return len(tokenizer(example + text).input_ids) + task.tokens_to_generate
    settings = dict(task.niah)
    num_k = max(settings.pop("num_needle_k", 1), settings.get("num_needle_q", 1))
    text, _, _ = niah.generate_input_output(
        task.needles,
        _haystack(task),
        rng=rng,
        num_needle_k=num_k,
        num_needle_v=settings.pop("num_needle_v", 1),
        template=niah.TEMPLATE,
        **settings,
    )
    return len(tokenizer(text).input_ids) + task.tokens_to_generate
