#!/usr/bin/env bash
# The llmlingua peer environment: llmlingua 0.2.2 feeds the model its KV cache back as a list
# of [k, v] lists, which Llama models convert only up to transformers 4.47 (4.57 and 5 fail:
# 'list' object has no attribute 'get_seq_length').
#   bash bench/peers/setup_llmlingua.sh [VENV_DIR]   (default: bench/peers/.venv-llmlingua)
set -euo pipefail
HERE="$(dirname "$0")"
bash "$HERE/setup_venv.sh" "${1:-$HERE/.venv-llmlingua}" "llmlingua==0.2.2" "transformers>=4.45,<4.48"
