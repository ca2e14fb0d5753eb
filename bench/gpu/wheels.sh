#!/usr/bin/env bash
# Build .whl/ here (a machine with PyPI): the wheels the GPU machine's image lacks, for
# bench/gpu/run.sh to install offline there. Carry the folder with the device call:
#   bash bench/gpu/wheels.sh          # -> .whl/ (git-ignored), about 15 MiB, checked
#   run tool: carry [".whl"], command "bash bench/gpu/run.sh" (README, section GPU)
# The wheels are for the image's CPython 3.12 on x86-64, downloaded without dependencies:
# bench/gpu/wheels.txt lists every package needed, bench/gpu/check_wheels.py checks that each
# wheel's requirements are on the image (bench/gpu/image_packages.txt) or carried, and that the
# folder fits the device call's 64 MiB (with the working tree, about 13 MiB).
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=${1:-.whl}
# any Python with pip and packaging (the project's .venv where there is one)
if [[ -x .venv/bin/python ]]; then PYTHON=${PYTHON:-.venv/bin/python}; else PYTHON=${PYTHON:-python3}; fi
PLATFORMS=(--python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
rm -rf "$DEST"
mkdir -p "$DEST"
# wheels.txt's names at the versions requirements-cuda.txt pins ("# build": PyPI has source only)
mapfile -t download < <("$PYTHON" bench/gpu/check_wheels.py --pins download)
mapfile -t build < <("$PYTHON" bench/gpu/check_wheels.py --pins build)
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: "${PLATFORMS[@]}" -d "$DEST" "${download[@]}"
"$PYTHON" -m pip wheel -q --no-deps -w "$DEST" "${build[@]}"
"$PYTHON" bench/gpu/check_wheels.py "$DEST"
