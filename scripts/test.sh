#!/usr/bin/env bash
# Set up and run the test suite (CPU, excludes tests marked slow or gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,slurm,optuna
export HETERO_CACHE_DIR=${HETERO_CACHE_DIR:-$PWD/.cache/tests}
.venv/bin/python -m pytest -q "$@"
