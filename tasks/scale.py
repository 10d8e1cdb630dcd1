"""Thin Prefect tasks of the scale flow (prepare, claim, one shard, merge), the cross-shard progress
artifact, and the deployment fan-out of shards as `stage1/scale-shard` flow runs.

Shards are not cached by Prefect: a shard's manifest on disk is its record (stage1_core.scale.shards), and
the orchestrator trusts only that to count a shard done. A shard run's state only decides whether a
shard without valid files is started again (stage1_core.scale.retry).
"""

from __future__ import annotations

import contextvars
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from stage1_core.infra import provenance
from stage1_core.scale.options import ScaleOptions
from stage1_core.scale.settings import ScalePlan, ShardManifest
from stage1_core.scale import merge, plan as scale, retry, shards
from tasks.phases import transient_only

SHARD_DEPLOYMENT = "stage1/scale-shard"
_OPTS: dict[str, Any] = dict(cache_policy=NO_CACHE, persist_result=False)


@task(name="prepare_scale", **_OPTS)
def prepare_scale(opts: ScaleOptions) -> ScalePlan:
    """Validate settings, seeds, model and output folder; returns the plan (raises on bad input)."""
    return scale.prepare_scale(**opts.model_dump(exclude={"run_key"}))


@task(name="load_model", **_OPTS)
def load_model(plan: ScalePlan, shard: int | None = None) -> dict[str, Any] | None:
    """Load and check the model in this process when a shard (any, or `shard`) is left to compute,
    before the folder is claimed; returns its fingerprint or None (raises InputError on a failed guard)."""
    return scale.load_model_if_needed(plan, shard)


@task(name="claim_scale", **_OPTS)
def claim_scale(plan: ScalePlan, run_id: str) -> list[int]:
    """Claim the output folder; returns the shards already complete."""
    return scale.claim(plan, run_id)


@task(name="scale_shard", task_run_name="shard-{index}", retries=2, retry_delay_seconds=5,
      retry_condition_fn=transient_only, **_OPTS)
def compute_shard(plan: ScalePlan, index: int, run_id: str,
                  attempts: list[dict[str, Any]] | None = None) -> ShardManifest:
    """One shard, computed from scratch unless already complete; returns its manifest (`attempts`:
    recorded in it, see stage1_core.scale.plan.compute_shard)."""
    return scale.compute_shard(plan, index, run_id, attempts)


@task(name="collect_shards", **_OPTS)
def collect_shards(plan: ScalePlan) -> list[ShardManifest]:
    """Every shard's manifest, validated on disk (raises when any shard is missing)."""
    return scale.collect_manifests(plan)


@task(name="merge_shards", **_OPTS)
def merge_shards(plan: ScalePlan, *, run_id: str, started: str, manifests: list[ShardManifest], computed: list[int],
                 flow_seconds: float | None = None) -> dict[str, Any]:
    """Cross-shard dedup, QC, dataset card, session manifest."""
    return merge.merge_run(plan, run_id=run_id, started=started, manifests=manifests, computed=computed,
                           flow_seconds=flow_seconds)


class ShardProgress:
    """A progress artifact across shards and one log line per shard (created in the flow's context;
    call its methods from the flow's thread). The artifact's description also names every shard that
    was rescheduled, with the cause of each lost attempt (`retry.progress_text`)."""

    def __init__(self, plan: ScalePlan, done: list[int]) -> None:
        self.total, self.done = len(plan.shards), 0
        self.history: dict[int, list[dict[str, Any]]] = {}
        self.logger = get_run_logger()
        self.artifact = create_progress_artifact(0.0, description=f"scale: 0/{self.total} shards")
        for i in done:
            manifest = shards.valid_manifest(plan.output, plan, i)
            if manifest is not None:
                self.shard_done(manifest, computed=False)

    def _update(self) -> None:
        update_progress_artifact(self.artifact, 100.0 * self.done / self.total,
                                 description=retry.progress_text(self.done, self.total, self.history))

    def shard_done(self, manifest: ShardManifest, computed: bool) -> None:
        self.done += 1
        self.logger.info(scale.shard_log_line(manifest, self.done, self.total, computed))
        self._update()

    def attempt_ended(self, index: int, record: dict[str, Any]) -> None:
        """Record one attempt at shard `index` that did not give a valid shard (retry or fail)."""
        self.history.setdefault(index, []).append(record)
        log = self.logger.warning if record["action"] == "retry" else self.logger.error
        log(f"shard {index:05d}: run {record.get('flow_run_name')} ended {record.get('state')}: {record['reason']}")
        self._update()


def shard_parameters(plan: ScalePlan, index: int, run_id: str,
                     attempts: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Parameters of one `stage1/scale-shard` run (plain JSON types, as deployments require);
    `attempts`: the shard's earlier attempts in this run, recorded in its manifest (retries only)."""
    params = {"output": plan.output, "shard": index, "seed": plan.config.seed,
              "config": str(Path(plan.output) / "config.yaml"), "model": plan.config.model.id, "run_id": run_id}
    return {**params, "attempts": attempts} if attempts else params


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


def _run_shard(params: dict[str, Any], timeout: float, delay_s: float) -> Any:
    """Start one `stage1/scale-shard` run (after `delay_s`) and wait for it up to `timeout` seconds."""
    from prefect.deployments import run_deployment

    if delay_s:
        time.sleep(delay_s)
    return run_deployment(SHARD_DEPLOYMENT, parameters=params, timeout=timeout)


def _attempt_end(plan: ScalePlan, index: int, fut: Future, attempt: int) -> tuple[retry.ShardEnd, dict[str, Any]]:
    """How an attempt ended (its state, whether its files validate) and its record (flow run, state,
    message, ended). A run still going after `shard_timeout_s` is cancelled first, so it frees its GPU
    and its shard's lock."""
    record: dict[str, Any] = {"attempt": attempt, "flow_run_id": None, "flow_run_name": None, "state": None,
                              "message": None}
    try:
        flow_run = fut.result()
    except Exception as exc:  # noqa: BLE001 - decided on below (transient or not)
        error = f"{type(exc).__name__}: {exc}"
        record.update(state=None, message=error, ended=provenance.utc_now())
        return retry.ShardEnd(None, error=error, files_valid=shards.valid_manifest(plan.output, plan, index)
                              is not None), record
    state = flow_run.state
    timed_out = state is not None and not state.is_final()
    if timed_out:
        cancel_flow_run(flow_run.id, "shard_timeout_s passed")
    record.update(flow_run_id=str(flow_run.id), flow_run_name=flow_run.name,
                  state=state.name if state else None, message=state.message if state else None,
                  ended=provenance.utc_now())
    end = retry.ShardEnd(state.type.value if state else None, state.message if state else None,
                         files_valid=shards.valid_manifest(plan.output, plan, index) is not None,
                         timed_out=timed_out)
    return end, record


def check_zombie_automation(logger: Any) -> bool:
    """Warn when the server has no zombie-run automation: without it a shard whose worker died stays
    Running until `shard_timeout_s` and is then failed, not rescheduled."""
    from deployments.stack import ZOMBIE_AUTOMATION
    from prefect.automations import Automation

    try:
        Automation.read(name=ZOMBIE_AUTOMATION)
        return True
    except Exception:  # noqa: BLE001 - missing, or automations not served: same advice
        logger.warning(f"no automation '{ZOMBIE_AUTOMATION}' on this server: a shard run whose worker dies stays "
                       "Running until scale.shard_timeout_s and is then failed, not rescheduled. Create it with "
                       "python -m deployments.stack deploy (docs/deploy.md#zombie-runs-the-automation-that-marks-silent-runs-crashed)")
        return False


def dispatch_shards(plan: ScalePlan, pending: list[int], run_id: str, progress: ShardProgress) -> None:
    """Run each pending shard as a `stage1/scale-shard` deployment run (at most
    `scale.max_parallel_shards` in flight), waiting on each for `scale.shard_timeout_s`.

    A shard counts as done only if its files validate afterwards. A run that ended without them is
    started again when `retry.decide` says so (crashed, silent, failed by infrastructure or a
    transient error; up to `scale.shard_retries` times), each new run getting the earlier attempts
    to record in its manifest. Every attempt is logged and shown in the progress artifact.
    Raises:
        RuntimeError: some shards failed (not retried, or out of retries): names each and its reason,
            after every other shard has finished.
    """
    if not pending:
        return
    sc = plan.config.scale
    check_zombie_automation(progress.logger)
    history: dict[int, list[dict[str, Any]]] = {i: [] for i in pending}
    failed: dict[int, retry.Decision] = {}
    with ThreadPoolExecutor(max_workers=min(len(pending), sc.max_parallel_shards)) as pool:
        def submit(i: int, delay_s: float = 0.0) -> Future:
            params = shard_parameters(plan, i, run_id, history[i])
            return pool.submit(contextvars.copy_context().run, _run_shard, params, sc.shard_timeout_s, delay_s)

        futures = {submit(i): i for i in pending}
        while futures:
            finished, _ = wait(futures, return_when=FIRST_COMPLETED)
            for fut in finished:
                i = futures.pop(fut)
                attempt = len(history[i]) + 1
                end, record = _attempt_end(plan, i, fut, attempt)
                decision = retry.decide(end, attempt, sc.shard_retries)
                record.update(action=decision.action, cause=decision.cause, reason=decision.reason)
                history[i].append(record)
                if decision.action == "done":
                    progress.shard_done(shards.valid_manifest(plan.output, plan, i), computed=True)
                    continue
                progress.attempt_ended(i, record)
                if decision.action == "retry":
                    futures[submit(i, decision.delay_s)] = i
                else:
                    failed[i] = decision
    _attempts_table(history)
    if failed:
        raise RuntimeError(retry.failure_text(failed, len(plan.shards)))


def _attempts_table(history: dict[int, list[dict[str, Any]]]) -> None:
    """A table artifact (`stage1-scale-attempts`) of every shard run this orchestrator started."""
    rows = [{"shard": i, **{k: a.get(k) for k in ("attempt", "flow_run_name", "state", "action", "cause", "reason")}}
            for i, h in sorted(history.items()) for a in h]
    if rows:
        create_table_artifact(rows, key="stage1-scale-attempts",
                              description=f"scale: {len(rows)} shard runs for {len(history)} shards")
