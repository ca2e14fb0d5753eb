"""kvbench's runner: models, the lm-eval adapter, measurements, records and reports."""

import os
import sys

# OpenMP reads its wait policy once, when torch first loads it. kvbench's default is PASSIVE
# (idle threads sleep): on a shared CPU, spinning threads (the ACTIVE policy) that the other
# load has descheduled are woken once per operation, and a method of many small operations
# slows down several times over (bench/contention.py). Set OMP_WAIT_POLICY yourself to choose;
# the record's provenance says which policy ran. Where torch was loaded first, OpenMP has
# already read the environment, so it is left as it is (and recorded as it is).
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
