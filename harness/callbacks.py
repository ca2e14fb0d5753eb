"""Hydra callback: after the run(s) of one ``kvbench`` command, report what is in results_dir."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("kvbench")


class ReportCallback(Callback):
    """Writes the report of ``run.results_dir`` and prints the summary table, after a single
    run (``on_run_end``) or after a whole multirun (``on_multirun_end``)."""

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._report(config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._report(config)

    def _report(self, config: DictConfig) -> None:
        if not config.run.get("report", True):
            return
        from harness.report import load_report, summary_markdown, write_report

        root = Path(config.run.results_dir)
        report = load_report(root)
        for path, reason in report.skipped:
            log.warning("report: skipped %s (%s)", path, reason)
        if report.runs.empty:
            log.warning("report: no finished record under %s", root)
            return
        paths = write_report(
            report.runs, root.resolve() / "report", report.requests, report.skipped
        )
        print(summary_markdown(report.runs))
        print(f"\nrecords: {root.resolve()}/<run>/record.json")
        for kind, path in paths.items():
            print(f"{kind}: {path}")
