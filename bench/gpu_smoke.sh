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
step() {  # name, command...: run it, log to WORK/name.log, record rc and seconds in WORK/steps.tsv
  local name=$1; shift
  local t0=$(date +%s%N)
  "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( ($(date +%s%N) - t0) / 1000000 ))" >> "$WORK/steps.tsv"
  echo "# $name: exit $rc"; tail -n 25 "$WORK/$name.log"
}
step pilot "$PY" -m flows.pilot --count 100 --output "$WORK/pilot" --seed 42
step sft "$PY" -m flows.sft --data "$WORK/pilot" --output "$WORK/pilot-sft" --force
step eval "$PY" -m flows.eval --adapter "$WORK/pilot-sft" --output "$WORK/pilot-eval"
step engine_4b "$PY" bench/gpu_engine.py --models 4b --batches 256 --out "$WORK/engine.json"
"$PY" - "$WORK" "$RESULT" <<'PY'
import hashlib, importlib.metadata as md, json, os, platform, sys
from pathlib import Path
work, result = Path(sys.argv[1]), Path(sys.argv[2])
def version(d):
    try:
        return md.version(d)
    except md.PackageNotFoundError:
        return None
def load(p):
    try:
        return json.loads(Path(p).read_text())
    except (OSError, ValueError):
        return None
import torch
steps = {}
for line in (work / "steps.tsv").read_text().splitlines():
    name, rc, secs = line.split("\t")
    steps[name] = {"exit_code": int(rc), "seconds": round(int(secs) / 1000, 1)}
qc = load(work / "pilot" / "qc_summary.json") or {}
report = load(work / "pilot-eval" / "eval_report.json") or {}
engine = (load(work / "engine.json") or {}).get("records", [])
lock = Path("requirements/lock.txt")
rec = {"kind": "gpu_smoke", "lock_sha256": hashlib.sha256(lock.read_bytes()).hexdigest(),
       "python": platform.python_version(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
       "env": {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "USE_HUB_KERNELS", "TRANSFORMERS_OFFLINE")},
       "packages": {d: version(d) for d in ("torch", "transformers", "tokenizers", "kernels", "accelerate", "peft",
                                            "bitsandbytes", "huggingface_hub", "numpy", "gguf", "prefect", "pydantic")},
       "steps": steps, "pilot_gate": (qc.get("gate") or {}).get("decision"),
       "pilot_pairs_kept": (qc.get("counts") or {}).get("pairs_kept"),
       "eval_stop_rate": {k: (report.get(k) or {}).get("stop_rate") for k in ("base", "tuned")},
       "engine_4b": engine[0] if engine else None}
result.parent.mkdir(parents=True, exist_ok=True)
tmp = result.with_name(result.name + ".tmp")
tmp.write_text(json.dumps(rec, indent=1))
os.replace(tmp, result)
print(json.dumps(rec, indent=1))
PY
