#!/usr/bin/env bash
# neox's GPU paths on a machine with one CUDA GPU, in under 8 minutes: a pass/fail table with figures.
# usage: tools/gpu_check.sh [--checks NAME ...] [--json FILE] [--work-dir DIR] [--peak-tflops T] [--list]
# Exit 0: every check passed; 1: a check failed; 2: no CUDA GPU here (nothing run) or bad arguments.
# Python: $PYTHON, else the repository's .venv, else the active virtualenv, else python3.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${PYTHON:-}" ]]; then
    py=$PYTHON
elif [[ -x .venv/bin/python ]]; then
    py=.venv/bin/python
elif [[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/python" ]]; then
    py=$VIRTUAL_ENV/bin/python
else
    py=python3
fi
exec "$py" -m tools.gpu_check "$@"
