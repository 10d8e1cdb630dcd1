"""The pilot flow: five phases, the QC gate, and iterate.

Run locally (no server needed; an ephemeral Prefect server starts for the run):
    python -m flows.pilot --count 100 --output artifacts/pilot --seed 42
Exit codes: 0 scale, 3 iterate (only with --max-iterations 0), 4 halt, 2 invalid input
(nothing written), 1 unexpected error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from prefect import flow

from stage1_core import provenance, reports, run
from stage1_core.errors import InputError
from tasks import phases as t


@flow(name="stage1", flow_run_name="pilot-{count}-seed{seed}", log_prints=True)
def pilot(count: int = 100, output: str = "artifacts/pilot", seed: int = 42, seeds: str | None = None,
          config: str | None = None, model: str | None = None, max_iterations: int | None = None,
          bos_policy: str | None = None, allow_pickle: bool | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Stage 1 pilot: generate and filter instructions, generate and filter responses, QC + gate."""
    t0, started, run_id = time.perf_counter(), provenance.utc_now(), provenance.run_id()
    plan = t.prepare_run({"output": output, "config": config, "overwrite": overwrite, "count": count, "seed": seed,
                          "seeds": seeds, "model": model, "max_iterations": max_iterations, "bos_policy": bos_policy,
                          "allow_pickle": allow_pickle})
    run.claim_output(plan, run_id)
    meta = {"run_id": run_id, "git_sha": provenance.git_info(run.REPO_DIR)["sha"], "config_hash": plan["config_hash"]}
    cfg, manifests = plan["config"], []
    generated, rejected, kept = [], [], None
    for rnd in range(1, cfg["instruction_generation"]["max_instruction_rounds"] + 1):
        g = t.generate_instructions(run.make_call(plan, "generate_instructions", meta=meta, round=rnd))
        f = t.filter_instructions(run.make_call(plan, "filter_instructions", meta=meta, round=rnd, inputs={
            "generated": g["outputs"]["generated"], "kept_before": kept}))
        manifests += [g, f]
        generated.append(g["outputs"]["generated"])
        rejected.append(f["outputs"]["rejected"])
        kept = f["outputs"]["kept"]
        if f["kept_total"] >= count:
            break
    settings, iterations = cfg["response_generation"], []
    for it in range(1, cfg["max_iterations"] + 2):
        r = t.generate_responses(run.make_call(plan, "generate_responses", meta=meta, iteration=it,
                                               response_generation=settings, inputs={"kept": kept}))
        p = t.filter_pairs(run.make_call(plan, "filter_pairs", meta=meta, iteration=it,
                                         inputs={"responses": r["outputs"]["responses"]}))
        q = t.qc_gate(run.make_call(plan, "qc", meta=meta, iteration=it, response_generation=settings,
                                    extra={"critic_dev": p.get("critic_dev")}, inputs={
            "generated": generated, "instruction_rejected": rejected, "kept": kept,
            "responses": r["outputs"]["responses"], "pairs_kept": p["outputs"]["kept"],
            "pairs_rejected": p["outputs"]["rejected"]}))
        manifests += [r, p, q]
        iterations.append({"qc": q, "settings": settings})
        if q["decision"]["decision"] != "iterate":
            break
        settings, iterations[-1]["changes"], changed = run.next_response_settings(settings, q)
        iterations[-1]["next_settings"] = settings
        if it > cfg["max_iterations"] or not changed:
            break
    return t.finalize_run(plan, run_id=run_id, started=started, iterations=iterations, phase_manifests=manifests,
                          flow_seconds=round(time.perf_counter() - t0, 3))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m flows.pilot",
        description="Stage 1 pilot: turn a base model into instruction data, gated on measured quality.",
        epilog="Exit codes: 0 scale, 3 iterate (only with --max-iterations 0; writes suggested_config.yaml), "
               "4 halt (incl. iterations exhausted), 2 invalid input (nothing written), 1 unexpected error, "
               "130 interrupted. Docs: docs/quickstart.md, docs/phases.md, docs/outputs.md.")
    ap.add_argument("--count", type=int, default=None,
                    help="candidate pairs: instructions that pass filtering and get a response (default 100)")
    ap.add_argument("--output", default="artifacts/pilot", help="output folder (default artifacts/pilot)")
    ap.add_argument("--seed", type=int, default=None, help="run seed: seed sampling, generation (default 42)")
    ap.add_argument("--seeds", metavar="PATH", default=None,
                    help="seed tasks, JSON Lines (ours or Self-Instruct format); default: the packaged 175 Self-Instruct tasks")
    ap.add_argument("--config", metavar="PATH", default=None,
                    help="YAML config merged over configs/pilot.yaml (a run's config.yaml reproduces it)")
    ap.add_argument("--model", default=None,
                    help="embedded:gemma-3-270m (default), a local HF folder, a .gguf file, a model id already in "
                         "the local HF cache (never downloaded), or fake:<seed> for tests")
    ap.add_argument("--bos-policy", choices=["auto", "always", "never"], default=None,
                    help="prepend BOS? auto uses the per-family table; required for unknown families")
    ap.add_argument("--max-iterations", type=int, default=None,
                    help="reruns the gate may ask for (default 2); 0 surfaces 'iterate' as exit 3")
    ap.add_argument("--allow-pickle", action="store_true",
                    help="allow pickle weights (.bin/.pt) for --model; refused by default (they can run code)")
    ap.add_argument("--dry-run", action="store_true",
                    help="validate everything, print the plan (phases, prompts, estimated tokens and time), exit 0 "
                         "without loading the model")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an output folder that belongs to another run (different config, seeds or model)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    params = {"count": args.count, "seed": args.seed, "seeds": args.seeds, "model": args.model,
              "max_iterations": args.max_iterations, "bos_policy": args.bos_policy,
              "allow_pickle": args.allow_pickle or None}
    try:
        plan = run.prepare_pilot(output=args.output, config=args.config, overwrite=args.overwrite, **params)
    except InputError as e:
        print(e.render(), file=sys.stderr)
        print("nothing was written.", file=sys.stderr)
        return 2
    if args.dry_run:
        print(run.dry_run_text(plan))
        return 0
    cfg = plan["config"]
    try:
        result = pilot(count=cfg["count"], output=args.output, seed=cfg["seed"], seeds=args.seeds, config=args.config,
                       model=args.model, max_iterations=cfg["max_iterations"], bos_policy=args.bos_policy,
                       allow_pickle=args.allow_pickle or None, overwrite=args.overwrite)
    except KeyboardInterrupt:
        print(run.interrupted_text(plan["output"]), file=sys.stderr)
        return 130
    except InputError as e:
        print(e.render(), file=sys.stderr)
        return 2
    summary = run.read_summary(result["output"])
    print(reports.qc_text(summary))
    print(f"{result['kept']} kept pairs in {result['output']}/pilot_data.jsonl — exit {result['exit_code']}")
    return result["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
