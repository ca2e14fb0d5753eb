"""The log file handler of Hydra's job log (``conf/config.yaml``: ``hydra.job_logging``)."""

from __future__ import annotations

import logging


class LogFile(logging.FileHandler):
    """A :class:`logging.FileHandler` that stops writing, quietly, once its file cannot be
    written (a full disk): the standard one prints a "--- Logging error ---" traceback for
    every later line and raises again when closed. What failed is said once, by whoever
    then fails to write a record or a report (one line naming the path)."""

    broken = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.broken:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        self.broken = True
        try:
            if self.stream is not None:
                self.stream.close()
        except OSError:
            pass
        self.stream = None

    def close(self) -> None:
        try:
            super().close()
        except OSError:
            self.stream = None
