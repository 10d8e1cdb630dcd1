"""How full the engine's decode slots stay when there are more prompts than slots (not a test).

    python bench/engine_occupancy.py [--slots 32] [--prompts 128] [--sync-every 1,8] [--compact off,on]
                                     [--repeats 3] [--out FILE]

The embedded default model (its configured device and dtype) completes the pilot's real prompts of each
generating phase with that phase's configured sampling (phase 1: few-shot list prompts; phase 3: response
prompts; gpu_engine.real_prompts), `--prompts` per phase through `--slots` slots, once per harvest interval in
`--sync-every` (1 is the CPU default, 8 the CUDA one). Rows end at their stop sequence, EOS or
`max_new_tokens`, so slots free up at different steps and are refilled while prompts wait. Per run, from
`EngineStats`: `occupancy` (the share of slot-steps that drew a token), `queued_occupancy` (the same over the
steps while prompts waited: what the wait for a harvest and the refill rule cost, the tail left out), steps,
prefill forwards, tokens, and the rows' mean and max generated lengths. Each run is done with the tail
compacted and without (`--compact`; Engine.compact_tail: once no prompt waits, the rows left decode in the
fewest slots), after one warm-up call per phase, best of `--repeats` timed calls (`seconds`), with
`compact_speedup_sync<K>` (seconds without over seconds with). The texts are the same at any slot count,
interval and compaction (the engine's seeding; `same_texts`), so the runs of one phase differ only in their
schedule.
Writes JSON, `{"records": [record]}` (default `bench/results/engine_occupancy-DATE.json`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")

from bench import gpu_engine as GE  # noqa: E402
from stage1_core.infra.config import load_pilot_config  # noqa: E402
from stage1_core.infra.provenance import lock_sha256  # noqa: E402
from stage1_core.model import load_backend  # noqa: E402


def run(backend: Any, prompts: list[str], params: Any, slots: int, sync_every: int, compact: bool,
        repeats: int) -> dict[str, Any]:
    """Generate calls through `slots` slots, harvested every `sync_every` steps, the tail compacted or not:
    the best of `repeats` (the caller warmed the engine up)."""
    eng = backend.engine()
    eng.slots_cfg, eng.sync_every, eng.compact_tail = slots, sync_every, compact
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        comps = backend.generate(prompts, params, seed=1, ids=[f"o{i}" for i in range(len(prompts))])
        times.append(time.perf_counter() - t0)
    st = eng.stats
    lens = [c.n_tokens for c in comps]
    return {"slots": st.slots, "sync_every": sync_every, "compact_tail": compact, "occupancy": st.occupancy,
            "queued_occupancy": st.queued_occupancy, "steps": st.steps, "slot_steps": st.slot_steps,
            "queued_steps": st.queued_steps, "compactions": st.compactions,
            "prefills": st.prefills, "tokens": sum(lens), "mean_new_tokens": round(sum(lens) / len(lens), 1),
            "max_new_tokens_seen": max(lens), "seconds": round(min(times), 2), "seconds_all": [round(t, 2) for t in times],
            "texts_sha256": hashlib.sha256("\x00".join(c.text for c in comps).encode()).hexdigest()[:16]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=128, help="per phase")
    ap.add_argument("--sync-every", default="1,8")
    ap.add_argument("--compact", default="off,on", help="the tail compacted or not (Engine.compact_tail): off, on, or off,on for both")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per run, best kept")
    ap.add_argument("--out", default=None)
    ap.add_argument("--note", default=None)
    a = ap.parse_args()
    cfg = load_pilot_config()
    backend = load_backend(cfg.model)
    if backend.engine() is None:
        print("the configured model does not run on the engine", file=sys.stderr)
        return 2
    both = GE.real_prompts(2 * a.prompts)  # the first half phase-1 prompts, the second phase-3 ones
    phases = {"instruction_generation": (both[: a.prompts], cfg.instruction_generation.sampling()),
              "response_generation": (both[a.prompts:], cfg.response_generation.sampling())}
    date = dt.date.today().isoformat()
    rec: dict[str, Any] = {"model": cfg.model.id, "device": backend.device, "dtype": str(next(backend.model.parameters()).dtype),
                           **GE.versions(), "lock_sha256": lock_sha256(), "date": date, "note": a.note,
                           "prompts_per_phase": a.prompts, "phases": {}}
    for phase, (prompts, params) in phases.items():
        backend.generate(prompts[: a.slots], params, seed=1, ids=[f"w{i}" for i in range(a.slots)])  # warm-up
        runs = [run(backend, prompts, params, a.slots, int(k), c == "on", a.repeats)
                for k in a.sync_every.split(",") for c in a.compact.split(",")]
        block: dict[str, Any] = {"params": params.model_dump(), "runs": runs,
                                 "same_texts": len({r["texts_sha256"] for r in runs}) == 1}
        for k in a.sync_every.split(","):
            on = [r for r in runs if r["sync_every"] == int(k) and r["compact_tail"]]
            off = [r for r in runs if r["sync_every"] == int(k) and not r["compact_tail"]]
            if on and off:
                block[f"compact_speedup_sync{k}"] = round(off[0]["seconds"] / on[0]["seconds"], 3)
        rec["phases"][phase] = block
        for r in runs:
            print(f"{phase}: slots {r['slots']} sync_every {r['sync_every']} compact {r['compact_tail']}: occupancy "
                  f"{r['occupancy']} (queued {r['queued_occupancy']}), {r['steps']} steps, {r['slot_steps']} "
                  f"slot-steps, {r['prefills']} prefills, mean {r['mean_new_tokens']} new tokens, "
                  f"{r['seconds']} s (best of {a.repeats})", flush=True)
        print({k: v for k, v in block.items() if k.startswith("compact_") or k == "same_texts"}, flush=True)
    out = Path(a.out or REPO / "bench" / "results" / f"engine_occupancy-{date}.json")
    GE.write(out, [rec])
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
