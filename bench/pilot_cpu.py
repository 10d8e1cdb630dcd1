"""Benchmark: the README quickstart on the CPU with the embedded model, end to end (not a test).

    .venv/bin/python bench/pilot_cpu.py [--count 100] [--seed 42] [--out FILE] [--skip-cold]

Measures, in one process tree, with nothing else running (say so if something was):
- `load_cold`: a model load in a fresh cache folder (GGUF assemble + dequantize + cache write), in a
  subprocess; `load_warm`: a load from the cached HF folder, in a subprocess;
- `end_to_end_seconds`: `python -m flows.pilot --count N --output DIR --seed S` as a user runs it
  (subprocess, warm model cache, ephemeral Prefect server start, every iteration, fresh output folder);
- from that run's files: seconds per phase, model load, flow time, the rest (Prefect start and
  imports), generated tokens, and the two CPU rates `--dry-run` estimates from
  (`generation_tokens_per_second` over the generation phases, `critic_prompts_per_second` over the
  instruction-filter phases: items the critic judged x prompts per item).

Writes JSON (default bench/results/pilot_cpu-<date>.json) and prints it.
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

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "USE_HUB_KERNELS": "0", "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}

LOAD_SNIPPET = ("import time,json;t=time.perf_counter();from stage1_core.model import load_backend;"
                "from stage1_core.infra.config import ModelConfig;b=load_backend(ModelConfig());"
                "print(json.dumps({'seconds':round(time.perf_counter()-t,2),'load_seconds':b.fingerprint.get('load_seconds')}))")


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, **ENV, "PYTHONPATH": str(REPO), **extra}


def timed_load(cache_dir: str | None) -> dict:
    env = _env(STAGE1_CACHE_DIR=cache_dir) if cache_dir else _env()
    r = subprocess.run([sys.executable, "-c", LOAD_SNIPPET], env=env, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def critic_prompts(out: Path, config: dict) -> tuple[int, int]:
    """(instruction items the critic judged, prompts per item) of a finished pilot folder."""
    from stage1_core.infra.config import PilotConfig
    from stage1_core.phases.critic import rubric_variants

    swaps = len(rubric_variants(PilotConfig.model_validate(config).critic, "instruction"))
    judged = 0
    for kept in sorted((out / "instructions").glob("round-*.kept.jsonl")):
        rejected = kept.with_name(kept.name.replace(".kept.", ".rejected."))
        judged += sum(1 for line in rejected.read_text().splitlines() if json.loads(line)["reason"] == "critic")
    last = sorted((out / "instructions").glob("round-*.kept.jsonl"))[-1]
    judged += sum(1 for _ in last.read_text().splitlines())  # the cumulative pool: every kept one was judged
    return judged, swaps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / f"pilot_cpu-{date.today().isoformat()}.json"))
    ap.add_argument("--skip-cold", action="store_true", help="skip the cold GGUF load (~1-2 min)")
    args = ap.parse_args()

    result: dict = {"count": args.count, "seed": args.seed, "cpu_count": os.cpu_count(), "machine": platform.processor()
                    or platform.machine(), "python": platform.python_version()}
    if not args.skip_cold:
        with tempfile.TemporaryDirectory() as cold:
            result["load_cold"] = timed_load(cold)
    result["load_warm"] = timed_load(None)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pilot"
        cmd = [sys.executable, "-m", "flows.pilot", "--count", str(args.count), "--output", str(out), "--seed", str(args.seed)]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=7200)
        wall = time.perf_counter() - t0
        if not (out / "session_manifest.json").is_file():
            raise RuntimeError(f"the pilot wrote no manifest (exit {r.returncode}):\n{r.stderr[-3000:]}")
        manifest = json.loads((out / "session_manifest.json").read_text())
        summary = json.loads((out / "qc_summary.json").read_text())
        config = yaml.safe_load((out / "config.yaml").read_text())
        judged, per_item = critic_prompts(out, config)
    phases = manifest["timings"]["phases"]
    gen_s = sum(v for k, v in phases.items() if k.startswith("generate_"))
    filt_s = sum(v for k, v in phases.items() if k.startswith("filter_instructions"))
    load_s = manifest["model"].get("load_seconds") or 0.0
    flow_s = manifest["timings"]["flow_seconds"]
    result.update({
        "command": f"python -m flows.pilot --count {args.count} --output DIR --seed {args.seed}",
        "exit_code": r.returncode, "decision": manifest["decision"]["decision"],
        "kept_pairs": summary["counts"]["pairs_kept"], "iterations": len(manifest["iterations"]),
        "end_to_end_seconds": round(wall, 1),
        "model_load_seconds": load_s, "flow_seconds": flow_s,
        "outside_flow_seconds": round(wall - flow_s - load_s, 1),
        "phase_seconds": phases, "tokens": manifest["tokens"],
        "generation_tokens_per_second": round(manifest["tokens"]["total"] / gen_s, 1) if gen_s else None,
        "critic_items_judged": judged, "critic_prompts_per_item": per_item,
        "critic_prompts_per_second": round(judged * per_item / filt_s, 1) if filt_s else None,
        "note": "filter_instructions time includes heuristics and dedup besides the critic",
    })
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
