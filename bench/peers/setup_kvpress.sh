#!/usr/bin/env bash
# The kvpress peer environment: kvpress 0.5.5 needs transformers < 5.3, which the project's
# environment does not have.
#   bash bench/peers/setup_kvpress.sh [VENV_DIR]   (default: bench/peers/.venv-kvpress)
set -euo pipefail
HERE="$(dirname "$0")"
bash "$HERE/setup_venv.sh" "${1:-$HERE/.venv-kvpress}" "kvpress==0.5.5" "transformers>=4.56,<5.3"
