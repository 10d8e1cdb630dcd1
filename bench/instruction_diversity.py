"""Benchmark: instruction diversity options on the embedded model (phases 1-2 only; not a test).

    .venv/bin/python bench/instruction_diversity.py [--options baseline,machine2,temp1.0] [--seeds 42,1,2]
                                                    [--rounds 3] [--out FILE]

For each option (a config overlay over configs/pilot.yaml) and each seed, runs `--rounds` instruction
rounds (generate + filter, exactly the pilot's phase functions, one process, the model loaded once)
into a fresh folder and counts, over every instruction generated: the near-duplicate share
(`instruction_filter` rejections with reason `near_duplicate` or `copies_seed`, as the gate counts them), instruction acceptance (yield: kept /
generated), the instruction critic's acceptance (kept / judged by the critic, the gate's quality bar)
and every rejection reason. Runs on the device `model.device: auto` picks (the H200 with the device tool). The table in docs/metrics.md comes from its JSON (means over
the seeds). Acceptance and near-duplicates do not depend on the machine's load; the seconds do.

Writes JSON (default bench/results/instruction_diversity-<date>.json) and prints one line per run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from datetime import date
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
for k, v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "USE_HUB_KERNELS": "0", "DO_NOT_TRACK": "1"}.items():
    os.environ.setdefault(k, v)

OPTIONS = {
    "baseline": {"instruction_generation": {"temperature": 0.7, "top_p": 0.9, "machine_examples": 0}},
    "temp0.9": {"instruction_generation": {"temperature": 0.9}},
    "temp1.1": {"instruction_generation": {"temperature": 1.1}},
    "temp1.2": {"instruction_generation": {"temperature": 1.2}},
    "temp1.0+top_p0.95": {"instruction_generation": {"temperature": 1.0, "top_p": 0.95}},
    "machine2": {"instruction_generation": {"machine_examples": 2}},
    "temp1.0": {"instruction_generation": {"temperature": 1.0}},
    "machine2+temp1.0": {"instruction_generation": {"machine_examples": 2, "temperature": 1.0}},
    # the model's dtype at the default temperature: `auto` is bfloat16 on a GPU, float32 on the CPU
    "temp1.0+fp32": {"instruction_generation": {"temperature": 1.0}, "model": {"dtype": "float32"}},
    "temp1.0+bf16": {"instruction_generation": {"temperature": 1.0}, "model": {"dtype": "bfloat16"}},
    "temp0.9+fp32": {"instruction_generation": {"temperature": 0.9}, "model": {"dtype": "float32"}},
}


def run_option(name: str, seed: int, rounds: int, root: Path) -> dict:
    from stage1_core.phases import pipeline, qc, run
    from stage1_core.phases.options import PilotOptions
    from stage1_core.phases.plans import RunMeta
    from stage1_core.infra import jsonl

    cfg_path = root / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(OPTIONS[name]))
    plan = run.prepare_pilot(PilotOptions(output=str(root / f"{name}-seed{seed}"), config=str(cfg_path), seed=seed,
                                          count=100))
    run.claim_output(plan, "bench")
    meta = RunMeta(run_id="bench", config_hash=plan.config_hash)
    kept, generated, reasons, tokens = None, 0, Counter(), 0
    t0 = time.perf_counter()
    for rnd in range(1, rounds + 1):
        g = pipeline.run_phase(run.make_call(plan, "generate_instructions", meta=meta, round=rnd,
                                             inputs=run.instruction_inputs(plan.config.instruction_generation, kept)))
        f = pipeline.run_phase(run.make_call(plan, "filter_instructions", meta=meta, round=rnd,
                                             inputs={"generated": g.outputs["generated"], "kept_before": kept}))
        kept = f.outputs["kept"]
        generated += g.generated
        tokens += g.tokens
        reasons.update(r["reason"] for r in jsonl.read_rows(f.outputs["rejected"].path))
    n_kept = f.kept_total
    judged = n_kept + reasons.get("critic", 0)
    near = sum(reasons.get(r, 0) for r in qc.NEAR_DUPLICATE_REASONS)  # as the gate's near_duplicate_share counts
    return {"option": name, "overlay": OPTIONS[name], "seed": seed, "rounds": rounds, "generated": generated,
            "kept": n_kept, "acceptance": round(n_kept / generated, 4) if generated else None,
            "critic_judged": judged, "critic_acceptance": round(n_kept / judged, 4) if judged else None,
            "near_duplicates": near,
            "near_duplicate_share": round(near / generated, 4) if generated else None,
            "rejections": dict(reasons.most_common()), "tokens": tokens,
            "seconds": round(time.perf_counter() - t0, 1)}


def write_result(a: argparse.Namespace, runs: list[dict]) -> dict:
    """Write the JSON of the runs so far (means per option over its seeds); returns it."""
    import torch

    means = {}
    for name in dict.fromkeys(r["option"] for r in runs):
        rs = [r for r in runs if r["option"] == name]
        means[name] = {"seeds": [r["seed"] for r in rs],
                       "acceptance": round(statistics.fmean(r["acceptance"] for r in rs), 4),
                       "critic_acceptance": round(statistics.fmean(r["critic_acceptance"] for r in rs), 4),
                       "critic_acceptance_min": min(r["critic_acceptance"] for r in rs),
                       "acceptance_min": min(r["acceptance"] for r in rs),
                       "near_duplicate_share": round(statistics.fmean(r["near_duplicate_share"] for r in rs), 4),
                       "generated_per_run": round(statistics.fmean(r["generated"] for r in rs), 1),
                       "seconds_per_run": round(statistics.fmean(r["seconds"] for r in rs), 1)}
    result = {"benchmark": "instruction_diversity", "date": date.today().isoformat(), "note": a.note,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)",
              "model": "embedded:gemma-3-270m", "rounds_per_run": a.rounds, "seeds": a.seeds, "means": means,
              "runs": runs}
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--options", default="baseline,temp0.9,temp1.0,temp1.1")
    ap.add_argument("--seeds", default="42,1,2,3,4")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--note", default="nothing else running")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / f"instruction_diversity-{date.today().isoformat()}.json"))
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="stage1-diversity-"))
    runs: list[dict] = []
    for name in a.options.split(","):
        for seed in (int(s) for s in a.seeds.split(",")):
            r = run_option(name, seed, a.rounds, root)
            runs.append(r)
            print(json.dumps({k: r[k] for k in ("option", "seed", "generated", "kept", "acceptance", "critic_acceptance",
                                                "near_duplicate_share", "seconds")}), flush=True)
            write_result(a, runs)  # after every run: a crash keeps what was measured
    print(json.dumps(write_result(a, runs)["means"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
