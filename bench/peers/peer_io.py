"""Shared by the peer comparisons (project venv) and their drivers (the peers' venvs), so
standard library only: running a driver on a request, and recording a method's results."""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def run_driver(
    peer_python: str, driver: str, request: dict, out_name: str, read: Callable[[Path], Any]
) -> Any:
    """Run ``bench/peers/<driver>`` with the peer's python on ``request`` (written as JSON);
    the driver writes its results to ``out_name``, which ``read`` loads."""
    with tempfile.TemporaryDirectory() as tmp:
        request_file, out = Path(tmp) / "request.json", Path(tmp) / out_name
        request_file.write_text(json.dumps(request))
        subprocess.run(
            [peer_python, str(HERE / driver), str(request_file), str(out)], check=True, cwd=HERE
        )
        return read(out)


def recording(obj: Any, name: str, record: dict) -> None:
    """Wrap ``obj.<name>`` (on this instance only) so that its last return value lands in
    ``record[name]``."""
    method = getattr(obj, name)

    def wrapper(*args, **kwargs):
        record[name] = method(*args, **kwargs)
        return record[name]

    setattr(obj, name, wrapper)
