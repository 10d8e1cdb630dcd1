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
from typing import Annotated, Any

from prefect import flow
from pydantic import Field

from flows import runtime

from stage1_core.infra import provenance
from stage1_core.phases import reports, run
from stage1_core.infra import options
from stage1_core.scale import plan as core, shards
from stage1_core.scale.options import ScaleOptions
from stage1_core.scale.settings import ShardManifest
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


def _scale(**params: Any) -> dict[str, Any]:
    opts = ScaleOptions.model_construct(**params)  # validated at the flow's edge against the same declaration
    t0, started, run_id = time.perf_counter(), provenance.utc_now(), provenance.run_id()
    output = runtime.run_output(opts.output, None, opts.run_key)
    seed = opts.seed if opts.seed is not None else _deployment_seed(opts.run_key)
    if output is None:
        raise InputError("no output folder", field="output", expected="a folder path", fix="pass --output DIR")
    plan = t.prepare_scale(opts.model_copy(update={"output": output, "seed": seed}))
    if not runtime.deployment_name():  # shards run in this process: check the model before the folder is touched
        t.load_model(plan)  # (under a deployment this run only orchestrates; the shard runs load it)
    with hold_lock(Path(plan.output) / LOCK_NAME):
        done = t.claim_scale(plan, run_id)
        pending = [s.index for s in plan.shards if s.index not in done]
        progress = t.ShardProgress(plan, done)
        if runtime.deployment_name():
            t.dispatch_shards(plan, pending, run_id, progress)
        else:
            for i in pending:
                progress.shard_done(t.compute_shard(plan, i, run_id), computed=True)
        manifests = t.collect_shards(plan)
        computed = [m.shard for m in manifests if m.run_id == run_id]
        return t.merge_shards(plan, run_id=run_id, started=started, manifests=manifests, computed=computed,
                              flow_seconds=round(time.perf_counter() - t0, 3))


scale = runtime.options_flow(_scale, ScaleOptions, "Stage 1 scale: shards (local tasks, or stage1/scale-shard runs "
                             "under a deployment), then the merge.", name="scale", run_name=_run_name)


@flow(name="stage1", flow_run_name="scale-shard-{shard}-seed{seed}", log_prints=True)
def scale_shard(output: str, shard: Annotated[int, Field(ge=0)], seed: Annotated[int, Field(ge=0)], config: str,
                model: str, run_id: str, attempts: list[dict[str, Any]] | None = None) -> ShardManifest:
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

    plan = t.prepare_scale(ScaleOptions(output=output, config=config, seed=seed, model=model))
    if shard not in range(len(plan.shards)):
        raise InputError(f"shard {shard} does not exist", field="shard", expected=f"0 to {len(plan.shards) - 1}",
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
    options.add_arguments(ap, ScaleOptions)
    ap.add_argument("--dry-run", action="store_true",
                    help="print the plan (shards, expected tokens, GPU time and cost) and exit 0; loads and writes nothing")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    params = options.from_args(ScaleOptions, a)
    result = runtime.run_cli(lambda: core.prepare_scale(**ScaleOptions(**params).model_dump(exclude={"run_key"})),
                             dry_run=a.dry_run, dry_text=core.dry_run_text, start=lambda plan: scale(**params),
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
