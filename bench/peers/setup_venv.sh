#!/usr/bin/env bash
# Creates a peer's own environment (never shared with the project venv): torch first, pinned
# to the CPU build unless the venv already has one, then the given requirements.
#   bash bench/peers/setup_venv.sh VENV_DIR REQUIREMENT...
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: bash bench/peers/setup_venv.sh VENV_DIR REQUIREMENT..." >&2
  exit 2
fi
VENV="$1"
shift
PYTHON="${PYTHON:-python3}"
if [ -f "$VENV/.installed" ]; then
  echo "peer environment ready: $VENV"
  exit 0
fi
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q "$@"
touch "$VENV/.installed"
echo "peer environment ready: $VENV"
