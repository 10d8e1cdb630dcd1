"""Benchmark: a scale run that loses a gpu worker mid-shard, against the same run undisturbed (not a test).

    .venv/bin/python bench/scale_out.py [--shards 12] [--workers 3] [--silence-s 40] [--fake-delay 0.3] [--out FILE]

One local stack (`deployments.stack up` with one `gpu` worker per id 0..workers-1 on the fake backend,
flow-run heartbeats every 30 s, the zombie-run automation at `--silence-s`), then two `stage1/scale`
deployment runs of the same parameters (`count = shards`, `shard_size` 1, `model fake:4`, seed 7) into
two folders:

1. undisturbed: timed from submission to the final state (`undisturbed_s`);
2. lost worker: once one shard is complete, one gpu worker and the flow-run process it started are
   SIGKILLed while that process holds a shard's lock; nothing else is done (`wall_s`).

The record (kind `lost_worker`): shards, workers, killed_workers, undisturbed_s, wall_s, attempts_max (the
most attempts any shard's manifest records), completed (the lost-worker run ended Completed), exactly_once
(its scale_data.jsonl equals the undisturbed run's row for row and no row id repeats), and what else ran on
the machine. The multi-GPU records of the issue ({model, gpus, prompts_per_s, scaling_efficiency,
exactly_once, gpu_util} at 1, 2 and N GPUs) need a machine with several GPUs: none was lent when this
was written (`gpus_lent` says so). Writes JSON (default bench/results/scale_out-<date>.json) and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "USE_HUB_KERNELS": "0", "DO_NOT_TRACK": "1",
                   "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})

from tests.deploy import lost_worker as lw  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _others() -> list[str]:
    """Other busy processes on the machine (not ours), as `%cpu command`, for the record."""
    out = subprocess.run(["ps", "-eo", "pid,ppid,pcpu,args", "--sort=-pcpu"], capture_output=True, text=True).stdout
    table = [line.split(None, 3) for line in out.splitlines()[1:] if len(line.split(None, 3)) == 4]
    ours, grew = {os.getpid()}, True
    while grew:
        before = len(ours)
        ours |= {int(pid) for pid, ppid, *_ in table if int(ppid) in ours}
        grew = len(ours) > before
    return [f"{cpu}% {args[:120]}" for pid, _, cpu, args in table
            if int(pid) not in ours and float(cpu) >= 5.0 and "ps -eo" not in args][:8]


def _attempts(out: Path) -> dict[int, int]:
    return {json.loads(m.read_text())["shard"]: len(json.loads(m.read_text()).get("attempts") or [None])
            for m in (out / "shards").glob("*.manifest.json")}


def measure(shards: int, workers: int, silence_s: int, fake_delay: float, work: Path) -> dict:
    state, params = work / "stack", {"count": shards, "shard_size": 1, "model": "fake:4", "seed": 7}
    load_before = os.getloadavg()
    t = time.perf_counter()
    with lw.lost_worker_stack(state, _free_port(), workers=workers, silence_s=silence_s, fake_delay=fake_delay) as env:
        stack_up_s = round(time.perf_counter() - t, 1)
        base = lw.run_scale(env, state, work / "undisturbed", params, kill=False)
        others = _others()
        lost = lw.run_scale(env, state, work / "lost", params, kill=True)
        others += [o for o in _others() if o not in others]
        children = lw.shard_runs(lost["flow_run"].id)
    a, b = work / "undisturbed" / "scale_data.jsonl", work / "lost" / "scale_data.jsonl"
    same = a.is_file() and b.is_file() and lw.comparable(a) == lw.comparable(b)
    ids = [r["id"] for r in lw.rows(b)] if b.is_file() else []
    attempts = _attempts(work / "lost")
    killed = lost["killed"]
    shard_times = [json.loads(m.read_text())["seconds"] for m in (work / "undisturbed" / "shards").glob("*.manifest.json")]
    return {
        "kind": "lost_worker", "shards": shards, "workers": workers, "killed_workers": 1 if killed else 0,
        "undisturbed_s": base["wall_s"], "wall_s": lost["wall_s"],
        "attempts_max": max(attempts.values(), default=0),
        "completed": bool(lost["flow_run"].state.is_completed()),
        "exactly_once": bool(same and len(ids) == len(set(ids)) == len(lw.rows(a))),
        "overhead_s": round(lost["wall_s"] - base["wall_s"], 2),
        "goal": {"overhead_at_most_s": round(silence_s + max(shard_times, default=0), 2),
                 "met": lost["wall_s"] - base["wall_s"] <= silence_s + max(shard_times, default=0),
                 "rule": "overhead <= silence window + one shard's compute time (the slowest undisturbed shard)"},
        "killed": killed and {**killed, "attempts_of_killed_shard": attempts.get(killed["shard"])},
        "undisturbed_completed": bool(base["flow_run"].state.is_completed()),
        "shard_runs_started": len(children),
        "shard_run_states": sorted(c.state.name for c in children if c.state),
        "rows": len(ids),
        "settings": {"silence_s": silence_s, "heartbeat_s": lw.HEARTBEAT_S, "fake_delay_s_per_prompt": fake_delay,
                     "shard_size": 1, "model": "fake:4", "seed": 7, "shard_retries": 2,
                     "worker_query_s": 1, "stack_up_s": stack_up_s},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_avg_before": [round(x, 2) for x in load_before],
                    "load_avg_after": [round(x, 2) for x in os.getloadavg()],
                    "other_processes_during": others,
                    "note": "2 CPU cores shared with other engineers (their pytest runs and benches come and go); "
                            "other_processes_during lists the busy processes not ours seen at two samples, one "
                            "after each run started; timings are noisy"},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, default=12)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--silence-s", type=int, default=lw.SILENCE_S)
    ap.add_argument("--fake-delay", type=float, default=0.3, help="seconds the fake backend sleeps per prompt")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / f"scale_out-{date.today().isoformat()}.json")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="stage1-scale-out-") as tmp:
        record = measure(a.shards, a.workers, a.silence_s, a.fake_delay, Path(tmp))
    result = {"bench": "scale_out", "date": date.today().isoformat(), "records": [record],
              "gpus_lent": "none: the device tool lent only single-GPU machines this session, so the multi-GPU "
                           "records ({model, gpus, prompts_per_s, scaling_efficiency, exactly_once, gpu_util} at 1, 2 "
                           "and N GPUs) were not measured"}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if record["completed"] and record["exactly_once"] else 1


if __name__ == "__main__":
    sys.exit(main())
