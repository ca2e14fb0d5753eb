"""kvbench's Hydra sweeper: Hydra's basic sweeper, plus the full-cache reference of every job.

Every comparison in the report is against the full cache at the same task settings, so a
multirun (a named sweep or ``kvbench -m ...``) runs that reference as one of its own jobs:

- each job's reference is the job with ``method=full`` and none of its ``method.*``
  overrides (the full cache takes no ratio), every other override (model, task, run) kept;
- the references come first, once each (``method=full`` jobs of the sweep are folded into
  them: ``method=full,streamingllm method.ratio=0.1,0.2,0.4`` runs the full cache once);
- a reference whose record exists is skipped like any finished run (its folder is named by
  the config's hash);
- before any job starts, every job's config is built and checked, and each reference's
  RULER lengths are checked against the model's window: a sweep that cannot run its
  reference fails whole, naming it.

Selected in ``conf/config.yaml`` (``hydra/sweeper: kvbench``); ``max_batch_size`` and
``params`` are the basic sweeper's. Hydra takes sweepers only from its ``hydra_plugins``
namespace package, hence this module's place; it imports nothing of kvbench until it checks
a sweep's jobs.
"""

import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper, BasicSweeperConf
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.types import Override
from hydra.plugins.sweeper import Sweeper

log = logging.getLogger("kvbench")

REFERENCE = "full"


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _is_method(override: str) -> bool:
    key = _key(override)
    return key == "method" or key.startswith("method.")


def method_of(job: Sequence[str], default: str = REFERENCE) -> str:
    """The ``method=`` a job's overrides choose (``default``: the config's, the full cache)."""
    chosen = [o.split("=", 1)[1] for o in job if _key(o) == "method"]
    return chosen[-1] if chosen else default


def reference_of(job: Sequence[str]) -> list[str]:
    """The job's full-cache reference: its overrides less the method's, with ``method=full``."""
    return [o for o in job if not _is_method(o)] + [f"method={REFERENCE}"]


def with_references(jobs: Sequence[Sequence[str]]) -> list[list[str]]:
    """The references of ``jobs`` (once each, first), then the jobs that are not one."""
    references: dict[tuple[str, ...], list[str]] = {}
    others = []
    for job in jobs:
        reference = reference_of(job)
        references.setdefault(tuple(sorted(reference)), reference)
        if method_of(job) != REFERENCE:
            others.append(list(job))
    return [*references.values(), *others]


class KVBenchSweeper(BasicSweeper):
    """:class:`BasicSweeper` whose jobs include their full-cache references (see the module)."""

    def __init__(self, max_batch_size: int | None = None, params: dict | None = None) -> None:
        # BasicSweeper's own __init__, less its `super(BasicSweeper, self)`: Hydra's plugin
        # scan executes its module again, and that name then is another class than our base
        Sweeper.__init__(self)
        self.overrides = None
        self.batch_index = 0
        self.max_batch_size = max_batch_size
        self.params = params or {}
        self.hydra_context = None
        self.config = None
        self.launcher = None

    def split_arguments(  # type: ignore[override]  (an instance method: it checks the jobs)
        self, overrides: list[Override], max_batch_size: int | None
    ) -> list[list[list[str]]]:
        [jobs] = BasicSweeper.split_arguments(overrides, None)
        full = with_references(jobs)
        added = len(full) - sum(method_of(j) != REFERENCE for j in jobs)
        log.info("sweep: %d jobs, %d of them full-cache references", len(full), added)
        self._check(full, added)
        return [list(c) for c in BasicSweeper.split_overrides_to_chunks(full, max_batch_size)]

    def _check(self, jobs: list[list[str]], references: int) -> None:
        """Build every job's config (no model loads), and check each reference's RULER
        lengths against its model's window: a failure names the job and stops the sweep."""
        if self.hydra_context is None or self.config is None:  # not set up (a bare split)
            return
        from harness.job import prepare

        for number, job in enumerate(jobs):
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(job))
            try:
                model_spec, _, task = prepare(cfg)
                if number < references and task.is_ruler:
                    tokenizer = model_spec.load_tokenizer()
                    window = model_spec.context_length(model_spec.load_config())
                    task.validate_for(window, tokenizer)
            except Exception as exc:
                kind = "full-cache reference" if number < references else "job"
                line = f"the sweep's {kind} `{' '.join(job)}` cannot run: {exc}"
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise SweepError(line) from exc
                print(f"kvbench: {line} (no job was started)", file=sys.stderr)
                raise SystemExit(1) from None


@dataclass
class KVBenchSweeperConf(BasicSweeperConf):
    _target_: str = "hydra_plugins.kvbench_sweeper.kvbench_sweeper.KVBenchSweeper"


ConfigStore.instance().store(group="hydra/sweeper", name="kvbench", node=KVBenchSweeperConf)


class SweepError(ValueError):
    """A job of the sweep cannot run: nothing was started."""
