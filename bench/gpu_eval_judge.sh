#!/usr/bin/env bash
# The eval flow with a 4B random-weight judge on a GPU (issue 22: a smoke test of the judge path; random
# weights mean the verdicts are noise, only that the path runs and how long it takes is measured).
# It runs, each step with its own Prefect home and a time limit:
#   1. the pilot on the embedded model (python -m flows.pilot --count 100 --seed 42),
#   2. SFT on that run (--force: the gate may not have said scale),
#   3. eval of the adapter with `judge: {model: random:gemma3-4b}` merged over configs/eval.yaml,
# and writes bench/results/eval_judge_gpu-<date>.json (or RESULT_JSON): each step's exit code and
# seconds, the report's judge section and win rate, the GPU, the lock's sha256, package versions.
#
#   bash bench/gpu_eval_judge.sh [WORK_DIR] [RESULT_JSON] [JUDGE]
#
# On the lent GPU machine: `../shared/tools/gpu-pack`, then run this with PYTHONPATH set as it prints.
set -uo pipefail
cd "$(dirname "$0")/.."
WORK="${1:-/root/stage1-judge}"
RESULT="${2:-bench/results/eval_judge_gpu-$(date -u +%F).json}"
JUDGE="${3:-random:gemma3-4b}"
PY="${PYTHON:-python3}"
export STEP_LIMIT_S="${STEP_LIMIT_S:-420}" STEP_PREFECT_HOMES=1 STEP_TAIL=40
rm -rf "$WORK" && mkdir -p "$WORK"
export HF_HUB_OFFLINE=1 DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
printf 'judge:\n  model: "%s"\n' "$JUDGE" > "$WORK/judge.yaml"
source bench/gpu_steps.sh  # each step with its own PREFECT_HOME and the time limit above
step pilot "$PY" -m flows.pilot --count 100 --output "$WORK/pilot" --seed 42
step sft "$PY" -m flows.sft --data "$WORK/pilot" --output "$WORK/sft" --force
step eval "$PY" -m flows.eval --adapter "$WORK/sft" --output "$WORK/eval" --config "$WORK/judge.yaml"
"$PY" - "$WORK" "$RESULT" "$JUDGE" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "bench")
from gpu_record import environment, load, steps, write
work, result, judge = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
qc = load(work / "pilot" / "qc_summary.json") or {}
report = load(work / "eval" / "eval_report.json") or {}
win = report.get("win_rate") or {}
rec = {"kind": "eval_judge_gpu", "judge_requested": judge,
       "commands": ["python -m flows.pilot --count 100 --output W/pilot --seed 42",
                    "python -m flows.sft --data W/pilot --output W/sft --force",
                    f"python -m flows.eval --adapter W/sft --output W/eval --config W/judge.yaml  # judge: {{model: {judge}}}"],
       **environment(("torch", "transformers", "accelerate", "peft", "prefect", "pydantic")),
       "steps": steps(work), "pilot_gate": (qc.get("gate") or {}).get("decision"),
       "pilot_pairs_kept": (qc.get("counts") or {}).get("pairs_kept"),
       "judge": report.get("judge"),
       "win_rate": {k: win.get(k) for k in ("tuned_over_base", "tuned_over_base_ci", "position_consistency")
                    if k in win} or None,
       "eval_seconds": report.get("seconds"),
       "eval_stop_rate": {k: (report.get(k) or {}).get("stop_rate") for k in ("base", "tuned")}}
write(result, rec)
PY
