"""Benchmark: the 100-example pilot on the CPU with the embedded model (not a test).

    .venv/bin/python bench/pilot_cpu.py [--count 100] [--out bench/results/pilot_cpu.json] [--skip-cold]

Measures, in one run: model load cold (GGUF parse + dequantize + cache write, fresh cache dir, in a
subprocess) and warm (from the cached HF folder, in a subprocess), then one pilot iteration
(--max-iterations 0) in-process with the model already loaded: wall time per phase, tokens,
tokens/s, and Prefect overhead = flow wall time - phase compute. Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
for k, v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "1",
             "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}.items():
    os.environ.setdefault(k, v)

LOAD_SNIPPET = ("import time,json;t=time.perf_counter();from stage1_core.model import load_backend;"
                "from stage1_core.config import ModelConfig;b=load_backend(ModelConfig());"
                "print(json.dumps({'seconds':time.perf_counter()-t,'load_seconds':b.fingerprint.get('load_seconds')}))")


def timed_load(cache_dir: str | None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if cache_dir:
        env["STAGE1_CACHE_DIR"] = cache_dir
    r = subprocess.run([sys.executable, "-c", LOAD_SNIPPET], env=env, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "pilot_cpu.json"))
    ap.add_argument("--skip-cold", action="store_true", help="skip the ~2 min cold GGUF load")
    args = ap.parse_args()

    import torch

    result: dict = {"count": args.count, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    if not args.skip_cold:
        with tempfile.TemporaryDirectory() as cold:
            result["load_cold"] = timed_load(cold)
    result["load_warm"] = timed_load(None)

    from flows.pilot import pilot
    from stage1_core.config import ModelConfig
    from stage1_core.model import load_backend

    from prefect import flow

    @flow(name="stage1-bench-warmup")
    def warmup() -> None:
        return None

    t0 = time.perf_counter()
    warmup()  # starts the ephemeral Prefect server (when no PREFECT_API_URL is set)
    result["prefect_server_start_seconds"] = round(time.perf_counter() - t0, 2)
    load_backend(ModelConfig())  # process cache warm: phase compute excludes loading
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pilot"
        t0 = time.perf_counter()
        res = pilot(count=args.count, output=str(out), seed=args.seed, max_iterations=0)
        flow_wall = time.perf_counter() - t0
        manifest = json.loads((out / "session_manifest.json").read_text())
        summary = json.loads((out / "qc_summary.json").read_text())
    phases = manifest["timings"]["phases"]
    compute = sum(phases.values())
    tokens = manifest["tokens"]
    gen_seconds = sum(v for k, v in phases.items() if k.startswith("generate_"))
    result.update({
        "decision": res["decision"], "kept": res["kept"], "counts": summary["counts"],
        "phase_seconds": phases, "phase_compute_seconds": round(compute, 2), "flow_wall_seconds": round(flow_wall, 2),
        "prefect_overhead_seconds": round(flow_wall - compute, 2),
        "prefect_overhead_fraction": round((flow_wall - compute) / flow_wall, 4),
        "tokens": tokens, "generation_tokens_per_second": round(tokens["total"] / gen_seconds, 1) if gen_seconds else None,
        "note": "the ephemeral server is started before timing (prefect_server_start_seconds)",
    })
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
