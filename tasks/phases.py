"""One Prefect task per pilot phase, plus the run's prepare/finalize steps.

Each phase task takes its typed `call` (stage1_core.phases.plans), runs the phase through
`pipeline.run_phase`, shows a tqdm bar (stderr) and a Prefect progress artifact, and returns the
phase manifest. Retries are for transient errors only (I/O hiccups, CUDA OOM), never bad input.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from tqdm import tqdm

from stage1_core.phases import pipeline, reports, run
from stage1_core.phases.options import PilotOptions
from stage1_core.phases.plans import IterationRecord, PhaseCall, PhaseManifest, PilotPlan, QCManifest
from stage1_core.infra import storage
from tasks.caching import PHASE_CACHE

TRANSIENT = (TimeoutError, ConnectionError, BrokenPipeError)


def transient_only(task_obj: Any, task_run: Any, state: Any) -> bool:
    """Retry only transient failures (I/O timeouts, connection errors). Out of device memory is not
    retried: the engine and the critic halve their batch themselves and raise `DeviceOOM` only when
    one row does not fit, and any other OOM would fail again at the same batch size."""
    try:
        state.result()
    except TRANSIENT:
        return True
    except Exception:  # noqa: BLE001 - everything else (bad input, OOM, bugs) fails the same way again
        return False
    return False


def _label(call: PhaseCall) -> str:
    if call.round is not None:
        since = f", iteration {call.instructions_since}" if call.instructions_since else ""
        return f"{call.phase} (round {call.round}{since})"
    if call.iteration is not None:
        return f"{call.phase} (iteration {call.iteration})"
    return call.phase


_UNITS = {"generate_instructions": "prompt", "generate_responses": "prompt", "filter_instructions": "item",
          "filter_pairs": "item"}


def _run(call: PhaseCall) -> PhaseManifest:
    key = pipeline.cache_key(call)
    artifact = create_progress_artifact(0.0, description=f"{_label(call)}: starting")
    # The bar starts with the phase, so its rate and ETA count from the start (a bar made at the first
    # finished batch showed rates like 1.7M prompt/s); it advances as rows finish.
    bar = tqdm(desc=_label(call), unit=_UNITS.get(call.phase, "step"), file=sys.stderr, dynamic_ncols=True,
               disable=call.phase == "qc")
    last = [-1.0]

    def progress(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
        bar.update(done - bar.n)
        pct = 100.0 * done / total if total else 100.0
        if pct - last[0] >= 5.0 or done >= total:
            last[0] = pct
            update_progress_artifact(artifact, pct, description=f"{_label(call)}: {done}/{total}")

    t0 = time.perf_counter()
    try:
        manifest = pipeline.run_phase(call, key, progress)
    finally:
        bar.close()
    update_progress_artifact(artifact, 100.0, description=f"{_label(call)}: done")
    dev = getattr(manifest, "critic_dev", None)
    if dev:
        get_run_logger().info(f"critic dev set: {dev.get('n')} items scored in {dev.get('seconds', 0):.1f} s "
                              f"(accuracy {dev.get('accuracy')}) of this phase's {time.perf_counter() - t0:.1f} s")
    return manifest


def _name(phase: str):
    def namer() -> str:
        from prefect.runtime import task_run
        call = task_run.parameters.get("call")
        return call.label() if isinstance(call, PhaseCall) else phase
    return namer


_PHASE_OPTS: dict[str, Any] = dict(cache_policy=PHASE_CACHE, persist_result=True, retries=2, retry_delay_seconds=5,
                                   retry_condition_fn=transient_only)


@task(name="generate_instructions", task_run_name=_name("generate_instructions"), **_PHASE_OPTS)
def _generate_instructions(call: PhaseCall) -> PhaseManifest:
    """Phase 1: one round of few-shot list continuation."""
    return _run(call)


@task(name="filter_instructions", task_run_name=_name("filter_instructions"), **_PHASE_OPTS)
def _filter_instructions(call: PhaseCall) -> PhaseManifest:
    """Phase 2: heuristics, ROUGE-L dedup, instruction critic."""
    return _run(call)


@task(name="generate_responses", task_run_name=_name("generate_responses"), **_PHASE_OPTS)
def _generate_responses(call: PhaseCall) -> PhaseManifest:
    """Phase 3: worked-example completion prompts."""
    return _run(call)


@task(name="filter_pairs", task_run_name=_name("filter_pairs"), **_PHASE_OPTS)
def _filter_pairs(call: PhaseCall) -> PhaseManifest:
    """Phase 4: pair critic (+ critic dev-set accuracy)."""
    return _run(call)


def _trusted(phase_task: Any) -> Any:
    """Call a phase task so that a stored result counts only while its files are intact, whatever the
    result storage (local, or a remote block where records cannot be deleted from here): when the
    sidecar check fails (an output deleted or edited, or never written) the task runs with
    `refresh_cache`, which recomputes and overwrites the record under the same key."""

    def call_phase(call: PhaseCall) -> PhaseManifest:
        intact = pipeline.outputs_valid(call, pipeline.cache_key(call))
        return (phase_task if intact else phase_task.with_options(refresh_cache=True))(call)

    call_phase.__doc__ = phase_task.fn.__doc__
    call_phase.task = phase_task  # type: ignore[attr-defined]
    return call_phase


generate_instructions = _trusted(_generate_instructions)
filter_instructions = _trusted(_filter_instructions)
generate_responses = _trusted(_generate_responses)
filter_pairs = _trusted(_filter_pairs)


@task(name="qc", task_run_name=_name("qc"), **_PHASE_OPTS)
def _qc_gate(call: PhaseCall) -> PhaseManifest:
    """Phase 5: metrics, the iteration's gate, the iteration's files. Publishes no artifact: an
    iteration's gate is not the run's decision (finalize, approval and exhausted iterations change
    it), and a cached task would publish nothing; the flow publishes them (`publish_final`)."""
    return _run(call)


qc_gate = _trusted(_qc_gate)


def publish_final(result: dict[str, Any], last_qc: QCManifest) -> None:
    """The run's artifacts, published by the flow once the decision is final (so each one shows the
    decision the run is tagged with, also when every phase was a cache hit): the decision with its
    reasons and output folder, the QC table of the final qc_summary.json, and a preview."""
    summary = storage.read_json(Path(result["output"]) / "qc_summary.json")
    decision = summary["gate"]["decision"]
    create_markdown_artifact(reports.decision_markdown(result, summary), key="stage1-decision",
                             description=f"Final decision: {decision}")
    create_table_artifact(reports.qc_table(summary), key="stage1-qc", description=f"QC — final decision: {decision}")
    preview = reports.preview_markdown(summary, last_qc.outputs["pilot_data"].path, last_qc.outputs["rejected"].path)
    create_markdown_artifact(preview, key="stage1-preview",
                             description=f"Kept and rejected samples — final decision: {decision}")


@task(name="prepare_run", persist_result=False)
def prepare_run(opts: PilotOptions) -> PilotPlan:
    """Validate config, seeds, model and output folder; returns the plan (raises on bad input)."""
    return run.prepare_pilot(opts)


@task(name="load_model", cache_policy=NO_CACHE, persist_result=False)
def load_model(plan: PilotPlan) -> dict[str, Any]:
    """Load the plan's model in this process and check its guards and sentinels, before the output
    folder is claimed; returns its fingerprint (raises InputError when a guard fails). Logs how long
    it took (a cold first load of the embedded model dequantizes its GGUF: about a minute on 2 cores)."""
    logger = get_run_logger()
    model = plan.config.model
    logger.info(f"loading model {model.id} (device {model.device}, dtype {model.dtype}) ...")
    t0 = time.perf_counter()
    fingerprint = dict(run.load_model(plan).fingerprint)
    logger.info(f"model {model.id} ready in {time.perf_counter() - t0:.1f} s "
                f"({fingerprint.get('device', 'n/a')}, {fingerprint.get('dtype', 'n/a')}; guards and sentinels passed)")
    return fingerprint


@task(name="finalize_run", persist_result=False)
def finalize_run(plan: PilotPlan, *, run_id: str, started: str, iterations: list[IterationRecord],
                 phase_manifests: list[PhaseManifest], flow_seconds: float | None = None,
                 approval: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the top-level files and the session manifest."""
    return run.finalize(plan, run_id=run_id, started=started, iterations=iterations, phase_manifests=phase_manifests,
                        flow_seconds=flow_seconds, approval=approval)
