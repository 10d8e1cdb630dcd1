"""The scale flow end to end on the fake backend, in-process against the Prefect test harness:
files and schemas, resume without recomputation, shard determinism, a broken shard redone,
--from-pilot with a real pilot, --strict-qc, --dry-run, and the deployment hooks' local side."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stage1_core.scale import plan as core, shards
from tests.flows.conftest import read_jsonl

FAKE = "fake:4"
ARGS = dict(count=11, shard_size=4, seed=5, model=FAKE)


def run_scale(out: Path, **kw):
    from flows.scale import scale

    return scale(output=str(out), **{**ARGS, **kw})


def no_run_id(rows):
    for r in rows:
        r.get("provenance", {}).pop("run_id", None)
    return rows


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("scale") / "o"
    result = run_scale(out)
    return out, result


def test_writes_every_file_with_schema(finished):
    out, result = finished
    assert result["exit_code"] == 0
    for name in ("scale_data.jsonl", "rejected.jsonl", "qc_summary.json", "session_manifest.json", "config.yaml",
                 "README.md", ".stage1_run.json"):
        assert (out / name).is_file(), name
    data = read_jsonl(out / "scale_data.jsonl")
    manifest = json.loads((out / "session_manifest.json").read_text())
    summary = json.loads((out / "qc_summary.json").read_text())
    assert len(data) == result["rows"] == summary["counts"]["rows"] <= 11
    ids = [r["id"] for r in data]
    assert len(set(ids)) == len(ids) and ids == sorted(ids)  # (shard, row) order
    assert {r["provenance"]["shard"] for r in data} == {0, 1, 2}
    assert all(r["provenance"]["shard_seed"] == core.shard_seed(5, r["provenance"]["shard"]) for r in data)
    assert set(summary) >= {"gate", "passed", "metrics", "thresholds", "counts", "rejected_by_reason", "critic_dev"}
    assert summary["passed"] == (summary["gate"]["decision"] == "scale")
    assert [s["shard"] for s in manifest["shards"]] == [0, 1, 2] and [s["size"] for s in manifest["shards"]] == [4, 4, 3]
    assert all(s["computed_in_this_run"] for s in manifest["shards"])
    assert {a["path"].rsplit("/", 1)[1] for a in manifest["artifacts"]} == {
        "scale_data.jsonl", "rejected.jsonl", "qc_summary.json", "config.yaml", "README.md"}
    assert manifest["exit_code"] == 0 and manifest["forced"] is False and manifest["gpu_seconds"] == 0.0
    assert set(manifest["plan_estimate"]) >= {"tokens", "gpu_seconds", "cost_usd"}
    rejected = read_jsonl(out / "rejected.jsonl")
    assert all(r["reason"] for r in rejected) and len({r["id"] for r in rejected}) == len(rejected)
    assert not set(ids) & {r["id"] for r in rejected if r["phase"] != "merge"}
    # Kept rows + merge drops are exactly the shards' rows.
    shard_rows = [r["id"] for i in range(3) for r in read_jsonl(shards.paths(out, i)["data"])]
    assert sorted(shard_rows) == sorted(ids + [r["id"] for r in rejected if r["phase"] == "merge"])
    card = (out / "README.md").read_text()
    assert "load_dataset" in card and "Self-Instruct" in card and f"kept: **{len(data)}**" in card
    assert not list(out.rglob("*.tmp-*")) and not list((out / "shards").glob("*.work"))


def test_rerun_resumes_without_recomputing(finished):
    out, first = finished
    before = (out / "scale_data.jsonl").read_bytes()
    again = run_scale(out)
    manifest = json.loads((out / "session_manifest.json").read_text())
    assert again["shards_computed"] == [] and not any(s["computed_in_this_run"] for s in manifest["shards"])
    assert all(s["run_id"] == first["run_id"] for s in manifest["shards"])
    assert (out / "scale_data.jsonl").read_bytes() == before


def test_same_command_elsewhere_gives_the_same_rows_in_the_same_order(finished, tmp_path):
    out, _ = finished
    run_scale(tmp_path / "b")
    assert no_run_id(read_jsonl(tmp_path / "b" / "scale_data.jsonl")) == no_run_id(read_jsonl(out / "scale_data.jsonl"))


def test_broken_shard_is_redone_alone(finished, tmp_path):
    import shutil

    out, _ = finished
    copy = tmp_path / "c"
    shutil.copytree(out, copy)
    shards.paths(copy, 1)["manifest"].unlink()
    data = shards.paths(copy, 2)["data"]
    data.write_text(data.read_text() + "\n")  # a byte changed: its sha256 no longer matches
    result = run_scale(copy)
    assert result["shards_computed"] == [1, 2]
    assert no_run_id(read_jsonl(copy / "scale_data.jsonl")) == no_run_id(read_jsonl(out / "scale_data.jsonl"))


def test_scale_shard_flow_computes_one_shard_from_explicit_parameters(finished, tmp_path):
    from flows.scale import scale_shard
    from tasks.scale import shard_parameters

    out, _ = finished
    plan = core.prepare_scale(output=str(tmp_path / "d"), **ARGS)
    core.claim(plan, "orchestrator")
    params = shard_parameters(plan, 2, "orchestrator")
    assert json.loads(json.dumps(params)) == params and params["config"].endswith("config.yaml")
    manifest = scale_shard(**params)
    assert manifest.shard == 2 and manifest.run_id == "orchestrator"
    assert no_run_id(read_jsonl(shards.paths(tmp_path / "d", 2)["data"])) == \
        no_run_id(read_jsonl(shards.paths(out, 2)["data"]))
    with pytest.raises(Exception, match="belongs to another run"):
        scale_shard(**{**params, "seed": 6})


def test_strict_qc_exit_codes(tmp_path, capsys):
    from flows.scale import main

    args = ["--count", "6", "--shard-size", "3", "--seed", "5", "--model", FAKE]
    assert main([*args, "--output", str(tmp_path / "a")]) == 0  # 6 pairs < min_n: QC fails, data complete
    summary = json.loads((tmp_path / "a" / "qc_summary.json").read_text())
    assert summary["passed"] is False and "sample too small" in summary["gate"]["reasons"][0]
    assert main([*args, "--output", str(tmp_path / "b"), "--strict-qc"]) == 4
    assert json.loads((tmp_path / "b" / "session_manifest.json").read_text())["exit_code"] == 4
    assert "QC did not pass" in capsys.readouterr().out


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    from flows.scale import main

    out = tmp_path / "o"
    assert main(["--count", "15000", "--shard-size", "500", "--seed", "1", "--model", FAKE, "--output", str(out),
                 "--gpu-hour-usd", "2.5", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "30 shards of 500" in text and "tokens" in text and "GPU-hours" in text and "$2.5/GPU-hour" in text
    assert not out.exists()


@pytest.fixture(scope="module")
def pilots(tmp_path_factory):
    from flows.pilot import pilot

    base = tmp_path_factory.mktemp("pilots")
    pilot(count=30, output=str(base / "good"), seed=7, model="fake:1,runaway=0.12", max_iterations=2)
    pilot(count=20, output=str(base / "halt"), seed=7, model="fake:1,bad=0.95", max_iterations=0)
    cool = base / "cool.yaml"
    cool.write_text("instruction_generation:\n  temperature: 0.7\n")
    pilot(count=30, output=str(base / "repeats"), seed=7, model="fake:1,repeat=0.8", max_iterations=2, config=str(cool))
    return base


def test_from_pilot_scales_with_the_instruction_settings_the_pilot_finished_with(pilots, tmp_path):
    rep = json.loads((pilots / "repeats" / "session_manifest.json").read_text())
    assert rep["decision"]["decision"] == "scale"
    assert [it["instruction_generation"]["temperature"] for it in rep["iterations"]] == [0.7, 0.9]
    from flows.scale import main

    out = tmp_path / "o"
    assert main(["--count", "8", "--shard-size", "4", "--output", str(out), "--from-pilot", str(pilots / "repeats")]) == 0
    rows = read_jsonl(out / "scale_data.jsonl")
    assert rows and {r["provenance"]["generation"]["instruction"]["temperature"] for r in rows} == {0.9}


def test_from_pilot_scales_with_the_settings_the_pilot_finished_with(pilots, tmp_path):
    good = json.loads((pilots / "good" / "session_manifest.json").read_text())
    assert good["decision"]["decision"] == "scale" and len(good["iterations"]) > 1
    final_t = good["iterations"][-1]["response_generation"]["temperature"]
    from flows.scale import main

    out = tmp_path / "o"
    assert main(["--count", "8", "--shard-size", "4", "--output", str(out), "--from-pilot", str(pilots / "good")]) == 0
    rows = read_jsonl(out / "scale_data.jsonl")
    assert rows and all(r["provenance"]["generation"]["response"]["temperature"] == final_t for r in rows)
    assert final_t < 0.7 and all(r["provenance"]["seed"] == 7 for r in rows)
    manifest = json.loads((out / "session_manifest.json").read_text())
    assert manifest["pilot"]["run_id"] == good["run_id"] and manifest["forced"] is False
    # Same model and critic settings: the pilot's dev-set measurement is reused, not measured again.
    pilot_dev = json.loads((pilots / "good" / "qc_summary.json").read_text())["critic_dev"]
    summary = json.loads((out / "qc_summary.json").read_text())
    assert summary["critic_dev"] == pilot_dev and pilot_dev
    # ... and its AUC reaches the scale gate (it used to be dropped: critic_min_auc failed every scale run).
    for kind in ("instruction", "pair"):
        assert summary["metrics"][f"critic_dev_auc_{kind}"]["value"] == pilot_dev[kind]["auc"] is not None
    assert json.loads(shards.paths(out, 0)["manifest"].read_text())["critic_dev"] is None


def test_from_pilot_refuses_a_halted_pilot_unless_forced(pilots, tmp_path, capsys):
    from flows.scale import main

    args = ["--count", "4", "--shard-size", "2", "--from-pilot", str(pilots / "halt")]
    assert main([*args, "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "gate said 'halt', not 'scale'" in err and "--force" in err and "nothing was written" in err
    assert not (tmp_path / "o").exists()
    assert main([*args, "--output", str(tmp_path / "o"), "--config", "x.yaml"]) == 2
    assert main([*args, "--output", str(tmp_path / "f"), "--force"]) == 0
    manifest = json.loads((tmp_path / "f" / "session_manifest.json").read_text())
    assert manifest["forced"] is True and manifest["pilot"]["decision"]["decision"] == "halt"
    assert "**forced**" in (tmp_path / "f" / "README.md").read_text()


def test_deployment_hooks_derive_folder_and_seed_from_the_schedule(monkeypatch, tmp_path):
    from flows import runtime
    from flows.scale import _deployment_seed

    assert _deployment_seed() is None  # not under a deployment: nothing derived
    from datetime import datetime, timezone

    from prefect.runtime import flow_run

    for k, v in {"DEPLOYMENT__ID": "1b2c", "DEPLOYMENT__NAME": "scale",
                 "FLOW_RUN__NAME": "scale-15000-seed1795917600-1a2b3c4d"}.items():
        monkeypatch.setenv(f"PREFECT__RUNTIME__{k}", v)
    monkeypatch.setattr(flow_run, "scheduled_start_time", datetime(2026, 11, 29, 2, tzinfo=timezone.utc), raising=False)
    monkeypatch.setenv("STAGE1_OUTPUT_ROOT", str(tmp_path))
    assert _deployment_seed() == 1795917600
    assert runtime.run_output(None, None) == str(tmp_path / "scale" / "scale-15000-seed1795917600-1a2b3c4d")


def test_dispatch_reschedules_a_lost_shard_and_fails_bad_input_without_retrying(tmp_path, monkeypatch):
    """The orchestrator's loop (tasks/scale.py) with the shard runs stood in for: shard 1's first run
    is lost (Crashed by the zombie automation), shard 2 fails on bad input. Shard 1 is started again
    and its manifest shows both attempts; shard 2 is not retried and fails the dispatch by name."""
    from types import SimpleNamespace
    from uuid import uuid4

    from prefect import flow
    from prefect.states import Completed, Crashed, Failed

    import tasks.scale as ts

    plan = core.prepare_scale(output=str(tmp_path / "o"), **ARGS)
    core.claim(plan, "orch")
    started: list[tuple[int, int]] = []

    def fake_run(params, timeout, delay_s):
        i, earlier = params["shard"], params.get("attempts") or []
        started.append((i, len(earlier) + 1))
        run = SimpleNamespace(id=uuid4(), name=f"scale-shard-{i}-try{len(earlier) + 1}")
        if i == 1 and not earlier:
            return SimpleNamespace(**vars(run), state=Crashed(message="No heartbeat for 40 s: marked Crashed by "
                                                                      "'stage1: crash silent flow runs'"))
        if i == 2:
            return SimpleNamespace(**vars(run), state=Failed(
                message="Flow run encountered an exception: InputError: error: bad seeds"))
        core.compute_shard(plan, i, "orch", [*earlier, shards.this_attempt(len(earlier) + 1, flow_run_name=run.name)])
        return SimpleNamespace(**vars(run), state=Completed())

    monkeypatch.setattr(ts, "_run_shard", fake_run)
    monkeypatch.setattr(ts, "check_zombie_automation", lambda logger: True)

    @flow
    def orchestrate():
        progress = ts.ShardProgress(plan, [])
        with pytest.raises(RuntimeError) as e:
            ts.dispatch_shards(plan, [0, 1, 2], "orch", progress)
        return str(e.value), progress.history, progress.done

    message, history, done = orchestrate()
    assert sorted(started) == [(0, 1), (1, 1), (1, 2), (2, 1)]
    assert message.startswith("1 of 3 shards failed: shard-00002: bad input") and "not retried" in message
    assert done == 2 and [a["cause"] for a in history[1]] == ["silent"] and [a["cause"] for a in history[2]] == ["bad_input"]
    attempts = shards.valid_manifest(plan.output, plan, 1).attempts
    assert [(a["attempt"], a.get("cause")) for a in attempts] == [(1, "silent"), (2, None)]
    assert attempts[0]["flow_run_name"] == "scale-shard-1-try1" and attempts[1]["flow_run_name"] == "scale-shard-1-try2"
    assert shards.valid_manifest(plan.output, plan, 2) is None
