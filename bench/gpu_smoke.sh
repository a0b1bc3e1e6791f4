#!/bin/sh
# The device check of issue 25 in one command: bench/gpu_smoke.py (its docstring says what it runs), from the
# repository root, with this environment's python (PYTHON overrides). Under 8 minutes on one H100 or H200.
set -e
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" bench/gpu_smoke.py "$@"
