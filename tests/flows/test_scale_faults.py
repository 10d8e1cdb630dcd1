"""The scale CLI killed (SIGKILL via STAGE1_FAULT) during generation, during a shard write, after a
shard's files but before its manifest, and during the merge: a rerun of the same command ends with
the same scale_data.jsonl as an uninterrupted run (no row lost or duplicated, no temp file left,
finished shards not recomputed). A second run on a locked folder exits 5."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.flows.conftest import REPO, read_jsonl

ARGS = ("--count", "11", "--shard-size", "4", "--seed", "5", "--model", "fake:4")


def cli(api_url, cwd, *args, env=None, timeout=300):
    e = dict(os.environ, PREFECT_API_URL=api_url, PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run([sys.executable, "-m", "flows.scale", *args], cwd=cwd, env=e, capture_output=True,
                          text=True, timeout=timeout)


def comparable(path):
    rows = read_jsonl(path)
    for r in rows:
        r["provenance"].pop("run_id")
    return rows


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from flows.scale import scale

    out = tmp_path_factory.mktemp("ref") / "ref"
    assert scale(output=str(out), count=11, shard_size=4, seed=5, model="fake:4")["exit_code"] == 0
    return comparable(out / "scale_data.jsonl"), (out / "rejected.jsonl").read_text()


# Killed runs in one folder, one after the other (hits are counted per process):
# generate:4 in shard 1's first round (shard 0 reaches the point 3 times); write@shard-*.jsonl:1 with shard 1's
# data file half-written; shard_write:1 after shard 1's files, before its manifest; shard_write:2 the same for
# shard 2 (shard 1 done); merge:1 after scale_data.jsonl and rejected.jsonl, before the QC summary, card and
# session manifest. Then one clean rerun.
STEPS = [("generate:4", [0]), ("write@shard-*.jsonl:1", [0]), ("shard_write:1", [0]), ("shard_write:2", [0, 1]),
         ("merge:1", [0, 1, 2])]


def test_killed_at_every_point_then_rerun_matches_uninterrupted(reference, api_url, tmp_path):
    out = tmp_path / "o"
    computed_by: dict[int, str] = {}
    for fault, complete in STEPS:
        r = cli(api_url, tmp_path, *ARGS, "--output", "o", env={"STAGE1_FAULT": fault})
        assert r.returncode == -signal.SIGKILL, f"fault {fault} never fired: rc={r.returncode}\n{r.stderr[-2000:]}"
        assert not (out / "session_manifest.json").exists()
        done = sorted(p.name for p in (out / "shards").glob("*.manifest.json"))
        assert done == [f"shard-{i:05d}.manifest.json" for i in complete], fault
        for i in complete:  # a finished shard is never recomputed
            run_id = json.loads((out / "shards" / f"shard-{i:05d}.manifest.json").read_text())["run_id"]
            assert computed_by.setdefault(i, run_id) == run_id, (fault, i)
    assert (out / "scale_data.jsonl").exists()  # the merge had written it when killed
    r = cli(api_url, tmp_path, *ARGS, "--output", "o")
    assert r.returncode == 0, r.stderr[-3000:]
    rows, rejected = reference
    assert comparable(out / "scale_data.jsonl") == rows
    assert (out / "rejected.jsonl").read_text() == rejected
    ids = [x["id"] for x in rows]
    assert len(ids) == len(set(ids))
    manifest = json.loads((out / "session_manifest.json").read_text())
    assert [(s["shard"], s["run_id"], s["computed_in_this_run"]) for s in manifest["shards"]] == \
        [(i, computed_by[i], False) for i in range(3)]
    leftovers = [p for p in out.rglob("*") if ".tmp-" in p.name or p.name.endswith(".work")]
    assert not leftovers, leftovers


def test_second_run_on_a_locked_folder_exits_5(api_url, tmp_path):
    env = dict(os.environ, PREFECT_API_URL=api_url, PYTHONPATH=str(REPO), STAGE1_FAKE_DELAY="1")
    first = subprocess.Popen([sys.executable, "-m", "flows.scale", *ARGS, "--output", "o"], cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not (tmp_path / "o" / "shards").exists():
            time.sleep(0.2)
        assert first.poll() is None and (tmp_path / "o" / "shards").exists()
        second = cli(api_url, tmp_path, *ARGS, "--output", "o")
        assert first.poll() is None, "the first run ended before the second tried the lock"
        assert second.returncode == 5, second.stderr[-3000:]
        assert "is locked by another run" in second.stderr and str(tmp_path / "o") in second.stderr
        assert f"pid {first.pid}" in second.stderr
        assert not (tmp_path / "o" / "scale_data.jsonl").exists()
    finally:
        first.kill()
        first.wait(timeout=60)
