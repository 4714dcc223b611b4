#!/usr/bin/env bash
# The main job on the built-in synthetic dataset: set up, train OPUS-DSD, analyse, and score
# the result against the synthetic ground truth. Prints where report.html is.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HETERO_CACHE_DIR=${HETERO_CACHE_DIR:-$PWD/.cache}
RUN_DIR=${RUN_DIR:-logs/demo/$(date +%Y-%m-%d_%H-%M-%S)}
.venv/bin/python train.py +experiment=demo hydra.run.dir="$RUN_DIR" "$@"
.venv/bin/python analyze.py run_dir="$RUN_DIR" n_clusters=20
