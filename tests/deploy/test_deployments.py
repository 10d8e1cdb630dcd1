"""The deployments through a real Prefect server and real process workers (deployments.stack):
`prefect deployment run ... --watch`, artifacts read back by type, gate tags, parameter refusals,
failures before the model loads, human approval (resume, reject, timeout), and the scale hand-off."""

from __future__ import annotations

import json
import re

from tasks.scale import cancel_flow_run
from tests.deploy.conftest import output_of, prefect_cli, start_run, wait_state


def _artifacts(flow_run_id) -> dict[str, list]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    by_type: dict[str, list] = {}
    for a in arts:
        by_type.setdefault(a.type, []).append(a)
    return by_type


def _flow_runs(name_like: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_=name_like)))


def _task_states(flow_run_id) -> dict[str, list[str]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    states: dict[str, list[str]] = {}
    for tr in runs:
        states.setdefault(tr.name, []).append(tr.state.name)
    return states


def test_pilot_deployment_run_watch_artifacts_and_tag(live_stack):
    r = prefect_cli(live_stack, "deployment", "run", "stage1/pilot", "--param", "count=3", "--param", "model=fake:1",
                    "--watch", "--watch-timeout", "240")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    from prefect.client.orchestration import get_client

    run_id = re.search(r"UUID: ([0-9a-f-]{36})", r.stdout).group(1)
    with get_client(sync_client=True) as client:
        fr = client.read_flow_run(run_id)
    assert fr.state.is_completed() and fr.name.startswith("pilot-3-seed42-")
    arts = _artifacts(fr.id)
    table = next(a for a in arts["table"] if a.key == "stage1-qc")
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert {row["metric"] for row in rows} >= {"runaway_rate", "instruction_acceptance", "pair_acceptance"}
    assert any(a.key == "stage1-preview" and "Kept" in a.data for a in arts["markdown"])
    assert arts["progress"] and all(a.data == 100.0 for a in arts["progress"])
    out = output_of(live_stack, fr)
    summary = json.loads((out / "qc_summary.json").read_text())
    assert f"gate:{summary['gate']['decision']}" in fr.tags  # 3 < min_n 20: iterate -> halt, still Completed
    assert (out / "pilot_data.jsonl").is_file()


def test_schema_refuses_a_bad_parameter_at_submission(live_stack):
    r = prefect_cli(live_stack, "deployment", "run", "stage1/pilot", "--param", "count=0")
    assert r.returncode != 0
    assert "count" in (r.stdout + r.stderr) and "minimum" in (r.stdout + r.stderr)


def test_bad_input_fails_before_the_model_with_the_field_named(live_stack, tmp_path):
    bad = tmp_path / "bad_config.yaml"
    bad.write_text("instruction_generation:\n  few_shot_k: -1\n")
    fr = start_run("stage1/pilot", {"count": 3, "model": "embedded:gemma-3-270m", "config": str(bad)})
    fr = wait_state(fr.id, lambda s: s.is_final())
    assert fr.state.is_failed()
    assert "few_shot_k" in fr.state.message and str(bad) in fr.state.message
    tasks = _task_states(fr.id)
    assert set(tasks) <= {next(iter(tasks))} and next(iter(tasks)).startswith("prepare_run")  # no phase ran


def test_approval_resume_reruns_from_cache_and_hands_off_to_scale(live_stack, scale_config):
    from prefect.flow_runs import resume_flow_run

    fr = start_run("stage1/pilot", {"count": 3, "model": "fake:1", "config": scale_config,
                                    "require_approval": True, "approval_timeout_s": 3600, "scale_count": 4})
    paused = wait_state(fr.id, lambda s: s.is_paused())
    first = _task_states(fr.id)
    assert all(states == ["Completed"] for name, states in first.items() if not name.startswith("prepare_run"))
    out = output_of(live_stack, paused)
    request = json.loads((out / ".approval_request.json").read_text())
    assert request["flow_run_id"] == str(fr.id) and request["deadline"] > request["requested"]

    resume_flow_run(fr.id, run_input={"decision": "approve", "note": "ship it"})
    done = wait_state(fr.id, lambda s: s.is_final())
    assert done.state.is_completed(), done.state.message
    # the rerun from the top: every phase a cache hit
    for name, states in _task_states(fr.id).items():
        if name.split("-")[0] in {"generate_instructions", "filter_instructions", "generate_responses", "filter_pairs", "qc"}:
            assert sorted(states) == ["Cached", "Completed"], (name, states)
    manifest = json.loads((out / "session_manifest.json").read_text())
    assert manifest["approval"]["decision"] == "approved" and manifest["approval"]["note"] == "ship it"
    assert manifest["approval"]["source"] == "prefect-ui"
    assert set(n.split("-")[0] for n in manifest["timings"]["cached_phases"]) >= {"generate_instructions", "qc"}
    assert "gate:scale" in done.tags
    # the hand-off: stage1/scale started on the cpu pool with from_pilot = this output, not waited on
    scale_run = manifest["scale_run"]
    assert scale_run["deployment"] == "stage1/scale"
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        child = client.read_flow_run(scale_run["flow_run_id"])
        dep = client.read_deployment(child.deployment_id)
    assert dep.name == "scale" and dep.work_pool_name == "cpu"
    assert child.parameters["from_pilot"] == str(out) and child.parameters["count"] == 4
    cancel_flow_run(child.id, "test done")  # the scale itself is tested in tests/deploy/test_scale_deployment.py
    # the deadline's timer run was cancelled once a human answered
    timers = [f for f in _flow_runs("%") if f.parameters.get("flow_run_id") == str(fr.id)]
    assert timers and all(t.state.is_cancelled() for t in timers)


def test_approval_reject_halts(live_stack, scale_config):
    from prefect.flow_runs import resume_flow_run

    fr = start_run("stage1/pilot", {"count": 3, "model": "fake:1", "config": scale_config, "seed": 5,
                                    "require_approval": True, "scale_count": 4})
    wait_state(fr.id, lambda s: s.is_paused())
    resume_flow_run(fr.id, run_input={"decision": "reject", "note": "too few"})
    done = wait_state(fr.id, lambda s: s.is_final())
    assert done.state.is_completed()
    out = output_of(live_stack, done)
    manifest = json.loads((out / "session_manifest.json").read_text())
    assert manifest["approval"]["decision"] == "rejected"
    assert manifest["decision"]["decision"] == "halt" and "scale not approved: rejected (too few)" in manifest["decision"]["reasons"]
    assert "scale_run" not in manifest and "gate:halt" in done.tags
    assert json.loads((out / "qc_summary.json").read_text())["gate"]["decision"] == "halt"


def test_approval_timeout_records_rejected_timeout(live_stack, scale_config):
    fr = start_run("stage1/pilot", {"count": 3, "model": "fake:1", "config": scale_config, "seed": 6,
                                    "require_approval": True, "approval_timeout_s": 2})
    done = wait_state(fr.id, lambda s: s.is_final(), timeout=300)
    assert done.state.is_completed(), done.state.message
    manifest = json.loads((output_of(live_stack, done) / "session_manifest.json").read_text())
    assert manifest["approval"]["decision"] == "rejected (timeout)"
    assert manifest["decision"]["decision"] == "halt" and "gate:halt" in done.tags
