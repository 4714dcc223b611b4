#!/usr/bin/env bash
# Create ./.venv (once) and install hetero with its test tools into it.
# Usage: bash scripts/setup.sh [extras]   (default "dev"; the test command adds slurm,optuna)
# torch comes from the normal package index: on a CUDA machine that is the CUDA build, and an
# already-installed torch is kept (pyproject only asks for torch>=2.3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRAS=${1:-dev}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
# Without a GPU, prefer a CPU build of PyTorch when none is installed yet (a plain `torch`
# requirement pulls a multi-GB CUDA build on Linux). With a GPU, the normal resolution applies.
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1 && ! command -v nvidia-smi >/dev/null 2>&1; then
  .venv/bin/python -m pip install --quiet "torch==2.13.0" 2>/dev/null \
    || .venv/bin/python -m pip install --quiet torch --index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
    || true
fi
.venv/bin/python -m pip install --quiet -e ".[${EXTRAS}]"
