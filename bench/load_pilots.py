"""Benchmark: N pilot runs at once through one local Prefect server, on SQLite and on PostgreSQL (not a test).

    .venv/bin/python bench/load_pilots.py [--runs 4] [--count 30] [--admin-url URL] [--out FILE]

For each database, in turn: `deployments.stack up` on a fresh state folder (SQLite: the stack's default,
in the state folder; PostgreSQL: `--database` on a throwaway database `stage1_bench_<hex>` created
through `--admin-url` and dropped afterwards), then N `python -m flows.pilot --model fake:1 --count C
--seed 42+i --output DIR` processes started at the same moment against that server (PREFECT_API_URL and
the stack's auth string; distinct seeds so no run hits another's cache), then `stack down`.

Records per database: runs, completed (flow runs the server reports Completed whose process exited
with a verdict code 0/3/4), errors (runs that did not), exit codes, "database is locked" counted in
the server log and in the runs' output, ERROR/Traceback lines in both, wall seconds from the start of
the first run to the exit of the last. Also the machine's load average before and after and what
else ran (other agents share the machine: say so). Writes JSON (default
bench/results/load_pilots-<date>.json) and prints it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "USE_HUB_KERNELS": "0", "DO_NOT_TRACK": "1",
                   "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})

from deployments import stack  # noqa: E402

LOCKED = re.compile(r"database is locked", re.I)
ERROR_LINE = re.compile(r"\bERROR\b|Traceback \(most recent call last\)")
VERDICT_EXITS = (0, 3, 4)  # scale, iterate, halt: a finished pilot


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg(url: str, sql: str) -> None:
    import asyncpg
    from sqlalchemy.engine import make_url

    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)

    async def go() -> None:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(go())


def _flow_run_states(env: dict[str, str]) -> dict[str, str]:
    """Flow run name -> state type, read from the server's API."""
    import httpx

    auth = env.get("PREFECT_API_AUTH_STRING")
    r = httpx.post(f"{env['PREFECT_API_URL']}/flow_runs/filter", json={"limit": 200}, timeout=30,
                   auth=tuple(auth.split(":", 1)) if auth else None)
    r.raise_for_status()
    return {fr["name"]: (fr.get("state_type") or "NONE") for fr in r.json()}


def _others() -> list[str]:
    """Other busy processes on the machine (not ours), as `%cpu command`, for the record."""
    out = subprocess.run(["ps", "-eo", "pid,ppid,pcpu,args", "--sort=-pcpu"], capture_output=True, text=True).stdout
    table = [line.split(None, 3) for line in out.splitlines()[1:]]
    ours, grew = {os.getpid()}, True
    while grew:  # our descendants: the stack's server (uvicorn is its child), workers, the pilots
        before = len(ours)
        ours |= {int(pid) for pid, ppid, *_ in table if int(ppid) in ours}
        grew = len(ours) > before
    return [f"{cpu}% {args[:120]}" for pid, _, cpu, args in table
            if int(pid) not in ours and float(cpu) >= 5.0 and "ps -eo" not in args][:8]


def measure(label: str, runs: int, count: int, database: str | None, work: Path) -> dict:
    state, port = work / f"{label}-stack", _free_port()
    out_root = work / f"{label}-out"
    record: dict = {"database": label, "runs": runs, "count": count}
    try:
        t = time.perf_counter()
        stack.up(state, port, cpu_limit=1, database=database)
        record["stack_up_s"] = round(time.perf_counter() - t, 1)
        env = stack.stack_env(state, port)
        record["database_url"] = stack.database_label(state).replace(str(state), f"<state {label}>")
        logs = [work / f"{label}-run{i}.log" for i in range(runs)]
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        procs = []
        for i in range(runs):
            cmd = [sys.executable, "-m", "flows.pilot", "--model", "fake:1", "--count", str(count),
                   "--seed", str(42 + i), "--output", str(out_root / f"run{i}")]
            procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=open(logs[i], "wb"),  # noqa: SIM115
                                          stderr=subprocess.STDOUT))
        time.sleep(5)
        others = _others()  # sampled once the runs are going
        per_run = []
        for p in procs:
            p.wait(timeout=1800)
            per_run.append(round(time.perf_counter() - t0, 1))
        wall = time.perf_counter() - t0
        states = _flow_run_states(env)
        pilots = {n: s for n, s in states.items() if n.startswith(f"pilot-{count}-")}
        client_text = "\n".join(p.read_text(errors="replace") for p in logs)
        server_text = (state / "server.log").read_text(errors="replace")
        exits = [p.returncode for p in procs]
        server_state = [pilots.get(f"pilot-{count}-seed{42 + i}", "MISSING") for i in range(runs)]
        completed = sum(1 for e, s in zip(exits, server_state) if e in VERDICT_EXITS and s == "COMPLETED")
        record.update({
            "completed": completed,
            "errors": runs - completed,
            "database_locked": len(LOCKED.findall(server_text)) + len(LOCKED.findall(client_text)),
            "database_locked_server": len(LOCKED.findall(server_text)),
            "database_locked_clients": len(LOCKED.findall(client_text)),
            "wall_s": round(wall, 1),
            "exit_codes": exits,
            "per_run_done_at_s": per_run,
            "flow_run_states": dict(sorted(pilots.items())),
            "server_log_lines": server_text.count("\n"),
            "error_lines_server": len(ERROR_LINE.findall(server_text)),
            "error_lines_clients": len(ERROR_LINE.findall(client_text)),
            "first_errors": [ln[:300] for ln in (server_text + "\n" + client_text).splitlines()
                             if ERROR_LINE.search(ln) or LOCKED.search(ln)][:5],
            "load_avg_before": [round(x, 2) for x in load_before],
            "load_avg_after": [round(x, 2) for x in os.getloadavg()],
            "other_processes_during": others,
        })
    finally:
        stack.down(state)
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=4, help="pilot processes at once (default 4)")
    ap.add_argument("--count", type=int, default=30, help="--count of each pilot (default 30)")
    ap.add_argument("--admin-url", default=os.environ.get("STAGE1_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"),
                    help="a PostgreSQL URL allowed to create databases (default $STAGE1_BENCH_POSTGRES or "
                         "postgresql://postgres@127.0.0.1:5432/postgres)")
    ap.add_argument("--skip-postgres", action="store_true")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / f"load_pilots-{date.today().isoformat()}.json")
    args = ap.parse_args(argv)

    records = []
    with tempfile.TemporaryDirectory(prefix="stage1-load-") as tmp:
        work = Path(tmp)
        records.append(measure("sqlite", args.runs, args.count, None, work))
        print(json.dumps(records[-1], indent=2), flush=True)
        if not args.skip_postgres:
            from sqlalchemy.engine import make_url

            name = f"stage1_bench_{secrets.token_hex(4)}"
            _pg(args.admin_url, f'CREATE DATABASE "{name}"')
            try:
                url = make_url(args.admin_url).set(database=name).render_as_string(hide_password=False)
                records.append(measure("postgresql", args.runs, args.count, url, work))
                print(json.dumps(records[-1], indent=2), flush=True)
            finally:
                _pg(args.admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    import prefect

    result = {
        "bench": "load_pilots",
        "what": f"{args.runs} x `python -m flows.pilot --model fake:1 --count {args.count}` at once through one "
                "local Prefect server started by deployments.stack (API auth on, workers idle)",
        "date": date.today().isoformat(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "prefect": prefect.__version__},
        "records": records,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
