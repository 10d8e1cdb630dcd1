"""A local Stage 1 stack: a Prefect server, the `gpu` and `cpu` process pools, their workers, and
the deployments of deployments/prefect.yaml.

    python -m deployments.stack up       # server + pools + workers (one gpu worker per visible GPU)
    python -m deployments.stack deploy   # deploy everything in deployments/prefect.yaml (+ the zombie-run automation)
    python -m deployments.stack status   # what runs, where the logs are
    python -m deployments.stack down     # stop workers and server

State (pid files, logs, SQLite database, result storage, run outputs) lives in `--state-dir`
(default `.stage1-stack/` in the repo root). Every process gets telemetry off, the shared result
storage and output root, the API URL and the API auth string.
`up --database postgresql://USER:PASSWORD@HOST:5432/DB` puts the server on PostgreSQL instead (asyncpg
driver; only the server gets the URL): `up` connects first and starts nothing when it cannot, and
`status` names the database with its password masked. docs/deploy.md has the multi-machine
setup (Postgres, shared storage) and the settings.

The server requires HTTP basic auth (`PREFECT_SERVER_API_AUTH_STRING`): `up` generates a random
`stage1:<token>` into `STATE/auth` (mode 0600) unless `--auth-string` or `$STAGE1_API_AUTH` gives
one, and every stack process gets it as `PREFECT_API_AUTH_STRING`. `--no-auth` is refused unless the
server listens on loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
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


AUTH_FILE = "auth"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def read_auth(state: Path) -> str | None:
    """The stack's API auth string (`user:password`), or None for a stack started with --no-auth."""
    path = state / AUTH_FILE
    return path.read_text().strip() or None if path.is_file() else None


def write_auth(state: Path, auth: str | None) -> None:
    """Store the auth string readable by the owner only (an empty file means no auth)."""
    state.mkdir(parents=True, exist_ok=True)
    path = state / AUTH_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(auth or "")
    os.chmod(path, 0o600)


def stack_env(state: Path, port: int, *, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of every stack process (server, workers, deploy): telemetry off, one API,
    its auth string, one result storage and one output root that every worker reaches."""
    env = dict(os.environ if base is None else base)
    auth = read_auth(state)
    for key in ("PREFECT_SERVER_API_AUTH_STRING", "PREFECT_API_AUTH_STRING"):
        if auth:
            env[key] = auth
        else:
            env.pop(key, None)
    env.update({
        "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "USE_HUB_KERNELS": "0",
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


DATABASE_ENV = ("PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL")
"""Both names of the server's database setting (the second wins when both are set): the stack sets the first."""
DATABASE_SCHEMES = ("postgresql", "postgresql+asyncpg")


def database_url(url: str) -> str:
    """`url` with the asyncpg driver the Prefect server needs: `postgresql://` becomes `postgresql+asyncpg://`.

    Raises:
        SystemExit: not a PostgreSQL URL, or no database name in it.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        parsed = None
    if parsed is None or parsed.drivername not in DATABASE_SCHEMES or not parsed.host or not parsed.database:
        shown = redact_url(url) if parsed is not None else "(not a URL)"
        raise SystemExit(f"--database {shown}: expected postgresql://USER:PASSWORD@HOST:PORT/DATABASE (or "
                         "postgresql+asyncpg://...) with a host and a database name; leave --database out for SQLite "
                         "in the state folder")
    return parsed.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)


def redact_url(url: str) -> str:
    """`url` with its password replaced by ***, for logs, errors and `status`."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - never echo an unparseable URL: it may hold a password
        return "(unparseable URL)"


def check_database(url: str, timeout: float = 10.0) -> None:
    """Connect to the PostgreSQL database of `url` and run `SELECT 1`.

    Raises:
        SystemExit: it cannot connect (the message names the URL without its password, the error, the fix).
    """
    import asyncio

    import asyncpg
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    dsn = parsed.set(drivername="postgresql").render_as_string(hide_password=False)

    async def probe() -> None:
        conn = await asyncpg.connect(dsn, timeout=timeout)
        try:
            await conn.fetchval("SELECT 1")
        finally:
            await conn.close()

    try:
        asyncio.run(probe())
    except Exception as e:  # noqa: BLE001 - every failure gets the same message; asyncpg raises many kinds
        reason = f"{type(e).__name__}: {e}"
        if parsed.password:
            reason = reason.replace(parsed.password, "***")
        raise SystemExit(f"--database {redact_url(url)}: cannot connect ({reason}). Nothing was started. "
                         f"fix: check that PostgreSQL listens on {parsed.host}:{parsed.port or 5432}, that the "
                         f"database '{parsed.database}' exists (createdb {parsed.database}) and that the user and "
                         "password are right") from None


def database_label(state: Path) -> str:
    """Which database the stack in `state` uses, without a password."""
    info = state / "stack.json"
    db = json.loads(info.read_text()).get("database") if info.is_file() else None
    return db or f"SQLite {state / 'prefect-home' / 'prefect.db'}"


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


def up(state: Path, port: int, *, cpu_limit: int = 4, host: str = "127.0.0.1", auth: str | None = None,
       no_auth: bool = False, database: str | None = None, gpus: list[str] | None = None) -> dict[str, Any]:
    """Start the server, create the pools, start the workers. Returns the process table.

    One `gpu` worker per GPU, `--limit 1`, started with `CUDA_VISIBLE_DEVICES` set to that GPU alone:
    every flow run it starts inherits it, so each run sees exactly one device (`status` shows the
    pinning). Without a GPU, one `gpu` worker with `CUDA_VISIBLE_DEVICES=""` (the model runs on the CPU).

    Args:
        gpus: the GPU ids to start workers for (default: `visible_gpus`: CUDA_VISIBLE_DEVICES, else
            nvidia-smi). On a machine without GPUs, ids still start one worker each (as the tests do).
        host: the server's listen address (loopback by default).
        auth: the API auth string `user:password`; default: the one in STATE/auth, else a new random one.
        no_auth: no API auth (refused unless `host` is loopback).
        database: a `postgresql://` or `postgresql+asyncpg://` URL for the server's database; default
            SQLite in STATE/prefect-home (an inherited PREFECT_API_DATABASE_CONNECTION_URL is ignored).
            Only the server gets it; STATE/stack.json keeps it without the password.
    Raises:
        SystemExit: a stack already runs from `state`, auth is off on a non-loopback host, or `database`
            is not a PostgreSQL URL or cannot be connected to (checked before anything starts).
    """
    if no_auth and host not in LOOPBACK:
        raise SystemExit(f"refusing to serve the Prefect API on {host} without auth: anyone who reaches it could "
                         "create deployments whose pull steps run on the GPU workers (drop --no-auth, or --host 127.0.0.1)")
    db_url = database_url(database) if database else None
    state.mkdir(parents=True, exist_ok=True)
    running = {n: p for n, p in _read_procs(state).items() if _alive(p["pid"])}
    if running:
        raise SystemExit(f"a stack already runs from {state}: {', '.join(running)} (python -m deployments.stack down)")
    if db_url:
        check_database(db_url)
    write_auth(state, None if no_auth else (auth or read_auth(state) or f"stage1:{secrets.token_urlsafe(24)}"))
    env = stack_env(state, port)
    (state / "procs.json").unlink(missing_ok=True)
    (state / "stack.json").unlink(missing_ok=True)
    senv = {k: v for k, v in env.items() if k not in DATABASE_ENV}  # the server alone gets the database
    if db_url:
        senv[DATABASE_ENV[0]] = db_url
    _start("server", [*_prefect(), "server", "start", "--host", host, "--port", str(port)], senv, state)
    wait_healthy(port)
    for pool in ("gpu", "cpu"):
        subprocess.run([*_prefect(), "work-pool", "create", pool, "--type", "process", "--overwrite"], env=env,
                       cwd=REPO, check=True, capture_output=True, text=True)
    gpus = [str(g) for g in gpus] if gpus is not None else visible_gpus(env)
    for i, gpu in enumerate(gpus or [""]):
        # Pinned when the worker starts: every flow run it starts inherits this one device.
        wenv = dict(env, CUDA_VISIBLE_DEVICES=gpu)
        _start(f"worker-gpu-{i}", [*_prefect(), "worker", "start", "--pool", "gpu", "--name", f"gpu-{i}",
                                   "--limit", "1", "--install-policy", "never"], wenv, state)
    _start("worker-cpu", [*_prefect(), "worker", "start", "--pool", "cpu", "--name", "cpu-0",
                          "--limit", str(cpu_limit), "--install-policy", "never"], dict(env, CUDA_VISIBLE_DEVICES=""), state)
    (state / "stack.json").write_text(json.dumps({"port": port, "api_url": env["PREFECT_API_URL"],
                                                  "database": redact_url(db_url) if db_url else None,
                                                  "gpus": gpus, "env": {k: env[k] for k in (
                                                      "PREFECT_API_URL", "PREFECT_HOME", "PREFECT_LOCAL_STORAGE_PATH",
                                                      "STAGE1_OUTPUT_ROOT", "STAGE1_REPO")}}, indent=2))
    return _read_procs(state)


def deploy(state: Path, port: int, names: list[str] | None = None, silence_s: int | None = None) -> None:
    """Deploy deployments/prefect.yaml (all, or the named deployments) and create or update the
    automation that crashes silent runs (`silence_s`, default $STAGE1_ZOMBIE_SILENCE_S or 600)."""
    env = stack_env(state, port)
    which = [a for n in names for a in ("--name", n)] if names else ["--all"]
    subprocess.run([*_prefect(), "--no-prompt", "deploy", *which, "--prefect-file", str(PREFECT_FILE)],
                   env=env, cwd=REPO, check=True)
    subprocess.run([sys.executable, "-c", "from deployments.stack import ensure_zombie_automation; "
                                          f"print('zombie-run automation:', ensure_zombie_automation({silence_s!r}))"],
                   env=env, cwd=REPO, check=True)


ZOMBIE_SILENCE_S = 600
"""Default silence window of the zombie-run automation (`STAGE1_ZOMBIE_SILENCE_S` or `deploy --silence-s`)."""
ZOMBIE_EXPECT = frozenset({"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                           "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed",
                           # a run that waits for a human stops heartbeating on purpose: not a zombie
                           "prefect.flow-run.Suspended", "prefect.flow-run.Paused"})


def ensure_zombie_automation(silence_s: int | None = None) -> str:
    """Mark a flow run Crashed when it sends no heartbeat for `silence_s` (flow heartbeats every
    180 s by default), as in Prefect's "detect zombie flows" recipe, except for runs that suspended or
    paused (waiting for approval is not death). Creates the automation, or replaces one whose trigger
    differs (an older stack's, or another window). Returns "created", "updated" or "unchanged"."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    if silence_s is None:
        silence_s = int(os.environ.get("STAGE1_ZOMBIE_SILENCE_S", ZOMBIE_SILENCE_S))
    if silence_s < 10:
        raise SystemExit(f"zombie silence window {silence_s} s: must be at least 10 s (and above the heartbeat interval)")
    outcome = "created"
    try:
        existing = Automation.read(name=ZOMBIE_AUTOMATION)
    except ValueError:
        existing = None
    if existing is not None:
        trig = existing.trigger
        if (isinstance(trig, EventTrigger) and set(trig.expect) == ZOMBIE_EXPECT
                and trig.within == timedelta(seconds=silence_s)):
            return "unchanged"
        existing.delete()
        outcome = "updated"
    Automation(
        name=ZOMBIE_AUTOMATION,
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect=set(ZOMBIE_EXPECT),
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=silence_s),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"No heartbeat for {silence_s} s: marked Crashed by '{ZOMBIE_AUTOMATION}'")],
    ).create()
    return outcome


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


def pinning(cuda_visible_devices: str | None) -> str:
    """How `status` shows a worker's device: `GPU 1 (CUDA_VISIBLE_DEVICES=1)`, or no GPU."""
    if cuda_visible_devices is None:
        return "CUDA_VISIBLE_DEVICES unset (every GPU visible)"
    if not cuda_visible_devices.strip():
        return "no GPU (CUDA_VISIBLE_DEVICES='')"
    return f"GPU {cuda_visible_devices} (CUDA_VISIBLE_DEVICES={cuda_visible_devices})"


def status(state: Path) -> str:
    procs = _read_procs(state)
    if not procs:
        return f"no stack in {state}"
    lines = [f"{n:14s} pid {p['pid']:<7d} {'running' if _alive(p['pid']) else 'STOPPED'}  log {p['log']}"
             + (f"  {pinning(p.get('cuda_visible_devices'))}" if n.startswith("worker") else "")
             for n, p in procs.items()]
    info = state / "stack.json"
    if info.is_file():
        port = json.loads(info.read_text())["port"]
        auth = f"   auth: basic, {read_auth(state).split(':')[0]} / the password in {state / AUTH_FILE}" if read_auth(state) else \
            "   auth: none (loopback only)"
        lines.insert(0, f"API: http://127.0.0.1:{port}/api   UI: http://127.0.0.1:{port}{auth}")
        lines.insert(1, f"database: {database_label(state)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deployments.stack", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["up", "deploy", "status", "down"])
    ap.add_argument("--state-dir", type=Path, default=Path(os.environ.get("STAGE1_STACK_DIR", DEFAULT_STATE)),
                    help="pid files, logs, SQLite database, results, outputs (default .stage1-stack/)")
    ap.add_argument("--port", type=int, default=4200, help="Prefect server port (default 4200)")
    ap.add_argument("--name", action="append", default=None, help="deploy only this deployment (repeatable)")
    ap.add_argument("--cpu-limit", type=int, default=4, help="concurrent runs of the cpu worker (default 4)")
    ap.add_argument("--gpus", default=None, metavar="IDS",
                    help="up: comma-separated GPU ids, one gpu worker pinned to each (default: CUDA_VISIBLE_DEVICES, "
                         "else every GPU nvidia-smi lists)")
    ap.add_argument("--host", default="127.0.0.1", help="server listen address (default 127.0.0.1: this machine only)")
    ap.add_argument("--auth-string", default=os.environ.get("STAGE1_API_AUTH"),
                    help="API basic auth 'user:password' (default $STAGE1_API_AUTH, else a random one kept in STATE/auth)")
    ap.add_argument("--no-auth", action="store_true", help="no API auth (loopback host only)")
    ap.add_argument("--database", metavar="URL", default=None,
                    help="up: the server's database, postgresql://USER:PASSWORD@HOST:5432/DB (asyncpg driver; checked "
                         "before anything starts); default SQLite in the state folder")
    ap.add_argument("--silence-s", type=int, default=None,
                    help="deploy: mark a run Crashed after this many seconds without a heartbeat, unless it is "
                         "suspended or paused (default $STAGE1_ZOMBIE_SILENCE_S or 600)")
    args = ap.parse_args(argv)
    state = args.state_dir.resolve()
    if args.command != "up" and (state / "stack.json").is_file():
        args.port = json.loads((state / "stack.json").read_text())["port"]
    if args.command == "up":
        gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus is not None else None
        up(state, args.port, cpu_limit=args.cpu_limit, host=args.host, auth=args.auth_string, no_auth=args.no_auth,
           database=args.database, gpus=gpus)
        print(status(state))
        print(f"\nnext: python -m deployments.stack deploy --state-dir {state} --port {args.port}")
        auth = f"; export PREFECT_API_AUTH_STRING=\"$(cat {state / AUTH_FILE})\"" if read_auth(state) else ""
        print(f"then: export PREFECT_API_URL=http://127.0.0.1:{args.port}/api{auth}; "
              "prefect deployment run stage1/pilot --param count=100 --watch")
    elif args.command == "deploy":
        deploy(state, args.port, args.name, args.silence_s)
    elif args.command == "status":
        print(status(state))
    else:
        print("stopped: " + ", ".join(down(state)) if _read_procs(state) else f"no stack in {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
