"""Benchmark: LoRA SFT and the eval on the CPU with the embedded model, as a user runs them (not a test).

    .venv/bin/python bench/sft_cpu.py --data RUN_DIR [--force] [--sft-config FILE] [--eval-config FILE] [--out FILE]

Runs `python -m flows.sft --data RUN_DIR --output TMP/sft` and then
`python -m flows.eval --adapter TMP/sft --output TMP/eval` in subprocesses (warm model cache, each
with its ephemeral Prefect server), one after the other, and records:
- SFT: wall seconds end to end, optimizer steps, steps/s and tokens/s over the training loop (tokens =
  non-padding tokens the model read), peak memory (process max RSS), train and eval loss;
- eval: wall seconds, and the report's base / tuned metrics and win rate.
Run it with nothing else running on the machine (say so in the JSON's `note` if something was).

Writes JSON (default bench/results/sft_cpu-<date>.json) and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "USE_HUB_KERNELS": "0", "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def _run(args: list[str]) -> float:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env={**os.environ, **ENV, "PYTHONPATH": str(REPO)},
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(args)} exited {r.returncode}:\n{r.stderr[-4000:]}")
    return round(time.perf_counter() - t, 2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="a finished pilot or scale folder")
    ap.add_argument("--force", action="store_true", help="train even though its gate did not say scale")
    ap.add_argument("--sft-config", default=None)
    ap.add_argument("--eval-config", default=None)
    ap.add_argument("--note", default="nothing else running")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / f"sft_cpu-{date.today().isoformat()}.json"))
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="stage1-sft-bench-"))
    sft_args = ["flows.sft", "--data", a.data, "--output", str(tmp / "sft")] + (["--force"] if a.force else []) \
        + (["--config", a.sft_config] if a.sft_config else [])
    sft_wall = _run(sft_args)
    s = json.loads((tmp / "sft" / "training_summary.json").read_text())
    eval_args = ["flows.eval", "--adapter", str(tmp / "sft"), "--output", str(tmp / "eval")] \
        + (["--config", a.eval_config] if a.eval_config else [])
    eval_wall = _run(eval_args)
    r = json.loads((tmp / "eval" / "eval_report.json").read_text())
    keys = ("stop_rate", "empty_rate", "runaway_rate", "token_limit_rate", "mean_tokens", "verifiable_accuracy",
            "perplexity")
    result = {
        "benchmark": "sft_cpu", "date": date.today().isoformat(), "note": a.note,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "commands": [" ".join(["python", "-m", *sft_args]), " ".join(["python", "-m", *eval_args])],
        "sft": {"wall_seconds": sft_wall, "model": s["base_model"]["id"], "pairs": s["dataset"]["pairs"],
                "train_pairs": s["dataset"]["train_pairs"], "eval_pairs": s["dataset"]["eval_pairs"],
                "gate": s["dataset"]["gate"], "steps": s["steps"], "epochs": s["epochs"],
                "train_seconds": s["train_seconds_this_run"], "model_load_seconds": s["model_load_seconds"],
                "steps_per_s": round(s["steps"] / s["train_seconds_this_run"], 4),
                "tokens_per_s": s["tokens_per_s"], "tokens_trained": s["tokens_trained_this_run"],
                "peak_memory_bytes": s["peak_memory_bytes"], "peak_memory_kind": s["peak_memory_kind"],
                "train_loss": s["train_loss"], "eval_loss_per_epoch": s["eval_loss_per_epoch"],
                "hyperparameters": s["hyperparameters"]},
        "eval": {"wall_seconds": eval_wall, "prompts": r["prompts"]["n"], "with_checker": r["prompts"]["with_checker"],
                 "settings": {k: r["settings"][k] for k in ("max_new_tokens", "stop_sequences", "temperature")},
                 "base": {k: r["base"][k] for k in keys}, "tuned": {k: r["tuned"][k] for k in keys},
                 "base_ci": {k: r["base"][f"{k}_ci"] for k in keys}, "tuned_ci": {k: r["tuned"][f"{k}_ci"] for k in keys},
                 "win_rate": r["win_rate"], "seconds": r["seconds"]},
        "files": str(tmp),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
