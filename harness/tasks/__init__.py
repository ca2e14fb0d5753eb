"""lm-eval task YAMLs over kvbench's offline data (``data/``) and their loaders.

Pass this folder to ``lm_eval.tasks.TaskManager(include_path=...)``; every task and group here
is named ``kvbench_*`` so none collides with lm-eval's stock tasks.
"""

import logging
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent

# lm-eval tells the user of every task read through a Python loader (``custom_dataset``) that
# it takes kwargs from `--metadata`; kvbench's tasks are all read that way and get their
# settings from kvbench itself, so that advice is noise on every kvbench run
_METADATA_ADVICE = "Custom kwargs can be passed to `--metadata`"


class _KVBenchTaskAdvice(logging.Filter):
    """Drops lm-eval's `--metadata` advice for kvbench's own tasks only."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("kvbench_") and _METADATA_ADVICE in message)


def quiet_task_advice() -> None:
    """Install the filter on lm-eval's task logger (once)."""
    logger = logging.getLogger("lm_eval.api.task")
    if not any(isinstance(f, _KVBenchTaskAdvice) for f in logger.filters):
        logger.addFilter(_KVBenchTaskAdvice())


quiet_task_advice()
