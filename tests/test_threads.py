"""kvbench chooses OpenMP's wait policy before torch loads (PASSIVE unless the user set one),
leaves it alone where torch was loaded first, and records the policy that ran."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROBE = "import os, {first}; import torch; print(os.environ.get('OMP_WAIT_POLICY'))"


@pytest.mark.parametrize(
    ("first", "given", "ran"),
    [
        ("harness", None, "PASSIVE"),  # kvbench's default
        ("harness", "ACTIVE", "ACTIVE"),  # the user's choice is kept
        ("torch, harness", None, "None"),  # torch first: OpenMP read the environment already
    ],
)
def test_the_wait_policy_is_chosen_before_torch_loads(first, given, ran) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(first=first)],
        cwd=REPO,
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ran


def test_the_record_says_which_policy_ran() -> None:
    import torch

    from harness.provenance import provenance

    prov = provenance(torch.device("cpu"), seed=0)
    assert prov["omp_wait_policy"] == os.environ.get("OMP_WAIT_POLICY")
    assert prov["threads"] == torch.get_num_threads()
