"""lm-eval's entry points into kvbench's RULER tasks (``!function hooks.<fn>`` in the YAMLs
of this folder; lm-eval loads this file by path).

The samples are generated when lm-eval builds the task, from the run's settings that
``TaskSpec.task_manager`` passes as TaskManager metadata: ``tokenizer`` (a folder holding
the benchmarked model's tokenizer, as lm-eval's own RULER takes ``tokenizer``),
``max_seq_lengths`` (as lm-eval's), ``samples_per_length``, ``depths`` and ``seed``.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import datasets
from lm_eval.tasks.ruler.common_utils import process_results as ruler_process_results

from harness.tasks import ruler


@cache
def _tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def dataset(
    ruler_task: str,
    tokenizer: str | None = None,
    max_seq_lengths: list[int] | None = None,
    samples_per_length: int = 10,
    depths: list[float] | None = None,
    seed: int = 42,
    **_metadata: Any,
) -> dict[str, datasets.Dataset]:
    """The ``test`` split of ``ruler_task`` (a key of ``ruler.TASKS``)."""
    if not tokenizer:
        raise ValueError(
            f"{ruler_task}: RULER sizes its samples in the model's tokens and needs the "
            "tokenizer's folder as TaskManager metadata `tokenizer` (kvbench passes it)"
        )
    rows = ruler.generate(
        ruler_task,
        _tokenizer(tokenizer),
        lengths=list(max_seq_lengths or ruler.DEFAULT_LENGTHS),
        samples_per_length=int(samples_per_length),
        depths=depths,
        seed=int(seed),
    )
    return {"test": datasets.Dataset.from_list(rows, split=datasets.Split.TEST)}


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """lm-eval's RULER score of one sample (the share of expected values found in the
    output, ``common_utils.process_results``) as ``score``, and ``passed`` (all found)."""
    score = ruler_process_results(doc, results)[str(doc["max_length"])]
    return {"score": score, "passed": float(score == 1.0)}
