"""Loaders for kvbench's offline task data (``data/`` at the repository root).

lm-eval calls these through ``custom_dataset: !function local_data.<fn>`` in the task YAMLs
next to this file, as ``fn(**metadata, **dataset_kwargs)``; each returns a
``datasets.DatasetDict`` with the splits the YAML names. The ``metadata`` keys (``version``,
``config_source``, anything a caller passes to ``TaskManager(metadata=...)``) are ignored.

The data folder is ``$KVBENCH_DATA`` if set, else ``<repo>/data`` (:mod:`methods.storage`); it
never depends on the current working directory. lm-eval loads this file by path (not as
``harness.tasks.local_data``), so it imports only :mod:`methods.storage` from kvbench.
"""

from __future__ import annotations

from typing import Any

import datasets

from methods.storage import (  # noqa: F401 (re-exported)
    DATA_ENV,
    DataFileError,
    data_dir,
    data_file,
    read_json,
    read_jsonl,
)

BBH_SUBTASKS: tuple[str, ...] = (
    "boolean_expressions",
    "causal_judgement",
    "date_understanding",
    "disambiguation_qa",
    "dyck_languages",
    "formal_fallacies",
    "geometric_shapes",
    "hyperbaton",
    "logical_deduction_five_objects",
    "logical_deduction_seven_objects",
    "logical_deduction_three_objects",
    "movie_recommendation",
    "multistep_arithmetic_two",
    "navigate",
    "object_counting",
    "penguins_in_a_table",
    "reasoning_about_colored_objects",
    "ruin_names",
    "salient_translation_error_detection",
    "snarks",
    "sports_understanding",
    "temporal_sequences",
    "tracking_shuffled_objects_five_objects",
    "tracking_shuffled_objects_seven_objects",
    "tracking_shuffled_objects_three_objects",
    "web_of_lies",
    "word_sorting",
)

LONGBENCH_TASKS: tuple[str, ...] = ("qasper", "multi_news")


def required_files(task: str, subtask: str | None = None) -> list[str]:
    """The data files (relative to :func:`data_dir`) a kvbench task needs.

    ``task`` is a TaskSpec name (gsm8k, bbh, longbench_qasper, longbench_multi_news);
    ``subtask`` narrows bbh to one of :data:`BBH_SUBTASKS`. Unknown names raise KeyError.
    """
    if task == "gsm8k":
        return ["gsm8k/test.jsonl", "gsm8k/train.jsonl"]
    if task == "bbh":
        names = [subtask] if subtask else list(BBH_SUBTASKS)
        return [f"bbh/tasks/{name}.json" for name in names]
    if task.startswith("longbench_") and task.removeprefix("longbench_") in LONGBENCH_TASKS:
        return [f"longbench/{task.removeprefix('longbench_')}.jsonl"]
    raise KeyError(f"no offline data for task {task!r}")


def gsm8k(**_metadata: Any) -> datasets.DatasetDict:
    """GSM8K: ``test`` (1,319, evaluated) and ``train`` (7,473, the few-shot pool)."""
    return datasets.DatasetDict(
        {
            "test": datasets.Dataset.from_list(read_jsonl("gsm8k/test.jsonl")),
            "train": datasets.Dataset.from_list(read_jsonl("gsm8k/train.jsonl")),
        }
    )


def bbh(bbh_task: str, **_metadata: Any) -> datasets.DatasetDict:
    """One BIG-Bench Hard subtask as a ``test`` split of ``{"input", "target"}`` records.

    The few-shot examples are not data: they sit in the task YAML (``fewshot_config.samples``).
    """
    if bbh_task not in BBH_SUBTASKS:
        raise ValueError(f"unknown BBH subtask {bbh_task!r}; valid: {', '.join(BBH_SUBTASKS)}")
    relative = f"bbh/tasks/{bbh_task}.json"
    document = read_json(relative)
    examples = document.get("examples") if isinstance(document, dict) else None
    if not isinstance(examples, list) or not examples:
        raise DataFileError(
            f'{data_file(relative)} has no non-empty list of examples under "examples": '
            "restore it from the benchmark data (see data/README.md) or set $KVBENCH_DATA"
        )
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(examples)})


def longbench(longbench_task: str, **_metadata: Any) -> datasets.DatasetDict:
    """A LongBench (v1) task as a ``test`` split.

    The local records name the question ``input``; lm-eval's LongBench YAMLs (and its hub
    copy) name it ``question``, so it is renamed here. All other fields are kept as they are.
    """
    if longbench_task not in LONGBENCH_TASKS:
        raise ValueError(
            f"unknown LongBench task {longbench_task!r}; offline: {', '.join(LONGBENCH_TASKS)}"
        )
    records = read_jsonl(f"longbench/{longbench_task}.jsonl")
    rows = [{("question" if k == "input" else k): v for k, v in r.items()} for r in records]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
