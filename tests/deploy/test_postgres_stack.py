"""`deployments.stack up --database postgresql://...`: a stack whose server keeps its state in PostgreSQL.

One pilot deployment run (fake model, count 3) goes through a stack on a throwaway database
`stage1_test_<hex>` created on the local PostgreSQL and dropped afterwards; the run must be Completed
in the API *and* in PostgreSQL's `flow_run` table, no SQLite file may appear, and the URL's password
must show up nowhere (status, logs, state files). Skipped, with the reason, only when no PostgreSQL
answers: `$STAGE1_TEST_POSTGRES` (an admin URL that may create databases), else
postgres@127.0.0.1:5432/postgres, else root@127.0.0.1:5432/root. The refusals of a bad or
unreachable URL need no PostgreSQL.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import uuid
from pathlib import Path

import pytest

from deployments import stack
from tests.deploy.conftest import _free_port, prefect_cli

ADMIN_URLS = ("postgresql://postgres@127.0.0.1:5432/postgres", "postgresql://root@127.0.0.1:5432/root")
SECRET = f"pw-{secrets.token_hex(8)}"  # trust auth ignores it; it must never be printed or written


def _dsn(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _fetch(url: str, sql: str, *args):
    import asyncpg

    async def go():
        conn = await asyncpg.connect(_dsn(url), timeout=5)
        try:
            return await conn.fetch(sql, *args)
        finally:
            await conn.close()

    return asyncio.run(go())


def _admin_url() -> str:
    candidates = [os.environ["STAGE1_TEST_POSTGRES"]] if os.environ.get("STAGE1_TEST_POSTGRES") else ADMIN_URLS
    errors = []
    for url in candidates:
        try:
            _fetch(url, "SELECT 1")
            return url
        except Exception as e:  # noqa: BLE001 - any failure means: try the next one, then skip
            errors.append(f"{stack.redact_url(url)}: {type(e).__name__}: {e}")
    pytest.skip("no PostgreSQL reachable (set STAGE1_TEST_POSTGRES to an admin URL): " + "; ".join(errors))


@pytest.fixture
def pg_database():
    """A fresh database on the local PostgreSQL; yields its URL (with a dummy password), drops it after."""
    from sqlalchemy.engine import make_url

    admin = _admin_url()
    name = f"stage1_test_{secrets.token_hex(4)}"
    _fetch(admin, f'CREATE DATABASE "{name}"')
    try:
        yield make_url(admin).set(database=name, password=SECRET).render_as_string(hide_password=False)
    finally:
        _fetch(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        assert not _fetch(admin, "SELECT 1 FROM pg_database WHERE datname = $1", name)


def test_pilot_deployment_on_postgres(pg_database, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_WORKER_QUERY_SECONDS", "1")  # stack_env keeps it: workers poll every second
    monkeypatch.setenv("PREFECT_WORKER_PREFETCH_SECONDS", "2")
    monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", "sqlite+aiosqlite:////nonexistent/ignored.db")
    state, port = tmp_path / "stack", _free_port()
    try:
        stack.up(state, port, cpu_limit=2, database=pg_database.replace("postgresql://", "postgresql+asyncpg://", 1))
        stack.deploy(state, port, ["pilot"])
        env = stack.stack_env(state, port)
        r = prefect_cli(env, "deployment", "run", "stage1/pilot", "--param", "count=3", "--param", "model=fake:1",
                        "--watch", "--watch-timeout", "120", timeout=180)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        run_id = uuid.UUID(re.search(r"UUID: ([0-9a-f-]{36})", r.stdout).group(1))

        # The run lives in PostgreSQL, Completed, with its task runs; the server made no SQLite file.
        (row,) = _fetch(pg_database, "SELECT name, state_type::text AS state FROM flow_run WHERE id = $1", run_id)
        assert row["state"] == "COMPLETED" and row["name"].startswith("pilot-3-seed42-"), dict(row)
        (tasks,) = _fetch(pg_database, "SELECT count(*) AS n, count(*) FILTER (WHERE state_type::text = 'COMPLETED') "
                                       "AS done FROM task_run WHERE flow_run_id = $1", run_id)
        assert tasks["n"] > 0 and tasks["done"] == tasks["n"], dict(tasks)
        assert (Path(env["STAGE1_OUTPUT_ROOT"]) / "pilot" / row["name"] / "pilot_data.jsonl").is_file()
        assert not list(state.rglob("*.db")), list(state.rglob("*.db"))

        # status names the database; the password is nowhere: not in status, logs or state files.
        shown = stack.status(state)
        db_name = pg_database.rsplit("/", 1)[1]
        assert re.search(rf"^database: postgresql\+asyncpg://\w+:\*\*\*@127\.0\.0\.1:5432/{db_name}$", shown, re.M), shown
        assert SECRET not in shown + r.stdout + r.stderr
        leaks = [p for p in state.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
        assert not leaks, leaks
    finally:
        stack.down(state)


@pytest.mark.parametrize("url", ["sqlite:///prefect.db", f"mysql://u:{SECRET}@127.0.0.1/prefect",
                                 "postgresql://127.0.0.1:5432", "not a url"],
                         ids=["sqlite", "mysql-with-password", "postgres-without-database", "not-a-url"])
# fixed ids: SECRET differs per process, and parallel workers must collect the same test names
def test_up_refuses_a_url_that_is_not_postgres(url, tmp_path):
    with pytest.raises(SystemExit, match="expected postgresql://USER:PASSWORD@HOST:PORT/DATABASE") as e:
        stack.main(["up", "--state-dir", str(tmp_path / "stack"), "--database", url])
    assert SECRET not in str(e.value)
    assert not (tmp_path / "stack").exists()  # refused before anything was made


def test_up_refuses_an_unreachable_database_before_starting_anything(tmp_path):
    state, closed = tmp_path / "stack", _free_port()  # nothing listens there
    url = f"postgresql://stage1:{SECRET}@127.0.0.1:{closed}/prefect"
    with pytest.raises(SystemExit, match=rf"cannot connect .*Nothing was started.*127\.0\.0\.1:{closed}") as e:
        stack.up(state, _free_port(), database=url)
    assert SECRET not in str(e.value) and "stage1:***@" in str(e.value)
    assert not (state / "procs.json").exists() and not (state / "server.log").exists()
    assert not (state / stack.AUTH_FILE).exists()
