"""Thin Prefect tasks of the scale flow (prepare, claim, one shard, merge), the cross-shard progress
artifact, and the deployment fan-out of shards as `stage1/scale-shard` flow runs.

Shards are not cached by Prefect: a shard's manifest on disk is its record (stage1_core.scale.shards), and
the orchestrator trusts only that, never a shard run's state.
"""

from __future__ import annotations

import contextvars
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from stage1_core.scale import merge, plan as scale, shards
from tasks.phases import transient_only

SHARD_DEPLOYMENT = "stage1/scale-shard"
_OPTS: dict[str, Any] = dict(cache_policy=NO_CACHE, persist_result=False)


@task(name="prepare_scale", **_OPTS)
def prepare_scale(params: dict[str, Any]) -> dict[str, Any]:
    """Validate settings, seeds, model and output folder; returns the plan (raises on bad input)."""
    return scale.prepare_scale(**params)


@task(name="load_model", **_OPTS)
def load_model(plan: dict[str, Any], shard: int | None = None) -> dict[str, Any] | None:
    """Load and check the model in this process when a shard (any, or `shard`) is left to compute,
    before the folder is claimed; returns its fingerprint or None (raises InputError on a failed guard)."""
    return scale.load_model_if_needed(plan, shard)


@task(name="claim_scale", **_OPTS)
def claim_scale(plan: dict[str, Any], run_id: str) -> list[int]:
    """Claim the output folder; returns the shards already complete."""
    return scale.claim(plan, run_id)


@task(name="scale_shard", task_run_name="shard-{index}", retries=2, retry_delay_seconds=5,
      retry_condition_fn=transient_only, **_OPTS)
def compute_shard(plan: dict[str, Any], index: int, run_id: str) -> dict[str, Any]:
    """One shard, computed from scratch unless already complete; returns its manifest."""
    return scale.compute_shard(plan, index, run_id)


@task(name="collect_shards", **_OPTS)
def collect_shards(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Every shard's manifest, validated on disk (raises when any shard is missing)."""
    return scale.collect_manifests(plan)


@task(name="merge_shards", **_OPTS)
def merge_shards(plan: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """Cross-shard dedup, QC, dataset card, session manifest."""
    return merge.merge_run(plan, **kwargs)


class ShardProgress:
    """A progress artifact across shards and one log line per shard (created in the flow's context;
    call `shard_done` from the flow's thread)."""

    def __init__(self, plan: dict[str, Any], done: list[int]) -> None:
        self.total, self.done = len(plan["shards"]), 0
        self.logger = get_run_logger()
        self.artifact = create_progress_artifact(0.0, description=f"scale: 0/{self.total} shards")
        for i in done:
            manifest = shards.valid_manifest(plan["output"], plan, i)
            if manifest is not None:
                self.shard_done(manifest, computed=False)

    def shard_done(self, manifest: dict[str, Any], computed: bool) -> None:
        self.done += 1
        self.logger.info(scale.shard_log_line(manifest, self.done, self.total, computed))
        update_progress_artifact(self.artifact, 100.0 * self.done / self.total,
                                 description=f"scale: {self.done}/{self.total} shards")


def shard_parameters(plan: dict[str, Any], index: int, run_id: str) -> dict[str, Any]:
    """Parameters of one `stage1/scale-shard` run (plain JSON types, as deployments require)."""
    cfg = plan["config"]
    return {"output": plan["output"], "shard": index, "seed": cfg["seed"],
            "config": str(Path(plan["output"]) / "config.yaml"), "model": cfg["model"]["id"], "run_id": run_id}


def cancel_flow_run(flow_run_id: Any, message: str) -> None:
    """Cancel a flow run: one not yet started at once, a running one through its worker."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled, Cancelling

    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run_id).state
        if state is None or state.is_final():
            return
        waiting = state.is_scheduled() or state.is_pending() or state.is_paused()
        client.set_flow_run_state(flow_run_id, Cancelled(message=message) if waiting else Cancelling(message=message),
                                  force=True)


def dispatch_shards(plan: dict[str, Any], pending: list[int], run_id: str, progress: ShardProgress) -> None:
    """Run each pending shard as a `stage1/scale-shard` deployment run (at most
    `scale.max_parallel_shards` in flight), waiting on each for `scale.shard_timeout_s`. A shard
    counts as done only if its files validate afterwards; the caller checks every shard again."""
    from prefect.deployments import run_deployment

    if not pending:
        return
    sc = plan["config"]["scale"]
    with ThreadPoolExecutor(max_workers=min(len(pending), sc["max_parallel_shards"])) as pool:
        futures = {pool.submit(contextvars.copy_context().run, run_deployment, SHARD_DEPLOYMENT,
                               parameters=shard_parameters(plan, i, run_id), timeout=sc["shard_timeout_s"]): i
                   for i in pending}
        for fut in as_completed(futures):
            i = futures[fut]
            try:
                flow_run = fut.result()
                state = flow_run.state.name if flow_run.state else "unknown"
            except Exception as exc:  # noqa: BLE001 - reported; the shard is then found missing
                progress.logger.warning(f"shard {i}: could not run {SHARD_DEPLOYMENT}: {exc!r}")
                continue
            if flow_run.state is not None and not flow_run.state.is_final():
                # past shard_timeout_s: stop it so it frees its GPU and its shard's lock
                cancel_flow_run(flow_run.id, "shard_timeout_s passed")
                progress.logger.warning(f"shard {i}: run {flow_run.name} still {state} after "
                                        f"{sc['shard_timeout_s']} s: cancelled")
            manifest = shards.valid_manifest(plan["output"], plan, i)
            if manifest is None:
                progress.logger.warning(f"shard {i}: run {flow_run.name} ended {state} without a valid shard")
            else:
                progress.shard_done(manifest, computed=True)
