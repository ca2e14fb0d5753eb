"""lm-eval task YAMLs over kvbench's offline data (``data/``) and their loaders.

Pass this folder to ``lm_eval.tasks.TaskManager(include_path=...)``; every task and group here
is named ``kvbench_*`` so none collides with lm-eval's stock tasks.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
