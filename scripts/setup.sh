#!/usr/bin/env bash
# Create .venv in the repo root and install exactly the lock into it: torch (requirements/torch.txt),
# then every other package at the version and sha256 of requirements/lock.txt (pip --require-hashes,
# --no-deps: nothing is resolved at install time), then this repo (editable, no dependencies).
# Idempotent: rerunning is fast. The last lines say which torch build arrived and that the venv
# equals the lock (a venv that does not is reported and the script fails).
#
#   bash scripts/setup.sh                                   # CPU machine (this dev/CI machine)
#   STAGE1_TORCH_INDEX=https://download.pytorch.org/whl/cu128 STAGE1_GPU=1 bash scripts/setup.sh
#
# Which torch *build* arrives is the machine's torch source, not the lock: on these development and
# CI machines pip's configured wheel folder supplies the CPU wheel; elsewhere PyPI's default (a
# multi-GB CUDA build on Linux x86_64). STAGE1_TORCH_INDEX (any index URL) installs torch from there
# first. STAGE1_GPU=1 adds requirements/gpu.lock (bitsandbytes, for QLoRA). To move a dependency on
# purpose: bash scripts/lock.sh (docs/install.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
TORCH="$(cat requirements/torch.txt)"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
pipi() { quiet .venv/bin/python -m pip install -q --disable-pip-version-check "$@"; }
if [ -n "${STAGE1_TORCH_INDEX:-}" ]; then
  pipi "$TORCH" --index-url "$STAGE1_TORCH_INDEX"
else
  pipi "$TORCH"
fi
pipi --require-hashes --no-deps -r requirements/lock.txt
if [ "${STAGE1_GPU:-0}" = "1" ]; then
  pipi --require-hashes --no-deps -r requirements/gpu.lock
fi
# the project itself: no dependencies (they are the lock), built with the lock's setuptools
pipi --no-deps --no-build-isolation -e .
build=$(.venv/bin/python -c "import torch; print(f'torch {torch.__version__}, ' + (f'CUDA {torch.version.cuda} build' if torch.version.cuda else 'CPU build'))")
echo "stage1: installed into $(pwd)/.venv ($build)" >&2
.venv/bin/python scripts/check_lock.py
