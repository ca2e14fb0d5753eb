"""``python -m harness.report DIR``: the same as ``kvbench-report DIR``."""

import sys

from harness.report.build import main

sys.exit(main())
