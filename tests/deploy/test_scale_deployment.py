"""The scale deployment path through real workers: `stage1/scale` orchestrates on the `cpu` pool and
each shard is its own `stage1/scale-shard` flow run on the `gpu` pool; the merged dataset holds
every shard's rows exactly once and equals a local run of the same parameters."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.deploy.conftest import start_run, wait_state


def _children(parent_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(
            any_=[parent_id])))
        return [(fr, client.read_deployment(fr.deployment_id)) for fr in runs if fr.deployment_id]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_scale_runs_each_shard_as_a_gpu_flow_run(live_stack, tmp_path):
    out = tmp_path / "scale-deployed"
    params = {"count": 6, "shard_size": 3, "model": "fake:2", "seed": 11, "output": str(out)}
    fr = start_run("stage1/scale", params)
    done = wait_state(fr.id, lambda s: s.is_final(), timeout=420)
    assert done.state.is_completed(), done.state.message
    shards = [(c, d) for c, d in _children(fr.id) if d.name == "scale-shard"]
    assert len(shards) == 2
    assert all(d.work_pool_name == "gpu" and c.state.is_completed() for c, d in shards)
    assert sorted(c.parameters["shard"] for c, _ in shards) == [0, 1]
    deployed = _rows(out / "scale_data.jsonl")
    assert len({r["instruction"] for r in deployed}) == len(deployed) > 0
    for i in range(2):
        assert (out / "shards" / f"shard-{i:05d}.manifest.json").is_file()
    # the same parameters run locally (one process, shards as tasks) give the same dataset
    local = tmp_path / "scale-local"
    env = dict(live_stack)
    r = subprocess.run([sys.executable, "-m", "flows.scale", "--count", "6", "--shard-size", "3", "--model", "fake:2",
                        "--seed", "11", "--output", str(local)], env=env, capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stderr[-3000:]
    strip = lambda rows: [(x["instruction"], x["response"]) for x in rows]  # noqa: E731
    assert strip(_rows(local / "scale_data.jsonl")) == strip(deployed)
