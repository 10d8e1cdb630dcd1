"""Kill points (STAGE1_FAULT SIGKILLs the process at a named point) and Ctrl-C: a rerun of the same
command finishes with the same data as an uninterrupted run, and no temp file is ever left."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from tests.flows.conftest import read_jsonl

ARGS = ("--count", "24", "--seed", "5", "--model", "fake:4", "--max-iterations", "0")


def comparable(rows):
    for r in rows:
        r["provenance"].pop("run_id")
    return rows


@pytest.fixture(scope="module")
def reference(tmp_path_factory, api_url):
    import os
    from tests.flows.conftest import REPO

    cwd = tmp_path_factory.mktemp("ref")
    env = dict(os.environ, PREFECT_API_URL=api_url, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "flows.pilot", *ARGS, "--output", "ref"], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode in (0, 3, 4), r.stderr[-3000:]
    return r.returncode, comparable(read_jsonl(cwd / "ref" / "pilot_data.jsonl")), (cwd / "ref" / "rejected.jsonl").read_text()


@pytest.mark.parametrize("fault", ["generate:2", "write:3", "phase_end:2", "critic:5", "write:14"])
def test_kill_then_rerun_matches_uninterrupted(fault, reference, run_cli, tmp_path):
    r = run_cli(*ARGS, "--output", "o", env={"STAGE1_FAULT": fault})
    assert r.returncode == -signal.SIGKILL, f"fault {fault} never fired: rc={r.returncode}\n{r.stderr[-2000:]}"
    r = run_cli(*ARGS, "--output", "o")
    rc, rows, rejected = reference
    assert r.returncode == rc, r.stderr[-3000:]
    assert comparable(read_jsonl(tmp_path / "o" / "pilot_data.jsonl")) == rows
    assert (tmp_path / "o" / "rejected.jsonl").read_text() == rejected
    leftovers = [p for p in (tmp_path / "o").rglob("*") if ".tmp-" in p.name]
    assert not leftovers, leftovers


def test_ctrl_c_stops_cleanly(api_url, tmp_path):
    import os
    from tests.flows.conftest import REPO

    env = dict(os.environ, PREFECT_API_URL=api_url, PYTHONPATH=str(REPO), STAGE1_FAKE_DELAY="0.2")
    p = subprocess.Popen([sys.executable, "-m", "flows.pilot", *ARGS, "--output", "o"], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "o" / "instructions").glob("round-01.generated.jsonl")):
        time.sleep(0.2)
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-3000:]
    assert "interrupted" in err and "half-written" in err
    assert not [q for q in (tmp_path / "o").rglob("*") if ".tmp-" in q.name]
    assert not (tmp_path / "o" / "pilot_data.jsonl").exists()
