"""A lost gpu worker costs one shard, not the run: a real Prefect server, three `gpu` workers pinned
to ids 0, 1, 2 on the fake backend, a `stage1/scale` run of twelve one-pair shards. Once a shard is
complete, one worker is SIGKILLed together with the flow-run process it started, while that process
holds a shard's lock. Nothing else is done: the zombie-run automation (silence window 40 s, heartbeats
every 30 s) marks the silent shard run Crashed, the orchestrator starts the shard again on the pool,
and the run completes with the same data as an undisturbed run (a local run of the same parameters),
every row once, the killed shard's manifest showing both attempts."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

from deployments import stack
from tests.deploy import lost_worker as lw

PARAMS = {"count": 12, "shard_size": 1, "model": "fake:4", "seed": 7}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _artifacts(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))


def test_a_killed_worker_costs_one_shard_and_the_run_finishes_unattended(tmp_path):
    state, out, local, log = tmp_path / "stack", tmp_path / "lost", tmp_path / "local", tmp_path / "local.log"
    reference: list[subprocess.Popen] = []
    with lw.lost_worker_stack(state, _free_port(), workers=3, fake_delay=0.1) as env:
        def start_reference() -> None:  # the undisturbed run (local, shards as tasks), while the lost shard waits
            reference.append(subprocess.Popen(
                [sys.executable, "-m", "flows.scale", "--count", "12", "--shard-size", "1", "--model", "fake:4",
                 "--seed", "7", "--output", str(local)], cwd=stack.REPO, env=dict(env, STAGE1_FAKE_DELAY="0"),
                stdout=subprocess.DEVNULL, stderr=log.open("w")))

        shown = stack.status(state)
        assert all(f"worker-gpu-{i}" in shown and f"GPU {i} (CUDA_VISIBLE_DEVICES={i})" in shown for i in range(3))
        try:
            lost = lw.run_scale(env, state, out, PARAMS, kill=True, on_kill=start_reference, timeout=400)
            children = lw.shard_runs(lost["flow_run"].id)
            arts = _artifacts(lost["flow_run"].id)
            assert lost["killed"] is not None, "no gpu worker was seen holding a shard"
            (proc,) = reference
            assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]  # it uses this stack's API
        finally:
            for p in reference:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    killed = lost["killed"]
    assert lost["flow_run"].state.is_completed(), lost["flow_run"].state.message

    # the merged data equals the undisturbed run's, row for row, and no row is there twice
    assert lw.comparable(out / "scale_data.jsonl") == lw.comparable(local / "scale_data.jsonl")
    ids = [r["id"] for r in lw.rows(out / "scale_data.jsonl")]
    assert len(ids) == len(set(ids)) > 0

    # the killed shard shows two attempts: the lost run (Crashed, silent) and the one that computed it
    manifests = {i: json.loads((out / "shards" / f"shard-{i:05d}.manifest.json").read_text()) for i in range(12)}
    first, second = manifests[killed["shard"]]["attempts"]
    assert (first["attempt"], first["state"], first["cause"], first["action"]) == (1, "Crashed", "silent", "retry")
    assert second["attempt"] == 2 and second["pid"] != killed["flow_run_pid"]
    killed_gpu = killed["worker"].rsplit("-", 1)[1]
    assert second["cuda_visible_devices"] in {"0", "1", "2"} - {killed_gpu}
    assert all(len(m["attempts"]) == 1 for i, m in manifests.items() if i != killed["shard"])
    # one GPU per run: every shard run saw only its worker's device
    assert {m["attempts"][-1]["cuda_visible_devices"] for m in manifests.values()} <= {"0", "1", "2"}
    session = json.loads((out / "session_manifest.json").read_text())
    assert [s["attempts"] for s in session["shards"]] == [2 if i == killed["shard"] else 1 for i in range(12)]

    # thirteen shard runs: twelve Completed, the killed one Crashed by the automation
    states = sorted(c.state.name for c in children)
    assert states == ["Completed"] * 12 + ["Crashed"], states
    (crashed,) = [c for c in children if c.state.name == "Crashed"]
    assert crashed.parameters["shard"] == killed["shard"] and "No heartbeat for 40 s" in crashed.state.message

    # the attempt is in the run's progress artifact and its attempts table
    progress = [a for a in arts if a.type == "progress"]
    assert any(a.data == 100.0 and f"rescheduled: shard-{killed['shard']:05d} (attempt 1 silent)" in (a.description or "")
               for a in progress), [a.description for a in progress]
    (table,) = [a for a in arts if a.key == "stage1-scale-attempts"]
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert sorted((r["shard"], r["attempt"], r["action"]) for r in rows if r["shard"] == killed["shard"]) == \
        [(killed["shard"], 1, "retry"), (killed["shard"], 2, "done")]
    assert len(rows) == 13
