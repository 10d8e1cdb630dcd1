#!/usr/bin/env bash
# GPU smoke run, part of the upgrade ritual (docs/install.md): after `bash scripts/lock.sh` moves a
# dependency, run this on a GPU before the new lock is committed. It runs, as a new user would and
# with HF_HUB_OFFLINE=1 and nothing else of ours set:
#   1. the README's first command on the embedded model (python -m flows.pilot --count 100 --seed 42),
#   2. SFT then eval on that run (--force: the gate may not have said scale),
#   3. one random-weight 4B engine record (bench/gpu_engine.py --models 4b --batches 256),
# and writes bench/results/gpu_smoke-<date>.json: the lock's sha256, package versions, the GPU, each
# step's exit code and seconds, the gate decision and the engine record.
#
#   bash bench/gpu_smoke.sh [WORK_DIR] [RESULT_JSON]
#
# On the lent H200 (device tool): `../shared/tools/gpu-pack` carries the wheels of .venv, which
# scripts/check_lock.py has shown equal to requirements/lock.txt, plus the embedded model; then run
# this with PYTHONPATH set as gpu-pack prints. Needs a CUDA GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
WORK="${1:-/root/stage1-smoke}"
RESULT="${2:-bench/results/gpu_smoke-$(date -u +%F).json}"
PY="${PYTHON:-python3}"
rm -rf "$WORK" && mkdir -p "$WORK"
# only what a user is told to set: the hub is offline. No USE_HUB_KERNELS, no TRANSFORMERS_OFFLINE.
unset USE_HUB_KERNELS TRANSFORMERS_OFFLINE
export HF_HUB_OFFLINE=1
source bench/gpu_steps.sh
step pilot "$PY" -m flows.pilot --count 100 --output "$WORK/pilot" --seed 42
step sft "$PY" -m flows.sft --data "$WORK/pilot" --output "$WORK/pilot-sft" --force
step eval "$PY" -m flows.eval --adapter "$WORK/pilot-sft" --output "$WORK/pilot-eval"
step engine_4b "$PY" bench/gpu_engine.py --models 4b --batches 256 --out "$WORK/engine.json"
"$PY" - "$WORK" "$RESULT" <<'PY'
import os, sys
from pathlib import Path
sys.path.insert(0, "bench")
from gpu_record import environment, load, steps, write
work, result = Path(sys.argv[1]), Path(sys.argv[2])
qc = load(work / "pilot" / "qc_summary.json") or {}
report = load(work / "pilot-eval" / "eval_report.json") or {}
engine = (load(work / "engine.json") or {}).get("records", [])
rec = {"kind": "gpu_smoke",
       **environment(("torch", "transformers", "tokenizers", "kernels", "accelerate", "peft", "bitsandbytes",
                      "huggingface_hub", "numpy", "gguf", "prefect", "pydantic")),
       "env": {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "USE_HUB_KERNELS", "TRANSFORMERS_OFFLINE")},
       "steps": steps(work), "pilot_gate": (qc.get("gate") or {}).get("decision"),
       "pilot_pairs_kept": (qc.get("counts") or {}).get("pairs_kept"),
       "eval_stop_rate": {k: (report.get(k) or {}).get("stop_rate") for k in ("base", "tuned")},
       "engine_4b": engine[0] if engine else None}
write(result, rec)
PY
