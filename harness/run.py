"""The ``kvbench`` command: Hydra glue around :func:`harness.job.execute` (config in, errors
out as exit codes). One Hydra job = one (model, method, task) run = one record.

kvbench                                   # the demo sweep (sweep=demo), offline, CPU
kvbench method=streamingllm task=gsm8k task.limit=5
kvbench -m method=full,streamingllm method.ratio=0.1,0.2 task=longbench_qasper
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from harness.job import NoEffectError, execute
from harness.preflight import BAD_INPUT, ConfigError
from methods.storage import conf_dir

log = logging.getLogger("kvbench")
CONF_DIR = conf_dir()
# Hydra's own output folder of a single run is named by time and pid (conf/config.yaml), so
# two runs started in the same second do not share it
if not OmegaConf.has_resolver("kvbench_pid"):
    OmegaConf.register_new_resolver("kvbench_pid", os.getpid, use_cache=True)

__all__ = ["BAD_INPUT", "CONF_DIR", "ConfigError", "NoEffectError", "execute", "main"]


class RunFailed(CompactHydraException):
    """A run that failed, said in one line (Hydra prints a compact exception as its text)."""


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> str:
    try:
        return str(execute(cfg))
    except Exception as exc:
        bad_input = isinstance(exc, BAD_INPUT)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            # said at once (Hydra raises a failed job's error only after the whole sweep),
            # naming the job, which the error alone may not
            line = (
                f"run failed (method={cfg.method.get('name')}, task={cfg.task.get('name')}), "
                f"no record written: {type(exc).__name__}: {exc}"
            )
            log.error(line)
            if bad_input:  # one line at the end too, not a traceback
                raise RunFailed(line) from exc
            raise
        if not bad_input or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise  # Hydra prints it once, with its traceback
        _remove_hydra_output()  # nothing was computed: leave nothing behind
        print(f"kvbench: {exc}", file=sys.stderr)  # one line (Hydra would add its own)
        raise SystemExit(1) from None


def _remove_hydra_output() -> None:
    """Remove this run's Hydra output folder (its log and config copies), and ``.hydra``
    above it if that is left empty: a run refused before it started leaves nothing."""
    output = Path(HydraConfig.get().runtime.output_dir)
    root = logging.getLogger()
    for handler in list(root.handlers):  # Hydra's job log file is in that folder
        if (
            isinstance(handler, logging.FileHandler)
            and output in Path(handler.baseFilename).parents
        ):
            root.removeHandler(handler)
            try:
                handler.close()
            except OSError:  # a full disk: the folder is removed below all the same
                pass
    shutil.rmtree(output, ignore_errors=True)
    if output.parent.name == ".hydra" and not any(output.parent.iterdir()):
        output.parent.rmdir()


def main() -> None:
    """Console entry point. With no arguments at all it runs the demo sweep (``sweep=demo``):
    full cache vs StreamingLLM and SnapKV at 20 % on RULER needle retrieval at 1k and 2k. Ctrl-C ends
    it with one line (finished runs are kept; the same command resumes)."""
    if len(sys.argv) == 1:
        sys.argv.append("sweep=demo")
    try:
        _hydra_main()
    except KeyboardInterrupt:
        print(
            "\nkvbench: interrupted (Ctrl-C); finished runs are kept, and the same command "
            "resumes the rest",
            file=sys.stderr,
        )
        sys.exit(130)


if __name__ == "__main__":
    main()
