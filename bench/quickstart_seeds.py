"""Benchmark: the README's first command over several seeds, as a user runs it (not a test).

    .venv/bin/python bench/quickstart_seeds.py [--seeds 42,1,2,3,4] [--count 100] [--then sft,eval]
                                               [--config FILE] [--out FILE] [--note TEXT]

For each seed runs `python -m flows.pilot --count COUNT --output DIR --seed SEED` (plus `--then` and
`--config` when given) in a fresh process with nothing of ours set but what a user sets
(HF_HUB_OFFLINE=1), one after another, and records per seed: the exit code, the wall seconds end to
end, the gate's decision and reasons, the number of iterations and what changed between them, the
instruction rounds, the gated metrics (value, k, n) and the phase seconds. The model cache is warmed
by one load before the first seed (its one-time dequantization is not the pilot's time). Runs on the
device `model.device: auto` picks. Writes JSON (default
bench/results/quickstart_seeds-<device>-<date>.json) after every seed and prints one line per seed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
METRICS = ("instruction_critic_acceptance", "pair_critic_acceptance", "instruction_acceptance", "pair_acceptance",
           "near_duplicate_share", "runaway_rate", "token_limit_rate", "median_response_tokens",
           "critic_dev_auc_instruction", "critic_dev_auc_pair")


def one(seed: int, a: argparse.Namespace, root: Path) -> dict:
    out = root / f"pilot-seed{seed}"
    cmd = [sys.executable, "-m", "flows.pilot", "--count", str(a.count), "--output", str(out), "--seed", str(seed)]
    if a.then:
        cmd += ["--then", a.then]
    if a.config:
        cmd += ["--config", a.config]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STAGE1_", "PREFECT_"))}
    env["HF_HUB_OFFLINE"] = "1"
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = round(time.perf_counter() - t0, 1)
    rec: dict = {"seed": seed, "exit_code": proc.returncode, "wall_seconds": wall, "command": " ".join(cmd[1:])}
    try:
        summary = json.loads((out / "qc_summary.json").read_text())
        manifest = json.loads((out / "session_manifest.json").read_text())
    except (OSError, ValueError):
        rec["error"] = (proc.stdout[-1500:] + proc.stderr[-3000:])
        return rec
    rec["decision"] = summary["gate"]["decision"]
    rec["reasons"] = summary["gate"]["reasons"]
    rec["metrics"] = {m: {k: summary["metrics"][m][k] for k in ("value", "k", "n")} for m in METRICS}
    rec["counts"] = summary["counts"]
    rec["iterations"] = [{"decision": it["decision"]["decision"], "changes_for_next": it["changes_for_next"],
                          "instruction_temperature": it.get("instruction_generation", {}).get("temperature")}
                         for it in manifest["iterations"]]
    phases = manifest["timings"]["phases"]
    rec["instruction_rounds"] = sum(1 for p in phases if p.startswith("generate_instructions"))
    rec["phase_seconds"] = phases
    rec["flow_seconds"] = manifest["timings"]["flow_seconds"]
    rec["model_load_seconds"] = manifest["model"].get("load_seconds")
    rec["device"] = manifest["model"].get("device")
    if a.then:
        rec["chain"] = manifest.get("chain")
        report = out.with_name(out.name + "-eval") / "eval_report.json"
        rec["eval_report"] = report.is_file()
    return rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="42,1,2,3,4")
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--then", default=None)
    ap.add_argument("--config", default=None)
    ap.add_argument("--note", default="nothing else running")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    for k, v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "USE_HUB_KERNELS": "0", "DO_NOT_TRACK": "1"}.items():
        os.environ.setdefault(k, v)
    sys.path.insert(0, str(REPO))
    import torch

    from stage1_core.infra.config import ModelConfig
    from stage1_core.model import load_backend

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    t0 = time.perf_counter()
    load_backend(ModelConfig())  # warm the on-disk model cache (a one-time cost, not the pilot's)
    warm = round(time.perf_counter() - t0, 1)
    out = Path(a.out or REPO / "bench" / "results" /
               f"quickstart_seeds-{'gpu' if torch.cuda.is_available() else 'cpu'}-{date.today().isoformat()}.json")
    root = Path(tempfile.mkdtemp(prefix="stage1-quickstart-"))
    runs = []
    for seed in (int(s) for s in a.seeds.split(",")):
        rec = one(seed, a, root)
        runs.append(rec)
        print(json.dumps({k: rec.get(k) for k in ("seed", "exit_code", "decision", "wall_seconds", "instruction_rounds")}
                         | {"iterations": len(rec.get("iterations", []))}
                         | {m: (rec.get("metrics", {}).get(m) or {}).get("value") for m in METRICS[:5]}), flush=True)
        walls = [r["wall_seconds"] for r in runs]
        result = {"benchmark": "quickstart_seeds", "date": date.today().isoformat(), "device": device, "note": a.note,
                  "count": a.count, "then": a.then, "config": a.config, "model_cache_warm_seconds": warm,
                  "summary": {"decisions": {r["seed"]: r.get("decision") for r in runs},
                              "scale": sum(1 for r in runs if r.get("decision") == "scale"), "runs": len(runs),
                              "median_wall_seconds": statistics.median(walls), "max_iterations_used":
                                  max(len(r.get("iterations", [])) for r in runs)},
                  "runs": runs}
        out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
