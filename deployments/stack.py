"""A local Stage 1 stack: a Prefect server, the `gpu` and `cpu` process pools, their workers, and
the deployments of deployments/prefect.yaml.

    python -m deployments.stack up       # server + pools + workers (one gpu worker per visible GPU)
    python -m deployments.stack deploy   # deploy everything in deployments/prefect.yaml (+ the zombie-run automation)
    python -m deployments.stack status   # what runs, where the logs are
    python -m deployments.stack down     # stop workers and server

State (pid files, logs, SQLite database, result storage, run outputs) lives in `--state-dir`
(default `.stage1-stack/` in the repo root). Every process gets telemetry off, the shared result
storage and output root, and the API URL. docs/deploy.md has the multi-machine setup (Postgres,
shared storage) and the settings.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PREFECT_FILE = REPO / "deployments" / "prefect.yaml"
DEFAULT_STATE = REPO / ".stage1-stack"
ZOMBIE_AUTOMATION = "stage1: crash silent flow runs"


def _prefect() -> list[str]:
    return [sys.executable, "-m", "prefect"]


def stack_env(state: Path, port: int, *, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of every stack process (server, workers, deploy): telemetry off, one API,
    one result storage and one output root that every worker reaches."""
    env = dict(os.environ if base is None else base)
    env.update({
        "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "PREFECT_HOME": str(state / "prefect-home"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_LOCAL_STORAGE_PATH": str(state / "results"),
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        "STAGE1_REPO": str(REPO),
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p),
    })
    env.setdefault("STAGE1_OUTPUT_ROOT", str(state / "runs"))
    env.setdefault("PREFECT_WORKER_QUERY_SECONDS", "5")
    env.setdefault("PREFECT_WORKER_PREFETCH_SECONDS", "5")
    return env


def visible_gpus(env: dict[str, str]) -> list[str]:
    """GPU ids a worker can be pinned to: CUDA_VISIBLE_DEVICES if set, else what nvidia-smi lists."""
    if env.get("CUDA_VISIBLE_DEVICES") is not None:
        return [g for g in env["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    if shutil.which("nvidia-smi") is None:
        return []
    out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                         text=True, check=False)
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def _start(name: str, cmd: list[str], env: dict[str, str], state: Path) -> int:
    log = open(state / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    procs = _read_procs(state)
    procs[name] = {"pid": proc.pid, "cmd": cmd, "log": str(state / f"{name}.log"),
                   "cuda_visible_devices": env.get("CUDA_VISIBLE_DEVICES")}
    (state / "procs.json").write_text(json.dumps(procs, indent=2))
    return proc.pid


def _read_procs(state: Path) -> dict[str, Any]:
    path = state / "procs.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie child of ours counts as gone
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return True


def wait_healthy(port: int, timeout: float = 180.0) -> None:
    url = f"http://127.0.0.1:{port}/api/health"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310 - local URL
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"Prefect server on port {port} not healthy after {timeout:.0f} s")


def up(state: Path, port: int, *, cpu_limit: int = 4) -> dict[str, Any]:
    """Start the server, create the pools, start the workers. Returns the process table."""
    state.mkdir(parents=True, exist_ok=True)
    env = stack_env(state, port)
    running = {n: p for n, p in _read_procs(state).items() if _alive(p["pid"])}
    if running:
        raise SystemExit(f"a stack already runs from {state}: {', '.join(running)} (python -m deployments.stack down)")
    (state / "procs.json").unlink(missing_ok=True)
    _start("server", [*_prefect(), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, state)
    wait_healthy(port)
    for pool in ("gpu", "cpu"):
        subprocess.run([*_prefect(), "work-pool", "create", pool, "--type", "process", "--overwrite"], env=env,
                       cwd=REPO, check=True, capture_output=True, text=True)
    gpus = visible_gpus(env)
    for i, gpu in enumerate(gpus or [""]):
        # Pinned when the worker starts: every flow run it starts inherits this one device.
        wenv = dict(env, CUDA_VISIBLE_DEVICES=gpu)
        _start(f"worker-gpu-{i}", [*_prefect(), "worker", "start", "--pool", "gpu", "--name", f"gpu-{i}",
                                   "--limit", "1", "--install-policy", "never"], wenv, state)
    _start("worker-cpu", [*_prefect(), "worker", "start", "--pool", "cpu", "--name", "cpu-0",
                          "--limit", str(cpu_limit), "--install-policy", "never"], dict(env, CUDA_VISIBLE_DEVICES=""), state)
    (state / "stack.json").write_text(json.dumps({"port": port, "api_url": env["PREFECT_API_URL"],
                                                  "gpus": gpus, "env": {k: env[k] for k in (
                                                      "PREFECT_API_URL", "PREFECT_HOME", "PREFECT_LOCAL_STORAGE_PATH",
                                                      "STAGE1_OUTPUT_ROOT", "STAGE1_REPO")}}, indent=2))
    return _read_procs(state)


def deploy(state: Path, port: int, names: list[str] | None = None) -> None:
    """Deploy deployments/prefect.yaml (all, or the named deployments) and create the automation
    that crashes silent runs."""
    env = stack_env(state, port)
    which = [a for n in names for a in ("--name", n)] if names else ["--all"]
    subprocess.run([*_prefect(), "--no-prompt", "deploy", *which, "--prefect-file", str(PREFECT_FILE)],
                   env=env, cwd=REPO, check=True)
    subprocess.run([sys.executable, "-c", "from deployments.stack import ensure_zombie_automation; "
                                          "ensure_zombie_automation()"], env=env, cwd=REPO, check=True)


def ensure_zombie_automation(silence_s: int = 600) -> None:
    """Mark a flow run Crashed when it sends no heartbeat for `silence_s` (flow heartbeats every
    180 s by default), as in Prefect's "detect zombie flows" recipe. Idempotent."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    try:
        Automation.read(name=ZOMBIE_AUTOMATION)
        return
    except ValueError:
        pass
    Automation(
        name=ZOMBIE_AUTOMATION,
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=silence_s),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"No heartbeat for {silence_s} s: marked Crashed by '{ZOMBIE_AUTOMATION}'")],
    ).create()


def down(state: Path) -> list[str]:
    """Stop workers first, then the server: SIGTERM, a second SIGTERM (an idle worker may ignore the
    first), then SIGKILL. Returns the names stopped."""
    procs = _read_procs(state)
    order = sorted(procs, key=lambda n: n == "server")
    stopped = []
    for name in order:
        pid = procs[name]["pid"]
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
            if not _alive(pid):
                break
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
        stopped.append(name)
    (state / "procs.json").unlink(missing_ok=True)
    return stopped


def status(state: Path) -> str:
    procs = _read_procs(state)
    if not procs:
        return f"no stack in {state}"
    lines = [f"{n:14s} pid {p['pid']:<7d} {'running' if _alive(p['pid']) else 'STOPPED'}  log {p['log']}"
             + (f"  CUDA_VISIBLE_DEVICES={p['cuda_visible_devices']!r}" if n.startswith("worker-gpu") else "")
             for n, p in procs.items()]
    info = state / "stack.json"
    if info.is_file():
        port = json.loads(info.read_text())["port"]
        lines.insert(0, f"API: http://127.0.0.1:{port}/api   UI: http://127.0.0.1:{port}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deployments.stack", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["up", "deploy", "status", "down"])
    ap.add_argument("--state-dir", type=Path, default=Path(os.environ.get("STAGE1_STACK_DIR", DEFAULT_STATE)),
                    help="pid files, logs, SQLite database, results, outputs (default .stage1-stack/)")
    ap.add_argument("--port", type=int, default=4200, help="Prefect server port (default 4200)")
    ap.add_argument("--name", action="append", default=None, help="deploy only this deployment (repeatable)")
    ap.add_argument("--cpu-limit", type=int, default=4, help="concurrent runs of the cpu worker (default 4)")
    args = ap.parse_args(argv)
    state = args.state_dir.resolve()
    if args.command != "up" and (state / "stack.json").is_file():
        args.port = json.loads((state / "stack.json").read_text())["port"]
    if args.command == "up":
        up(state, args.port, cpu_limit=args.cpu_limit)
        print(status(state))
        print(f"\nnext: python -m deployments.stack deploy --state-dir {state} --port {args.port}")
        print(f"then: export PREFECT_API_URL=http://127.0.0.1:{args.port}/api; "
              "prefect deployment run stage1/pilot --param count=100 --watch")
    elif args.command == "deploy":
        deploy(state, args.port, args.name)
    elif args.command == "status":
        print(status(state))
    else:
        print("stopped: " + ", ".join(down(state)) if _read_procs(state) else f"no stack in {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
