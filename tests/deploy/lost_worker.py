"""The lost-worker scenario, shared by tests/deploy/test_lost_worker.py and bench/scale_out.py.

A real stack (deployments.stack) with several `gpu` workers on the fake backend, flow-run heartbeats
every 30 s (Prefect's minimum) and a short zombie-run silence window. `run_scale` starts one
`stage1/scale` deployment run and, when asked, SIGKILLs one gpu worker together with the flow-run
process it started (a lost node: nothing of it survives) while that process holds a shard's lock,
then waits for the scale run to end with no further action.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Iterator

from deployments import stack

HEARTBEAT_S = 30  # Prefect's minimum flow-run heartbeat interval
SILENCE_S = 40  # the zombie-run automation's window: above the heartbeat, below any shard run's length x 2


@contextlib.contextmanager
def lost_worker_stack(state: Path, port: int, *, workers: int = 3, silence_s: int = SILENCE_S,
                      fake_delay: float = 0.3) -> Iterator[dict[str, str]]:
    """A stack with `workers` gpu workers (pinned to ids 0..workers-1), heartbeats every HEARTBEAT_S,
    the zombie automation at `silence_s`, and the fake backend sleeping `fake_delay` s per prompt.
    Yields the stack's environment, with the test process's Prefect client pointed at it."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    extra = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S), "STAGE1_FAKE_DELAY": str(fake_delay),
             "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "2",
             "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)  # stack_env copies os.environ into every stack process
    try:
        stack.up(state, port, cpu_limit=2, gpus=[str(i) for i in range(workers)])
        stack.deploy(state, port, ["scale", "scale-shard"], silence_s=silence_s)
        env = stack.stack_env(state, port)
        with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"],
                                         PREFECT_API_AUTH_STRING: env["PREFECT_API_AUTH_STRING"]}):
            yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        stack.down(state)


def _ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            parent = _ppid(int(p.name))
            if parent is not None:
                children.setdefault(parent, []).append(int(p.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:
        return "Z" not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:1]
    except OSError:
        return False


def gpu_workers(state: Path) -> dict[int, str]:
    """{pid: name} of the stack's gpu workers."""
    procs = json.loads((state / "procs.json").read_text())
    return {p["pid"]: n for n, p in procs.items() if n.startswith("worker-gpu")}


def holder(out: Path, workers: dict[int, str]) -> tuple[int, int, int] | None:
    """(shard, flow-run pid, worker pid) of a shard being computed right now by a gpu worker's flow
    run: its scratch folder exists, it has no manifest, and the pid written in its lock file is alive
    and a child of a gpu worker. None when no shard is held."""
    for lock in sorted((out / "shards").glob("shard-*.lock")):
        index = int(lock.name.split("-")[1].split(".")[0])
        base = lock.with_suffix("")
        if not base.with_name(f"{base.name}.work").is_dir() or base.with_name(f"{base.name}.manifest.json").exists():
            continue
        try:
            pid = int(lock.read_text().split()[1])  # "pid N on HOST since T"
        except (OSError, IndexError, ValueError):
            continue
        parent = _ppid(pid)
        if _alive(pid) and parent in workers:
            return index, pid, parent
    return None


def kill_worker(worker_pid: int) -> list[int]:
    """SIGKILL a worker and every process under it (its flow runs run in their own sessions, so a
    process-group kill would miss them); returns the pids killed."""
    victims = [worker_pid, *_descendants(worker_pid)]
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return victims


def run_scale(env: dict[str, str], state: Path, out: Path, params: dict[str, Any], *, kill: bool,
              kill_after_done: int = 1, timeout: float = 600, on_kill: Any = None) -> dict[str, Any]:
    """Start `stage1/scale` with `params` writing to `out`, optionally kill one gpu worker while it
    holds a shard (once at least `kill_after_done` shards are complete; then `on_kill()` is called),
    and wait for the run to end.

    Returns:
        {flow_run, wall_s (submission to final state), killed: {shard, worker, pids, at_s} or None}.
    """
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    t0 = time.monotonic()
    fr = run_deployment("stage1/scale", parameters={**params, "output": str(out)}, timeout=0, as_subflow=False)
    killed = None
    workers = gpu_workers(state)
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(fr.id)
            if run.state is not None and run.state.is_final():
                break
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"scale run {fr.id} still {run.state.name if run.state else None} after {timeout} s")
            if kill and killed is None and len(list(out.glob("shards/*.manifest.json"))) >= kill_after_done:
                held = holder(out, workers)
                if held is not None:
                    shard, pid, worker = held
                    killed = {"shard": shard, "worker": workers[worker], "pids": kill_worker(worker),
                              "flow_run_pid": pid, "at_s": round(time.monotonic() - t0, 2)}
                    if on_kill is not None:
                        on_kill()
            time.sleep(0.2 if kill and killed is None else 1.0)
    return {"flow_run": run, "wall_s": round(time.monotonic() - t0, 2), "killed": killed}


def shard_runs(parent_id) -> list[Any]:
    """The stage1/scale-shard flow runs a scale run started."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id])))


def rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def comparable(path: Path) -> list[tuple[str, str, str]]:
    """(id, instruction, response) of every row of a scale_data.jsonl, in file order."""
    return [(r["id"], r["instruction"], r["response"]) for r in rows(path)]
