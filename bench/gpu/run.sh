#!/usr/bin/env bash
# kvbench's GPU device check, one command on a bare GPU machine (README, section "GPU"):
#
#   bash bench/gpu/run.sh            # install the carried wheels (.whl/, from bench/gpu/wheels.sh)
#                                    # offline, run the cuda-marked tests, then the speed table
#   bash bench/gpu/run.sh --dry-run  # the same steps on the CPU, tiny shapes (CI runs this)
#
# Writes under $OUT (default bench/gpu/out): install.log, env.txt, tests.log, speed.log and the
# table, gpu_speed.md + gpu_speed.csv (rewritten after every row, so a run cut short keeps what
# it measured), ops.log and op_counts.md + op_counts.csv (launches per decode step), methods.log
# and methods_speed.md + methods_speed.csv (model and prompt methods, also rewritten per row).
# Each step has its own time limit (TESTS_S, OPS_S, SPEED_S, METHODS_S seconds) so the whole
# stays inside 8 minutes on one H200 (install, env and SpindleKV's CPU kernels ~30 s, which the
# CUDA tests' CPU reference would otherwise build, + 120 + 60 + 210 + 60 = 480 s); the exit
# status is 1 if a step failed.
set -uo pipefail
cd "$(dirname "$0")/../.."
DRY_RUN=()
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=(--dry-run)
PYTHON=${PYTHON:-python3}
OUT=${OUT:-bench/gpu/out}
WHEELS=${KVBENCH_WHEELS:-.whl}
SITE=${KVBENCH_SITE:-/tmp/kvbench-site}
TESTS_S=${TESTS_S:-120}
SPEED_S=${SPEED_S:-210}
OPS_S=${OPS_S:-60}
METHODS_S=${METHODS_S:-60}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
failed=0
started=$SECONDS

# 1. what the image lacks, offline, from the carried wheels (nothing is fetched)
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$WHEELS"/*.whl >"$OUT/install.log" 2>&1; then
    echo "installed $(ls "$WHEELS"/*.whl | wc -l) wheels into $SITE" | tee -a "$OUT/install.log"
  else
    echo "wheel install FAILED (install.log)"; failed=1
  fi
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "no wheels in $WHEELS: using the installed packages" | tee "$OUT/install.log"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

# 2. the machine: GPU, versions, what kvbench imports
{
  date -u
  command -v nvidia-smi >/dev/null &&
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem,temperature.gpu \
      --format=csv
  "$PYTHON" - <<'EOF'
import importlib, importlib.metadata as md, sys
print("python", sys.version.split()[0])
for name in ("torch", "transformers", "huggingface_hub", "tokenizers", "numpy", "pandas",
             "pyarrow", "fsspec", "lm_eval", "datasets", "hydra-core", "omegaconf", "peft"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "MISSING")
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for module in ("harness.api", "harness.run", "bench.common", "methods.cache.spindlekv"):
    try:
        importlib.import_module(module)
        print("import", module, "ok")
    except Exception as exc:
        print("import", module, "FAILED", type(exc).__name__, exc)
EOF
  compgen -G "$WHEELS/*.whl" >/dev/null && "$PYTHON" bench/gpu/check_wheels.py "$WHEELS" --on-machine
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 2b. SpindleKV's CPU kernels, built before the timed steps (the first build on a machine takes
#     30-60 s and would eat a step's limit; on a machine without a C++ compiler the steps that
#     need them say so)
{ timeout 300 "$PYTHON" -c "import time; t = time.time()
from methods.cache.spindlekv import codebook_kernels as k
k.extension(); print(f'SpindleKV CPU kernels ready in {time.time() - t:.0f} s')" 2>&1 |
  tail -1; } | tee -a "$OUT/env.txt"

# 3. the cuda-marked tests (skipped on a machine without a GPU)
mapfile -t test_files < <(grep -l "pytest.mark.cuda" tests/test_*.py)
timeout "$TESTS_S" "$PYTHON" -m pytest -q -p no:cacheprovider -m cuda -rs "${test_files[@]}" \
  2>&1 | tee "$OUT/tests.log"
[[ ${PIPESTATUS[0]} -eq 0 ]] || { echo "cuda tests FAILED or timed out (tests.log)"; failed=1; }

# 4. operator launches per decode step (op_counts.md + op_counts.csv; the speed table adds
#    their ops/step and ops vs full columns)
timeout "$OPS_S" "$PYTHON" bench/gpu/op_counts.py "${DRY_RUN[@]}" --out "$OUT" 2>&1 | tee "$OUT/ops.log"
[[ ${PIPESTATUS[0]} -eq 0 ]] || { echo "op counts FAILED or timed out (ops.log)"; failed=1; }

# 5. the speed and memory table
timeout "$SPEED_S" "$PYTHON" bench/gpu/speed.py "${DRY_RUN[@]}" --out "$OUT" \
  --budget-s "$((SPEED_S - 90))" 2>&1 | tee "$OUT/speed.log"
[[ ${PIPESTATUS[0]} -eq 0 ]] || { echo "speed table FAILED or timed out (speed.log)"; failed=1; }

# 6. the model and prompt methods' table (methods_speed.md + methods_speed.csv); its rows get
#    what the loading leaves of METHODS_S
timeout "$METHODS_S" "$PYTHON" bench/gpu/methods_speed.py "${DRY_RUN[@]}" --out "$OUT" \
  --budget-s "$((METHODS_S - 20))" 2>&1 | tee "$OUT/methods.log"
[[ ${PIPESTATUS[0]} -eq 0 ]] || { echo "methods table FAILED or timed out (methods.log)"; failed=1; }

echo "bench/gpu/run.sh: $((SECONDS - started)) s, outputs in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit "$failed"
