"""Disk full and permission errors while writing (`STAGE1_FAULT=write@...:ENOSPC` / `:EACCES`, since
tests run as root): the CLI exits 1 with one error block naming the file, the errno and the fix, no
traceback, and the previous run's final files byte for byte as they were."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.flows.conftest import REPO

ARGS = ("--count", "6", "--seed", "7", "--model", "fake:1")  # halts (sample too small): exit 4, quick
FINAL = ("pilot_data.jsonl", "rejected.jsonl", "qc_summary.json", "session_manifest.json", "config.yaml")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, api_url):
    """A finished fake pilot in `<cwd>/o`."""
    cwd = tmp_path_factory.mktemp("write-faults")
    env = dict(os.environ, PREFECT_API_URL=api_url, PYTHONPATH=str(REPO))
    env.pop("STAGE1_FAULT", None)
    r = subprocess.run([sys.executable, "-m", "flows.pilot", *ARGS, "--output", "o"], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 4, r.stderr[-3000:]
    return cwd


@pytest.mark.parametrize("code, text, fix", [
    ("ENOSPC", "No space left on device", "free space on the device that holds {o} (`df -h {o}`)"),
    ("EACCES", "Permission denied", "fix the folder's permissions: the user running Stage 1 must be able to create "
                                    "and rename files in {o} (`ls -ld {o}`), or pass another --output"),
], ids=["ENOSPC", "EACCES"])
def test_refused_final_write_exits_1_with_one_block_and_keeps_the_previous_outputs(finished, run_cli, code, text,
                                                                                    fix):
    out = finished / "o"
    before = {n: (out / n).read_bytes() for n in FINAL}
    # The top-level pilot_data.jsonl (the first final file the rerun writes), not iterations/01/'s.
    r = run_cli(*ARGS, "--output", "o", cwd=finished, env={"STAGE1_FAULT": f"write@*/o/pilot_data.jsonl:{code}"})
    assert r.returncode == 1, r.stderr[-3000:]
    target = out / "pilot_data.jsonl"
    assert r.stderr.rstrip().splitlines()[-4:] == [
        f"error: could not write {target}: {code} ({text}) while writing the temp file",
        f"  file:     {target}",
        f"  fix:      {fix.format(o=out)}; then rerun the same command (finished work is reused)",
        "  kept:     the previous version of pilot_data.jsonl is untouched; no temp file is left",
    ], r.stderr[-3000:]
    assert sum(line.startswith("error:") for line in r.stderr.splitlines()) == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "kept pairs in" not in r.stdout  # no success line
    after = {n: (out / n).read_bytes() for n in FINAL}
    assert after == before, [n for n in FINAL if after[n] != before[n]]
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


def test_a_refused_write_is_not_retried():
    """Retrying a full disk 5 s later fails the same way: the phase tasks' retry condition says no."""
    import errno

    from prefect.states import Failed

    from stage1_core.infra.errors import WriteError
    from tasks.phases import transient_only

    e = WriteError("/o/pilot_data.jsonl", errno.ENOSPC, "No space left on device", "writing the temp file")
    assert not transient_only(None, None, Failed(data=e))


def test_a_refused_rerun_of_an_iterate_folder_keeps_its_suggested_config(run_cli, tmp_path):
    iterate = ("--count", "30", "--seed", "7", "--model", "fake:1,runaway=0.5", "--max-iterations", "0")  # exit 3
    assert run_cli(*iterate, "--output", "o").returncode == 3
    suggested = tmp_path / "o" / "suggested_config.yaml"
    before = suggested.read_bytes()
    r = run_cli(*iterate, "--output", "o", env={"STAGE1_FAULT": "write@*/o/pilot_data.jsonl:ENOSPC"})
    assert r.returncode == 1, r.stderr[-3000:]
    assert suggested.read_bytes() == before  # it used to be deleted as the rerun started
    assert run_cli(*iterate, "--output", "o").returncode == 3 and suggested.read_bytes() == before
