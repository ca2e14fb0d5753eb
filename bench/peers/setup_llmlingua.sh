#!/usr/bin/env bash
# Creates the llmlingua peer environment: llmlingua 0.2.2 feeds the model its KV cache back as
# a list of [k, v] lists, which Llama models convert only up to transformers 4.47 (4.57 and 5
# fail: 'list' object has no attribute 'get_seq_length'). It never shares packages with the
# project venv.
#   bash bench/peers/setup_llmlingua.sh [VENV_DIR]   (default: bench/peers/.venv-llmlingua)
set -euo pipefail
VENV="${1:-$(dirname "$0")/.venv-llmlingua}"
PYTHON="${PYTHON:-python3}"
if [ -f "$VENV/.installed" ]; then
  echo "llmlingua peer environment ready: $VENV"
  exit 0
fi
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first, pinned to the CPU build, unless the caller points at a venv that has one
"$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q "llmlingua==0.2.2" "transformers>=4.45,<4.48"
touch "$VENV/.installed"
echo "llmlingua peer environment ready: $VENV"
