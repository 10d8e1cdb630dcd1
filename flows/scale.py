"""The scale flow: `count` examples in deterministic shards, crash-safe resume, a cross-shard merge
and a dataset card. `scale_shard` computes one shard (the `stage1/scale-shard` deployment).

Run locally (no server needed; rerunning the same command resumes):
    python -m flows.scale --count 15000 --shard-size 500 --output artifacts/scale --seed 42
    python -m flows.scale --count 15000 --shard-size 500 --output artifacts/scale --from-pilot artifacts/pilot
Exit codes: 0 dataset complete (whatever the QC verdict; 4 with --strict-qc when QC fails),
2 bad input (nothing written), 5 output folder locked by another run, 1 unexpected error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Literal

from prefect import flow
from pydantic import Field

from flows import runtime

from stage1_core.infra import provenance
from stage1_core.phases import reports, run
from stage1_core.scale import plan as core, shards
from stage1_core.infra.errors import InputError
from stage1_core.infra.locks import LOCK_NAME, hold_lock
from tasks import scale as t


def _deployment_seed(run_key: str | None = None) -> int | None:
    """Under a deployment, the seed of a run that names none: derived from its run key when it has one
    (a rerun with the same key must be the same run), else its scheduled start time in seconds."""
    from prefect.runtime import flow_run

    if not runtime.deployment_name():
        return None
    if run_key:
        return int.from_bytes(hashlib.sha256(run_key.encode()).digest()[:4], "big") % 2**31
    start = flow_run.scheduled_start_time
    return core.seed_from_time(start) if start is not None else None


def _run_name() -> str:
    """`scale-{count}-seed{seed}`; under a deployment with the run id's first 8 characters added (the
    name is the run's output folder there) and, without a seed parameter, the seed of its schedule."""
    from prefect.runtime import flow_run

    p = flow_run.parameters
    seed = p.get("seed") if p.get("seed") is not None else _deployment_seed(p.get("run_key"))
    name = f"scale-{p.get('count')}-seed{'-default' if seed is None else seed}"
    return f"{name}-{str(flow_run.id)[:8]}" if runtime.deployment_name() else name


@flow(name="stage1", flow_run_name=_run_name, log_prints=True)
def scale(count: Annotated[int, Field(gt=0, le=1_000_000)] | None = None,
          shard_size: Annotated[int, Field(gt=0, le=1_000_000)] | None = None,
          output: str | None = None,
          seed: Annotated[int, Field(ge=0)] | None = None,
          config: str | None = None,
          from_pilot: str | None = None,
          force: bool = False,
          model: str | None = None,
          seeds: str | None = None,
          strict_qc: bool = False,
          overwrite: bool = False,
          gpu_hour_usd: Annotated[float, Field(ge=0)] | None = None,
          shard_timeout_s: Annotated[float, Field(gt=0)] | None = None,
          shard_retries: Annotated[int, Field(ge=0, le=10)] | None = None,
          bos_policy: Literal["auto", "always", "never"] | None = None,
          allow_pickle: bool | None = None,
          run_key: Annotated[str, Field(pattern=runtime.RUN_KEY_PATTERN)] | None = None) -> dict[str, Any]:
    """Stage 1 scale: shards (local tasks, or stage1/scale-shard runs under a deployment), then the merge.

    Args:
        count: examples to generate.
        shard_size: kept pairs per shard (default 500).
        output: output folder; under a deployment defaults to ${STAGE1_OUTPUT_ROOT}/{deployment}/{flow_run_name}.
        seed: the run seed; under a deployment defaults to the scheduled start time in epoch seconds.
        config: YAML merged over configs/pilot.yaml, with an optional scale: section.
        from_pilot: a finished pilot's folder whose final settings to use (refused unless its gate said scale).
        force: scale from a pilot whose gate did not say scale (recorded as forced).
        model: as --model. seeds: as --seeds.
        strict_qc: exit code 4 when the merged data fails QC.
        overwrite: re-claim an output folder of another run identity.
        gpu_hour_usd: price of a GPU-hour for the cost estimate.
        shard_timeout_s: how long to wait for one stage1/scale-shard run.
        shard_retries: times a lost stage1/scale-shard run (crashed, silent, failed by infrastructure) is
            started again (default 2; bad input and out-of-memory are never retried).
        bos_policy: as --bos-policy. allow_pickle: as --allow-pickle.
        run_key: under a deployment without `output`: write to ${STAGE1_OUTPUT_ROOT}/{deployment}/{run_key},
            so rerunning a crashed run with the same key resumes its finished shards.
    """
    t0, started, run_id = time.perf_counter(), provenance.utc_now(), provenance.run_id()
    output = runtime.run_output(output, None, run_key)
    seed = seed if seed is not None else _deployment_seed(run_key)
    if output is None:
        raise InputError("no output folder", field="output", expected="a folder path", fix="pass --output DIR")
    plan = t.prepare_scale({"output": output, "config": config, "from_pilot": from_pilot, "force": force,
                            "overwrite": overwrite, "strict_qc": strict_qc, "count": count, "shard_size": shard_size,
                            "seed": seed, "seeds": seeds, "model": model, "bos_policy": bos_policy,
                            "allow_pickle": allow_pickle, "gpu_hour_usd": gpu_hour_usd, "shard_timeout_s": shard_timeout_s,
                            "shard_retries": shard_retries})
    if not runtime.deployment_name():  # shards run in this process: check the model before the folder is touched
        t.load_model(plan)  # (under a deployment this run only orchestrates; the shard runs load it)
    with hold_lock(Path(plan["output"]) / LOCK_NAME):
        done = t.claim_scale(plan, run_id)
        pending = [s["index"] for s in plan["shards"] if s["index"] not in done]
        progress = t.ShardProgress(plan, done)
        if runtime.deployment_name():
            t.dispatch_shards(plan, pending, run_id, progress)
        else:
            for i in pending:
                progress.shard_done(t.compute_shard(plan, i, run_id), computed=True)
        manifests = t.collect_shards(plan)
        computed = [m["shard"] for m in manifests if m["run_id"] == run_id]
        return t.merge_shards(plan, run_id=run_id, started=started, manifests=manifests, computed=computed,
                              flow_seconds=round(time.perf_counter() - t0, 3))


@flow(name="stage1", flow_run_name="scale-shard-{shard}-seed{seed}", log_prints=True)
def scale_shard(output: str, shard: Annotated[int, Field(ge=0)], seed: Annotated[int, Field(ge=0)], config: str,
                model: str, run_id: str, attempts: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One shard of a scale run whose folder `output` was claimed by the orchestrator.

    Args:
        output: the run's output folder.
        shard: the shard index.
        seed: the run seed (checked against the folder's run identity).
        config: the run's config.yaml.
        model: the model id (checked against the folder's run identity).
        run_id: the orchestrating run's id, recorded in the shard's rows and manifest.
        attempts: the shard's earlier attempts (set by the orchestrator when it starts a lost shard
            again); recorded in the manifest's `attempts` before this run's own record.
    """
    from prefect.runtime import flow_run

    plan = t.prepare_scale({"output": output, "config": config, "seed": seed, "model": model})
    if shard not in range(len(plan["shards"])):
        raise InputError(f"shard {shard} does not exist", field="shard", expected=f"0 to {len(plan['shards']) - 1}",
                         fix="pass a shard index of this run")
    t.load_model(plan, shard)  # a model that fails its guards writes no shard file
    earlier = list(attempts or [])
    this = shards.this_attempt(len(earlier) + 1, flow_run_id=str(flow_run.id), flow_run_name=flow_run.name)
    return t.compute_shard(plan, shard, run_id, [*earlier, this])


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m flows.scale",
        description="Stage 1 scale: generate COUNT examples in deterministic shards; rerun the same command to resume.",
        epilog="Exit codes: 0 dataset complete (whatever the QC verdict), 4 QC failed with --strict-qc, 2 bad input "
               "(nothing written), 5 output folder locked by another run, 1 unexpected error, 130 interrupted. "
               "Docs: docs/scale.md.")
    ap.add_argument("--count", type=int, default=None, help="examples to generate (required unless --config holds it)")
    ap.add_argument("--shard-size", type=int, default=None, help="kept pairs per shard (default 500)")
    ap.add_argument("--output", required=True, help="output folder; rerunning with the same folder resumes")
    ap.add_argument("--seed", type=int, default=None, help="run seed; shard i's seed derives from it and i (default 42, "
                                                             "or the pilot's with --from-pilot)")
    ap.add_argument("--from-pilot", metavar="DIR", default=None,
                    help="use the settings a finished pilot ended with; refused unless its gate said scale")
    ap.add_argument("--force", action="store_true", help="with --from-pilot: scale even though the gate did not say "
                                                         "scale (recorded as forced in the manifest)")
    ap.add_argument("--strict-qc", action="store_true", help="exit 4 when the merged data fails QC")
    ap.add_argument("--config", metavar="PATH", default=None,
                    help="YAML merged over configs/pilot.yaml, with an optional scale: section (a run's config.yaml)")
    ap.add_argument("--seeds", metavar="PATH", default=None, help="seed tasks (default: the packaged Self-Instruct seeds)")
    ap.add_argument("--model", default=None, help="as for the pilot: embedded:gemma-3-270m, a folder, a .gguf, fake:<seed>")
    ap.add_argument("--bos-policy", choices=["auto", "always", "never"], default=None, help="prepend BOS? (as the pilot)")
    ap.add_argument("--allow-pickle", action="store_true", help="allow pickle weights (.bin/.pt) for --model")
    ap.add_argument("--gpu-hour-usd", type=float, default=None, help="price of one GPU-hour for the cost estimate")
    ap.add_argument("--shard-timeout-s", type=float, default=None,
                    help="under a deployment: how long to wait for one stage1/scale-shard run (default 14400)")
    ap.add_argument("--shard-retries", type=int, default=None,
                    help="under a deployment: times a crashed or silent shard run is started again (default 2)")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the plan (shards, expected tokens, GPU time and cost) and exit 0; loads and writes nothing")
    ap.add_argument("--overwrite", action="store_true", help="replace an output folder of another run identity")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    params = {"config": a.config, "from_pilot": a.from_pilot, "force": a.force, "overwrite": a.overwrite,
              "strict_qc": a.strict_qc, "count": a.count, "shard_size": a.shard_size, "seed": a.seed, "seeds": a.seeds,
              "model": a.model, "bos_policy": a.bos_policy, "allow_pickle": a.allow_pickle or None,
              "gpu_hour_usd": a.gpu_hour_usd, "shard_timeout_s": a.shard_timeout_s, "shard_retries": a.shard_retries}
    result = runtime.run_cli(lambda: core.prepare_scale(output=a.output, **params), dry_run=a.dry_run,
                             dry_text=core.dry_run_text, start=lambda plan: scale(output=a.output, **params),
                             load=core.load_model_if_needed)
    if isinstance(result, int):
        return result
    summary = run.read_summary(result["output"])
    print(reports.qc_text(summary))
    print(f"QC {'passed' if result['passed'] else 'did not pass'}; {result['rows']} examples in "
          f"{result['output']}/scale_data.jsonl ({result['near_duplicates']} near-duplicates across shards removed; "
          f"{len(result['shards_computed'])} shards computed in this run) — exit {result['exit_code']}")
    return result["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
