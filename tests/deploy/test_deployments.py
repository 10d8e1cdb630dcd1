"""The deployments through a real Prefect server and real process workers (deployments.stack):
`prefect deployment run ... --watch`, artifacts read back by type, gate tags, parameter refusals,
failures before the model loads, human approval (resume, reject, timeout), and the scale hand-off."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

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
    # Every artifact shows the final decision (the per-iteration gate said iterate; it used to be shown).
    final = summary["gate"]["decision"]
    (decision,) = [a for a in arts["markdown"] if a.key == "stage1-decision"]
    assert decision.description == f"Final decision: {final}" and f"final decision: {final}" in decision.data
    assert str(out) in decision.data and all(r[:40] in decision.data for r in summary["gate"]["reasons"])
    assert table.description == f"QC — final decision: {final}"
    assert all(f"Gate: {final}" in a.data for a in arts["markdown"] if a.key == "stage1-preview")
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


def test_sft_and_eval_deployments_refuse_a_halted_run_then_train_and_evaluate(live_stack, tmp_path):
    from tests.sft_support import make_run_dir

    run = make_run_dir(tmp_path / "run", model="random:gemma3-tiny", decision="halt")
    refused = wait_state(start_run("stage1/sft", {"data": str(run), "output": str(tmp_path / "refused")}).id,
                         lambda s: s.is_final())
    assert refused.state.is_failed() and "'halt'" in refused.state.message and "--force" in refused.state.message
    assert not (tmp_path / "refused").exists()

    cfg = tmp_path / "sft.yaml"
    cfg.write_text("epochs: 1\nbatch_size: 8\n")
    fr = wait_state(start_run("stage1/sft", {"data": str(run), "output": str(tmp_path / "sft"), "config": str(cfg),
                                             "force": True}).id, lambda s: s.is_final())
    assert fr.state.is_completed(), fr.state.message
    summary = json.loads((tmp_path / "sft" / "training_summary.json").read_text())
    assert summary["steps"] == 3 and summary["dataset"]["gate"]["forced"] is True
    assert any(a.key == "stage1-sft-loss" for a in _artifacts(fr.id)["table"])

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "p1", "instruction": "Name a fruit.",
                                   "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}) + "\n")
    ref = tmp_path / "ref.jsonl"
    ref.write_text(json.dumps({"id": "r1", "instruction": "What color is grass?", "response": "Green."}) + "\n")
    ecfg = tmp_path / "eval.yaml"
    ecfg.write_text(f"max_new_tokens: 8\nverifiable:\n  max_new_tokens: 8\nreference: {ref}\nbootstrap_samples: 100\n")
    fe = wait_state(start_run("stage1/eval", {"adapter": str(tmp_path / "sft"), "output": str(tmp_path / "eval"),
                                              "prompts": str(prompts), "config": str(ecfg)}).id, lambda s: s.is_final())
    assert fe.state.is_completed(), fe.state.message
    report = json.loads((tmp_path / "eval" / "eval_report.json").read_text())
    assert report["base"]["n"] == report["tuned"]["n"] == 1
    assert any(a.key == "stage1-eval" for a in _artifacts(fe.id)["table"])


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


def test_approval_reject_halts_and_a_suspension_longer_than_the_silence_window_is_no_zombie(live_stack, scale_config):
    import time

    from prefect.flow_runs import resume_flow_run

    from deployments.stack import ensure_zombie_automation

    # The run heartbeats as it starts, then suspends; with a 12 s window, a run that waits longer than
    # that for its human must stay Suspended (the automation used to expect only heartbeats and end
    # states, and crashed it). Shrinking the window also checks that deploy updates an existing automation.
    assert ensure_zombie_automation(12) == "updated"
    try:
        fr = start_run("stage1/pilot", {"count": 3, "model": "fake:1", "config": scale_config, "seed": 5,
                                        "require_approval": True, "scale_count": 4})
        wait_state(fr.id, lambda s: s.is_paused())
        time.sleep(25)
        assert wait_state(fr.id, lambda s: True).state.is_paused()
    finally:
        assert ensure_zombie_automation() == "updated"
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


def test_deploy_without_stage1_repo_pins_the_checkout_and_a_wrong_one_fails_at_deploy(live_stack, tmp_path):
    from prefect.client.orchestration import get_client

    from deployments import stack

    env = {k: v for k, v in live_stack.items() if k != "STAGE1_REPO"}
    r = prefect_cli(env, "--no-prompt", "deploy", "--name", "pilot", "--prefect-file", str(stack.PREFECT_FILE))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("stage1/pilot")
    (step,) = dep.pull_steps
    assert step["prefect.deployments.steps.set_working_directory"]["directory"] == str(stack.REPO)
    # A path that holds no checkout fails the deploy itself (it used to deploy and crash every run).
    r = prefect_cli(dict(env, STAGE1_REPO=str(tmp_path)), "--no-prompt", "deploy", "--name", "pilot",
                    "--prefect-file", str(stack.PREFECT_FILE))
    assert r.returncode != 0 and "holds no flows/pilot.py" in r.stdout + r.stderr
    with get_client(sync_client=True) as client:
        again = client.read_deployment_by_name("stage1/pilot")
    assert again.pull_steps == dep.pull_steps  # the deployment is left as it was


def test_the_stack_api_refuses_a_client_without_its_auth_string(live_stack, tmp_path):
    import base64
    import urllib.error
    import urllib.request

    from deployments import stack

    url = live_stack["PREFECT_API_URL"] + "/deployments/filter"
    plain = urllib.request.Request(url, data=b"{}", headers={"Content-Type": "application/json"}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(plain, timeout=10)  # noqa: S310 - local URL
    assert refused.value.code == 401
    token = base64.b64encode(live_stack["PREFECT_API_AUTH_STRING"].encode()).decode()
    plain.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(plain, timeout=10) as ok:  # noqa: S310 - local URL
        assert ok.status == 200 and any(d["name"] == "pilot" for d in json.loads(ok.read()))
    state = Path(live_stack["STAGE1_TEST_STATE"])
    assert (state / stack.AUTH_FILE).stat().st_mode & 0o077 == 0  # the secret is readable by its owner only
    # Serving beyond this machine without auth is refused before anything starts.
    with pytest.raises(SystemExit, match="without auth"):
        stack.up(tmp_path / "open", 4999, host="0.0.0.0", no_auth=True)
    assert not (tmp_path / "open").exists()


def test_a_crashed_deployment_run_resumes_under_its_run_key(live_stack):
    from pathlib import Path

    params = {"count": 3, "model": "fake:1", "seed": 11, "run_key": "nightly-11"}
    # Killed in its second generation batch (the phase-1 files of round 1 are written by then).
    fr = start_run("stage1/pilot", params, job_variables={"env": {"STAGE1_FAULT": "phase_end:2"}})
    crashed = wait_state(fr.id, lambda s: s.is_final())
    assert not crashed.state.is_completed()
    out = Path(live_stack["STAGE1_OUTPUT_ROOT"]) / "pilot" / "nightly-11"
    assert (out / "instructions" / "round-01.generated.jsonl").is_file() and not (out / "session_manifest.json").exists()
    again = wait_state(start_run("stage1/pilot", params).id, lambda s: s.is_final())
    assert again.state.is_completed(), again.state.message
    manifest = json.loads((out / "session_manifest.json").read_text())
    assert "generate_instructions-round-01" in manifest["timings"]["cached_phases"]  # resumed, not from zero
    r = prefect_cli(live_stack, "deployment", "run", "stage1/pilot", "--param", "run_key=../escape")
    assert r.returncode != 0 and "run_key" in r.stdout + r.stderr  # one folder name, refused at submission
