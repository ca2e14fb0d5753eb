"""The report: reads finished records, never method code or the live run.

``kvbench-report DIR`` (:func:`harness.report.build.main`) turns every record under a folder into
one pandas table (:func:`load_report`), fidelity against the full-cache runs
(:mod:`harness.report.fidelity`), CSV/parquet/markdown tables (:mod:`harness.report.tables`) and
plots (:mod:`harness.report.plots` and its siblings). Everything here is a function of record
dicts; it imports nothing from ``methods`` nor from the modules that run a model.
"""

from harness.report.build import (
    Report,
    best_by_kv_ratio,
    distinguishing_params,
    format_params,
    load_records,
    load_report,
    main,
    summary_markdown,
    write_report,
)

__all__ = [
    "Report",
    "best_by_kv_ratio",
    "distinguishing_params",
    "format_params",
    "load_records",
    "load_report",
    "main",
    "summary_markdown",
    "write_report",
]
