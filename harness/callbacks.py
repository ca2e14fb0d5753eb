"""Hydra callback: before the run(s) of one ``kvbench`` command, check that results_dir can
hold records; after them, report what is in it."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from harness.gpu_lease import GpuLeaseError, check_jobs
from harness.records import ResultsDirError, check_writable

log = logging.getLogger("kvbench")


class ReportCallback(Callback):
    """Checks ``run.results_dir`` before anything runs (Hydra puts its own output folder
    there, before any kvbench code: an unusable folder would end in a raw traceback); writes
    the report of it and prints the summary table after a single run that succeeded
    (``on_run_end``) or after a whole multirun (``on_multirun_end``)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_results_dir(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_results_dir(config)
        _check_gpu_jobs(config)

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        job_return = kwargs.get("job_return")
        if job_return is not None and job_return.status == JobStatus.FAILED:
            return
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
        for warning in report.warnings:
            log.warning("report: %s", warning)
        if report.runs.empty:
            log.warning("report: no finished record under %s", root)
            return
        paths = write_report(
            report.runs,
            root.resolve() / "report",
            report.requests,
            report.skipped,
            report.inputs,
        )
        print(summary_markdown(report.runs))
        print(f"\nrecords: {root.resolve()}/<run>/record.json")
        for kind, path in paths.items():
            print(f"{kind}: {path}")
        if "ruler_summary" in paths:
            print(ruler_markdown(paths["ruler_summary"]))
        heatmaps = [path for kind, path in paths.items() if kind.startswith("ruler_heatmap")]
        if heatmaps:
            print("\nRULER needle heatmaps (depth x length, share of samples passed, per run):")
            print("\n".join(f"  {path}" for path in heatmaps))


def _check_results_dir(config: DictConfig) -> None:
    """Exit with one line if ``run.results_dir`` cannot hold records. Hydra turns a callback's
    exception into a warning and goes on to create its output folder there (a raw traceback),
    so this exits the command itself."""
    try:
        check_writable(config.run.results_dir)
    except ResultsDirError as exc:
        print(f"kvbench: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def _check_gpu_jobs(config: DictConfig) -> None:
    """Exit with one line, before any job starts, when the launcher runs more jobs on GPUs
    at once than this node has (joblib's ``n_jobs``; submitit_local's ``gpus_per_node``, each
    job asking for that many). SLURM's own scheduler refuses what its nodes cannot hold."""
    launcher = config.get("hydra", {}).get("launcher", {})
    target = str(launcher.get("_target_", ""))
    device = str(config.get("model", {}).get("device", "cpu"))
    if not device.startswith("cuda"):
        return
    import torch

    if target.endswith("JoblibLauncher"):
        jobs = int(launcher.get("n_jobs") or 1)
        jobs = jobs if jobs > 0 else (os.cpu_count() or 1) + 1 + jobs  # joblib's -1: all cores
    elif target.endswith("LocalLauncher"):
        jobs = int(launcher.get("gpus_per_node") or 0)
    else:
        return
    try:
        check_jobs(jobs, device, torch.cuda.device_count())
    except GpuLeaseError as exc:
        print(f"kvbench: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def ruler_markdown(summary_csv: Path) -> str:
    """The RULER runs' share of samples passed per length, with 95 % intervals (from
    ``ruler_summary.csv``), as compact markdown tables under a heading."""
    import pandas as pd

    from harness.report.plots_ruler import terminal_markdown

    table = pd.read_csv(summary_csv)
    return "\nRULER: share of samples passed (mid depths: 30-70 %)\n\n" + terminal_markdown(table)
