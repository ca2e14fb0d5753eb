"""The RULER part of :class:`harness.taskspec.TaskSpec`: which RULER tasks a spec generates,
the checks of ``lengths``, ``samples_per_length``, ``depths`` and ``seed`` (on the config
alone, and against the model's window and tokenizer before the weights load), and what the
record says about the generator."""

from __future__ import annotations

from typing import Any, NoReturn

from harness.taskconfig import TaskConfigError
from harness.tasks import local_data, ruler


def _fail(message: str) -> NoReturn:
    raise TaskConfigError(message)


class RulerSpec:
    """Mixed into TaskSpec (whose fields it reads: name, source, limit, lengths,
    samples_per_length, depths, seed)."""

    name: str
    source: str
    limit: int | None
    lengths: list[int] | None
    samples_per_length: int | None
    depths: list[float] | None
    seed: int | None

    @property
    def is_ruler(self) -> bool:
        return self.name == ruler.GROUP or self.name.startswith("ruler_")

    def ruler_tasks(self) -> list[str]:
        """The RULER tasks (keys of ``ruler.TASKS``) this spec generates."""
        if not self.is_ruler or self.source != "local":
            return []
        return list(ruler.TASKS) if self.name == ruler.GROUP else [self.name]

    def ruler_haystack_files(self) -> bool:
        """Whether this spec's RULER tasks read the offline GSM8K haystack."""
        return any(n.endswith(ruler.GSM8K_HAYSTACK) for n in self.ruler_tasks())

    def _check_not_ruler(self) -> None:
        for name in ("lengths", "samples_per_length", "depths", "seed"):
            if getattr(self, name) is not None:
                _fail(
                    f"task.{name} is set, but only RULER tasks (task=ruler_*) are generated: "
                    f"remove it (task.{name}=null)"
                )

    def _check_ruler(self) -> None:
        known = [ruler.GROUP, *ruler.TASKS, *ruler.HUB_ONLY]
        if self.name not in known:
            _fail(f"task.name={self.name!r} is not a RULER task: use one of {', '.join(known)}")
        if self.source == "local" and self.name in ruler.HUB_ONLY:
            _fail(
                f"{self.name} reads SQuAD/HotpotQA, which kvbench has no offline copy of: "
                "use task.source=hub (lm-eval's own task, network needed)"
            )
        substituted = [n for n in self.ruler_tasks() if n.endswith(ruler.GSM8K_HAYSTACK)]
        if self.source == "hub" and self.name.endswith(ruler.GSM8K_HAYSTACK):
            _fail(
                f"task.source=hub: {self.name} is named for its offline GSM8K haystack, but "
                f"lm-eval's {ruler.TASKS[self.name].stock} reads Paul Graham's essays: use "
                "task.source=local, or run lm-eval's task under its own name"
            )
        if substituted:
            try:
                local_data.data_file("gsm8k/train.jsonl")
            except FileNotFoundError as err:
                _fail(f"{substituted[0]}'s haystack: {err}")
        if self.limit is not None and self.source == "local":
            _fail(
                f"task.limit={self.limit}: RULER tasks are generated, task.limit is not used: "
                "set task.samples_per_length instead (and task.limit=null)"
            )
        self.lengths = [int(x) for x in (self.lengths or [])]
        if not self.lengths or min(self.lengths) <= 0 or len(set(self.lengths)) < len(self.lengths):
            _fail(
                f"task.lengths={self.lengths} must be distinct positive token counts: pass "
                "e.g. task.lengths=[1024,2048,4096]"
            )
        if self.samples_per_length is None or int(self.samples_per_length) < 1:
            _fail(
                f"task.samples_per_length={self.samples_per_length} must be >= 1: pass e.g. "
                "task.samples_per_length=10"
            )
        if self.seed is None:
            _fail("task.seed is null: pass the generator's seed, e.g. task.seed=42")
        self._check_depths()

    def _check_depths(self) -> None:
        if self.depths is None:
            return
        self.depths = [float(d) for d in self.depths]
        outside = [d for d in self.depths if not 0.0 <= d <= 1.0]
        if not self.depths or outside:
            _fail(
                f"task.depths={self.depths}: depths are fractions of the haystack in [0, 1] "
                "(0 = start, 1 = end): pass e.g. task.depths=[0.1,0.3,0.5,0.7,0.9], or "
                "task.depths=null for lm-eval's random places"
            )
        if self.source == "hub":
            _fail(
                "task.depths is set, but lm-eval's stock RULER (task.source=hub) places needles "
                "at random: pass task.depths=null"
            )
        if not any(ruler.TASKS[name].takes_depths for name in self.ruler_tasks()):
            needles = ruler.TASKS[self.name].needles if self.name in ruler.TASKS else 2
            what = (
                "no needle (nothing to place)"
                if needles == 0
                else "more than one needle (lm-eval places them at random)"
            )
            _fail(f"task.depths is set, but {self.name} has {what}: pass task.depths=null")

    def ruler_settings(self) -> dict[str, Any]:
        """What the record says about a RULER run: the generator's settings and each task's
        haystack (``gsm8k_haystack`` where it stands in for lm-eval's essays)."""
        return {
            "lengths": list(self.lengths or []),
            "samples_per_length": self.samples_per_length,
            "depths": self.depths,
            "seed": self.seed,
            "haystacks": {name: ruler.TASKS[name].haystack for name in self.ruler_tasks()},
        }

    def validate_for(self, context_length: int, tokenizer: Any) -> None:
        """RULER: every length fits the model's window and holds the task's template, needles
        and generated tokens (checked with the model's tokenizer, before the weights load)."""
        if not self.is_ruler:
            return
        too_long = [n for n in self.lengths if n > context_length]
        if too_long:
            _fail(
                f"task.lengths={self.lengths}: {too_long} exceed the model's window of "
                f"{context_length} tokens: drop them, or raise model.max_length (up to the "
                "model's max_position_embeddings)"
            )
        for name in self.ruler_tasks():
            task = ruler.TASKS[name]
            room = context_length - task.tokens_to_generate
            if task.prompt_fills_length and max(self.lengths) > room:
                _fail(
                    f"task.lengths={self.lengths}: lm-eval sizes {name}'s prompt alone to the "
                    f"length and generates {task.tokens_to_generate} tokens after it, which "
                    f"overflows the model's window of {context_length}: use lengths of at "
                    f"most {room}, or raise model.max_length"
                )
        shortest = min(self.lengths)
        for name in self.ruler_tasks():
            try:
                needed = ruler.minimum_length(name, tokenizer, seed=int(self.seed))
            except ValueError as err:  # variable tracking: its worked example does not fit
                _fail(f"task={name} cannot be generated with this model's tokenizer: {err}")
            if shortest < needed:
                _fail(
                    f"task.lengths={self.lengths}: {shortest} tokens cannot hold {name}'s "
                    f"template, needle(s) and generated tokens ({needed} with this model's "
                    f"tokenizer): use lengths of at least {needed}"
                )
