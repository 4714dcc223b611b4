#!/usr/bin/env bash
# Create ./.venv (once) and install hetero with its test tools into it.
# torch comes from the normal package index: on a CUDA machine that is the CUDA build, and an
# already-installed torch is kept (pyproject only asks for torch>=2.3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install --quiet -e '.[dev]'
