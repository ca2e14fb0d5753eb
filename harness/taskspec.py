"""What to evaluate: one benchmark (an lm-eval task or group) and how its prompts are handled.

A :class:`TaskSpec` is built by Hydra from ``conf/task/<name>.yaml``
(``_target_: harness.taskspec.TaskSpec``) and validates itself in ``__post_init__``, before any
model loads. The runner passes :meth:`TaskSpec.task_names` and :meth:`TaskSpec.task_manager` to
``lm_eval.simple_evaluate`` together with ``limit`` and ``num_fewshot``; the LM adapter uses
``truncation`` to fit a prompt into the model window and :meth:`TaskSpec.split_prompt` to tell a
prompt method which part of a request it may shorten.

``source=local`` runs kvbench's own task YAMLs (``harness/tasks``, named ``kvbench_*``) over the
offline copies in ``data/``; they render the same prompts and compute the same metrics as
lm-eval's stock tasks. ``source=hub`` runs lm-eval's stock tasks, which download their data.

RULER tasks (``ruler`` and ``ruler_*``) are generated, not read: ``lengths``,
``samples_per_length``, ``depths`` and ``seed`` say what to generate, and the model's tokenizer
(passed to :meth:`TaskSpec.task_manager`) sizes the samples; :meth:`TaskSpec.validate_for` checks the
lengths against the model's window and the task's template before the weights load.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from harness.taskconfig import TRUNCATIONS, TaskConfigError
from harness.tasks import TASKS_DIR, local_data
from harness.taskspec_ruler import RulerSpec
from methods.base import PromptParts

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

SOURCES = ("local", "hub")
# The most few-shot examples a task has: BBH ships 3 CoT examples per subtask, LongBench none.
MAX_FEWSHOT = {"bbh": 3, "longbench_qasper": 0, "longbench_multi_news": 0}


@dataclass
class TaskSpec(RulerSpec):
    """One benchmark and how to run it.

    Attributes:
        name: gsm8k | bbh | longbench_qasper | longbench_multi_news (labels records; with
            ``source=local`` it also selects the offline data files).
        local_tasks: lm-eval task/group names in ``harness/tasks`` (``source=local``).
        hub_tasks: lm-eval stock task/group names (``source=hub``, needs network).
        primary_metric: the key of the headline number in lm-eval's results for each name in
            :meth:`task_names`, e.g. ``"exact_match,strict-match"``.
        source: ``local`` (offline data) or ``hub`` (lm-eval's stock tasks).
        subtask: bbh only: run one of the 27 subtasks instead of the whole group; the task
            name is ``<group>_<subtask>``.
        limit: samples per lm-eval task (for a group, per subtask); None runs all.
        num_fewshot: few-shot examples; None keeps the task's default.
        truncation: how the adapter fits a too-long prompt into the model window: ``left``
            drops the start, ``middle`` drops the middle (LongBench's way).
        protect_from: regex; the last match in a prompt starts the part no prompt method may
            change (the final question). None protects the whole prompt.
        reference_field: the document field holding the reference answer (a string, or a
            list whose first entry is used). When set, every generation request also scores
            that answer teacher-forced under the same methods (``reference_nll``, mean nats
            per token): the fidelity signal that stays sensitive where task scores sit near
            the floor. None skips it (it costs one more prefill per request).
        reference_tokens: score at most this many leading tokens of the reference answer.
        lengths: RULER only: the sequence lengths to generate samples for, in the model's
            tokens (prompt + the tokens the task generates); each at most the model's window.
        samples_per_length: RULER only: samples generated per length (``limit`` is not used).
        depths: RULER only: where the needle goes, as fractions of the haystack in [0, 1];
            sample i of a length uses ``depths[i % len(depths)]``. Tasks with one needle only
            (the others, and null, keep lm-eval's random places).
        seed: RULER only: the generator's seed (each length is drawn from it afresh).
        sample_fields: document fields copied into each sample of the record (RULER: the
            length, requested depth and where the needle is in tokens).
        score_range: ``[lo, hi]`` the primary metric lies in (null: unbounded on that side);
            a record whose score falls outside is refused (:mod:`harness.record_schema`).
    """

    name: str
    local_tasks: list[str]
    hub_tasks: list[str]
    primary_metric: str
    source: str = "local"
    subtask: str | None = None
    limit: int | None = None
    num_fewshot: int | None = None
    truncation: str = "left"
    protect_from: str | None = None
    reference_field: str | None = None
    reference_tokens: int = 64
    lengths: list[int] | None = None
    samples_per_length: int | None = None
    depths: list[float] | None = None
    seed: int | None = None
    sample_fields: list[str] = field(default_factory=list)
    score_range: list[float | None] = field(default_factory=lambda: [0.0, 1.0])

    def __post_init__(self) -> None:
        self.local_tasks = _as_list(self.local_tasks)
        self.hub_tasks = _as_list(self.hub_tasks)
        self.sample_fields = _as_list(self.sample_fields)
        if self.is_ruler:
            self._check_ruler()
        else:
            self._check_not_ruler()
        if self.source not in SOURCES:
            raise TaskConfigError(
                f"task.source={self.source!r} is not one of {SOURCES}: use task.source=local "
                "(offline data in data/) or task.source=hub (lm-eval's stock tasks, needs network)"
            )
        if "," not in (self.primary_metric or ""):
            raise TaskConfigError(
                f"task.primary_metric={self.primary_metric!r} is not a key of lm-eval's results "
                '("<metric>,<filter>"): pass e.g. task.primary_metric="exact_match,strict-match" '
                'or task.primary_metric="score,none"'
            )
        if not (self.local_tasks if self.source == "local" else self.hub_tasks):
            raise TaskConfigError(
                f"task.{self.source}_tasks is empty: list the lm-eval task names to run "
                f"with task.source={self.source}"
            )
        self._check_limit_and_fewshot()
        self._check_score_range()
        if self.truncation not in TRUNCATIONS:
            raise TaskConfigError(
                f"task.truncation={self.truncation!r} is not one of {TRUNCATIONS}: use "
                "task.truncation=left (drop the start) or task.truncation=middle (LongBench)"
            )
        self._check_subtask()
        if self.source == "local" and not self.is_ruler:
            self._check_local_data()
        if self.protect_from is not None:
            self._check_protect_from()
        if int(self.reference_tokens) <= 0:
            raise TaskConfigError(
                f"task.reference_tokens={self.reference_tokens} must be a positive number of "
                "answer tokens to score: pass e.g. task.reference_tokens=64, or "
                "task.reference_field=null to skip the reference NLL"
            )

    def _check_protect_from(self) -> None:
        try:
            pattern = re.compile(self.protect_from)
        except re.error as err:
            raise TaskConfigError(
                f"task.protect_from={self.protect_from!r} is not a valid regex ({err}): "
                "escape special characters, e.g. task.protect_from='\\(A\\)'"
            ) from err
        if pattern.fullmatch("") is not None:
            raise TaskConfigError(
                f"task.protect_from={self.protect_from!r} matches the empty string, so it "
                "could protect nothing: give the text that starts the final question, e.g. "
                "task.protect_from='Q: ', or task.protect_from=null to protect the whole prompt"
            )

    def _check_score_range(self) -> None:
        bounds = list(self.score_range) if isinstance(self.score_range, list | tuple) else []
        if len(bounds) != 2 or (None not in bounds and bounds[0] >= bounds[1]):
            raise TaskConfigError(
                f"task.score_range={self.score_range} is not [lo, hi] with lo < hi: pass e.g. "
                "task.score_range=[0,1], or [0,null] for a metric without an upper bound"
            )
        self.score_range = bounds

    def _check_limit_and_fewshot(self) -> None:
        if self.limit is not None and int(self.limit) <= 0:
            raise TaskConfigError(
                f"task.limit={self.limit} must be a positive number of samples per task: "
                "pass e.g. task.limit=20, or task.limit=null to run every sample"
            )
        if self.num_fewshot is not None:
            if int(self.num_fewshot) < 0:
                raise TaskConfigError(
                    f"task.num_fewshot={self.num_fewshot} is negative: pass a count >= 0, "
                    "or task.num_fewshot=null for the task's default"
                )
            most = MAX_FEWSHOT.get(self.name)
            if most is not None and int(self.num_fewshot) > most:
                raise TaskConfigError(
                    f"task.num_fewshot={self.num_fewshot}, but {self.name} has only {most} "
                    f"few-shot examples: pass task.num_fewshot between 0 and {most}, or null"
                )

    def _check_subtask(self) -> None:
        if self.subtask is None:
            return
        if self.name != "bbh":
            raise TaskConfigError(
                f"task.subtask={self.subtask!r} is set, but only bbh has subtasks: "
                "remove it (task.subtask=null)"
            )
        if self.subtask not in local_data.BBH_SUBTASKS:
            raise TaskConfigError(
                f"task.subtask={self.subtask!r} is not a BBH subtask: pass one of "
                f"{', '.join(local_data.BBH_SUBTASKS)}, or task.subtask=null for all 27"
            )

    def _check_local_data(self) -> None:
        try:
            files = local_data.required_files(self.name, self.subtask)
        except KeyError:
            raise TaskConfigError(
                f"task.name={self.name!r} has no offline data (kvbench has gsm8k, bbh, "
                "longbench_qasper, longbench_multi_news): use task.source=hub for lm-eval's "
                "stock tasks"
            ) from None
        for relative in files:
            try:
                local_data.data_file(relative)
            except FileNotFoundError as err:
                raise TaskConfigError(f"task.source=local: {err}") from None

    def data_hash(self) -> str | None:
        """Content hash of the data files the task reads (a run over other data, e.g.
        ``$KVBENCH_DATA``, gets another run id and reference; RULER: its GSM8K haystack).
        None for ``source=hub`` or a task without offline files."""
        if self.source != "local":
            return None
        try:
            files = local_data.required_files(self.name, self.subtask)
        except KeyError:  # RULER: generated, over GSM8K's training questions as haystack
            files = ["gsm8k/train.jsonl"] if self.ruler_haystack_files() else []
        if not files:
            return None
        digest = hashlib.sha256()
        for relative in sorted(files):
            digest.update(relative.encode() + b"\0")
            digest.update(local_data.data_file(relative).read_bytes())
        return digest.hexdigest()[:16]

    def task_names(self) -> list[str]:
        """The names to pass to ``lm_eval.simple_evaluate(tasks=...)``.

        With a bbh ``subtask`` each group name ``g`` becomes ``g_<subtask>``.
        """
        names = self.local_tasks if self.source == "local" else self.hub_tasks
        if self.subtask is not None:
            return [f"{name}_{self.subtask}" for name in names]
        return list(names)

    def task_manager(self, tokenizer: Any = None) -> TaskManager:
        """The lm-eval TaskManager that knows :meth:`task_names`.

        ``local``: only kvbench's ``harness/tasks`` (lm-eval's ~15k stock YAMLs are not
        indexed, which saves ~10 s); ``hub``: lm-eval's stock tasks. RULER tasks get their
        generator settings as metadata, with ``tokenizer`` (the model's) saved to a temporary
        folder that lives as long as the TaskManager (lm-eval's RULER reads a tokenizer by
        name or folder).
        """
        from lm_eval.tasks import TaskManager

        metadata, folder = None, None
        if self.is_ruler:
            if tokenizer is None:
                raise ValueError(f"{self.name}: RULER tasks need the model's tokenizer")
            folder = tempfile.mkdtemp(prefix="kvbench-tokenizer-")
            tokenizer.save_pretrained(folder)
            metadata = {"tokenizer": folder, "max_seq_lengths": list(self.lengths)}
            if self.source == "local":
                metadata |= {
                    "samples_per_length": int(self.samples_per_length),
                    "depths": self.depths,
                    "seed": int(self.seed),
                }
        if self.source == "local":
            manager = TaskManager(
                include_path=str(TASKS_DIR), include_defaults=False, metadata=metadata
            )
        else:
            manager = TaskManager(metadata=metadata)
        if folder is not None:
            weakref.finalize(manager, shutil.rmtree, folder, ignore_errors=True)
        return manager

    def reference_answer(self, doc: dict[str, Any] | None) -> str | None:
        """The reference answer of ``doc`` to score teacher-forced, or None (no
        ``reference_field``, no document, or an empty answer)."""
        if self.reference_field is None or not doc:
            return None
        value = doc.get(self.reference_field)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        return str(value) if value not in (None, "") else None

    def split_prompt(self, prompt: str) -> PromptParts:
        """Split a rendered prompt at the start of the last ``protect_from`` match.

        ``compressible`` is everything before it (description, few-shot examples, long
        context), ``protected`` the match onwards (final question, answer cue). If
        ``protect_from`` is None or does not match, the whole prompt is protected: a prompt
        method then leaves it unchanged rather than risk cutting the question.
        """
        matches = list(re.finditer(self.protect_from, prompt)) if self.protect_from else []
        start = matches[-1].start() if matches else 0
        return PromptParts(compressible=prompt[:start], protected=prompt[start:])


def _as_list(value: object) -> list[str]:
    """A plain list of names from a list, a Hydra ListConfig, a single string or None."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]  # type: ignore[attr-defined]
