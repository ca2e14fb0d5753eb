#!/usr/bin/env bash
# Creates the kvpress peer environment (kvpress 0.5.5 needs transformers < 5.3, which the
# project's environment does not have). It never shares packages with the project venv.
#   bash bench/peers/setup_kvpress.sh [VENV_DIR]   (default: bench/peers/.venv-kvpress)
set -euo pipefail
VENV="${1:-$(dirname "$0")/.venv-kvpress}"
PYTHON="${PYTHON:-python3}"
if [ -f "$VENV/.installed" ]; then
  echo "kvpress peer environment ready: $VENV"
  exit 0
fi
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first, pinned to the CPU build, unless the caller points at a venv that has one
"$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q "kvpress==0.5.5" "transformers>=4.56,<5.3"
touch "$VENV/.installed"
echo "kvpress peer environment ready: $VENV"
