"""A job for joblib's worker processes in tests/test_multi_gpu.py (a small module, so that the
workers import little)."""

from __future__ import annotations

import time

from harness import gpu_lease


def hold_a_gpu(folder, count: int, hold_s: float) -> tuple[int, float, float]:
    """One job: lease a GPU, hold it, say which and when."""
    with gpu_lease.lease(count, folder) as index:
        start = time.monotonic()
        time.sleep(hold_s)
        return index, start, time.monotonic()
