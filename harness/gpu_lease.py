"""One GPU per job on a node with several: a lease on the first GPU no other kvbench job on
this node holds.

``kvbench -m hydra/launcher=gpus hydra.launcher.n_jobs=N ...`` runs N jobs at once (Hydra's
joblib launcher, conf/hydra/launcher/gpus.yaml); each job whose ``model.device`` is plain
``cuda`` (no index) and whose model sits on one device takes, for its duration, the first GPU
whose lock file (``$TMPDIR/kvbench-gpus-<uid>/gpu<i>.lock``, an ``flock``) no other job holds,
and runs on ``cuda:<i>``. The lock goes with the job (or its process, if it dies), so the next
job of that worker takes a free GPU again, and two sweeps started on one node share its GPUs.
The run id is the config's (``model.device=cuda``), the record's ``model.device`` says which
GPU ran it. On a SLURM node the scheduler gives each job its own GPU (it sees one), and the
lease is that one.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch

log = logging.getLogger("kvbench")


class GpuLeaseError(RuntimeError):
    """No GPU could be leased: the message says why and what to change."""


def lock_dir() -> Path:
    """Where the node's kvbench jobs keep their GPU locks (per user, on the node's disk)."""
    folder = Path(tempfile.gettempdir()) / f"kvbench-gpus-{os.getuid()}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def wants_lease(device: str, device_map: str | None) -> bool:
    """Whether a job on ``device`` leases a GPU: plain ``cuda`` (``cuda:N`` is the user's
    choice), on one device (``device_map`` spreads it over all), with more than one GPU."""
    return device == "cuda" and device_map is None and torch.cuda.device_count() > 1


def _try_lock(path: Path) -> IO[str] | None:
    handle = open(path, "w")  # noqa: SIM115 - held open as the lock, closed by release
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


@contextmanager
def lease(count: int, folder: Path | None = None, wait_s: float = 600.0) -> Iterator[int]:
    """Hold the first free one of ``count`` GPUs for the block: yields its index. Waits (up
    to ``wait_s``) while all are held, as when a node runs more jobs than it has GPUs."""
    folder = folder or lock_dir()
    deadline = time.monotonic() + wait_s
    while True:
        for index in range(count):
            handle = _try_lock(folder / f"gpu{index}.lock")
            if handle is not None:
                try:
                    yield index
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)
                    handle.close()
                return
        if time.monotonic() > deadline:
            raise GpuLeaseError(
                f"all {count} GPUs of this node stayed held by other kvbench jobs for "
                f"{wait_s:.0f} s (locks in {folder}): run fewer jobs at once "
                "(hydra.launcher.n_jobs)"
            )
        time.sleep(1.0)


def check_jobs(jobs: int, device: str, visible: int) -> None:
    """Fail (one line) when a launcher asks for more jobs on GPUs at once than the node has."""
    if str(device).startswith("cuda") and jobs > visible:
        raise GpuLeaseError(
            f"hydra.launcher.n_jobs={jobs} jobs at once with model.device={device}, but this "
            f"node has {visible} GPU(s): pass hydra.launcher.n_jobs={max(visible, 1)} (one "
            "job per GPU)"
        )


@contextmanager
def on_a_free_gpu(spec: Any) -> Iterator[Any]:
    """``spec`` (a model spec) for the block: on the GPU leased for it when it wants one
    (:func:`wants_lease`), as it is otherwise."""
    if not wants_lease(spec.device, spec.device_map):
        yield spec
        return
    with lease(torch.cuda.device_count()) as index:
        log.info("model.device=cuda: this job runs on cuda:%d (a GPU no other job holds)", index)
        yield dataclasses.replace(spec, device=f"cuda:{index}")
