#!/usr/bin/env bash
# The first thing to run on any CUDA machine (under 8 minutes on one H100-class GPU): every model's
# fast_dev_run on CUDA in bf16-mixed, one throughput measurement per model at box 128 (256 too for
# OPUS-DSD and DynaMight), the particle loader; JSON in docs/gpu_check.json and a Markdown table
# with the GPU model in docs/benchmarks.md. See benchmarks/gpu_check.py (--dry-run checks it on a CPU).
# Python: ./.venv if present, else a python3 that already has torch (hetero is put on PYTHONPATH),
# else scripts/setup.sh creates ./.venv (needs the package index).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
elif python3 -c "import torch, lightning, hydra" >/dev/null 2>&1; then
  PY=python3
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
else
  bash scripts/setup.sh
  PY=.venv/bin/python
fi
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() or '--dry-run' in sys.argv else 'no CUDA device: run on a GPU machine, or pass --dry-run')" "$@"
export PYTHONUNBUFFERED=1 HETERO_CACHE_DIR=${HETERO_CACHE_DIR:-$PWD/.cache}
# the tests that need a CUDA device (pytest -m gpu; seconds)
if [[ " $* " != *" --dry-run "* ]]; then
  timeout 120 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests || echo "gpu tests FAILED (see above)"
fi
exec timeout 480 "$PY" benchmarks/gpu_check.py "$@"
