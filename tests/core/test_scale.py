"""The scale run's core, without Prefect: shard seeds and sizes, one shard's computation on the fake
backend (deterministic, every item exactly once), shard manifests, the folder lock, settings and
--from-pilot, the dry-run plan, a scheduled run's seed, fault-spec parsing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from stage1_core.infra import faults, jsonl
from stage1_core.scale import plan as scale, shards
from stage1_core.infra.errors import InputError
from stage1_core.infra.locks import LockedError, hold_lock

FAKE = "fake:4"


def plan_for(out: Path, **kw):
    params = dict(output=str(out), count=7, shard_size=3, seed=5, model=FAKE)
    params.update(kw)
    return scale.prepare_scale(**params)


def strip_run(rows):
    for r in rows:
        r["provenance"].pop("run_id")
    return rows


def test_shard_seeds_derive_from_run_seed_and_index_only():
    seeds = [scale.shard_seed(42, i) for i in range(50)]
    assert seeds == [scale.shard_seed(42, i) for i in range(50)]
    assert len(set(seeds)) == 50
    assert scale.shard_seed(43, 0) != seeds[0]


@pytest.mark.parametrize("count,size,expected", [(7, 3, [3, 3, 1]), (6, 3, [3, 3]), (2, 5, [2]), (15000, 500, [500] * 30)])
def test_shard_sizes(count, size, expected):
    assert scale.shard_sizes(count, size) == expected


def test_a_shard_is_deterministic_and_accounts_for_every_item(tmp_path):
    a, b = plan_for(tmp_path / "a"), plan_for(tmp_path / "b")
    scale.claim(a, "run-a")
    scale.claim(b, "run-b")
    ma, mb = scale.compute_shard(a, 0, "run-a"), scale.compute_shard(b, 0, "run-b")
    rows_a = shards.read(a.output, ma, "data")
    rows_b = shards.read(b.output, mb, "data")
    assert len(rows_a) == ma.rows == 3
    assert strip_run(rows_a) == strip_run(rows_b)  # same items, same order, in another folder and run
    assert ma.shard_seed == scale.shard_seed(5, 0) and all(r["provenance"]["shard"] == 0 for r in rows_a)
    rejected = shards.read(a.output, ma, "rejected")
    counts = ma.counts.model_dump()
    instr_rejected = [r for r in rejected if r["phase"] == "instruction_filter" and r["reason"] != "surplus_over_count"]
    surplus = [r for r in rejected if r["reason"] == "surplus_over_count"]
    pair_rejected = [r for r in rejected if r["phase"] == "pair_filter"]
    # Every generated instruction is kept by the filters or rejected once; every kept one is answered or surplus.
    assert len(instr_rejected) + counts["instructions_kept"] == counts["instructions_generated"]
    assert len(rows_a) + len(pair_rejected) + len(surplus) == counts["instructions_kept"]
    assert len(rows_a) + len(pair_rejected) == counts["pairs_generated"] == len(shards.read(a.output, ma, "completions"))
    ids = [r["id"] for r in rows_a + rejected]
    assert len(ids) == len(set(ids)) and all(i.startswith("s00000-") for i in ids)
    assert not shards.paths(a.output, 0)["work"].exists()


def test_a_complete_shard_is_never_recomputed_and_a_broken_one_is_redone(tmp_path):
    plan = plan_for(tmp_path / "o")
    scale.claim(plan, "first")
    first = scale.compute_shard(plan, 1, "first")
    again = scale.compute_shard(plan, 1, "second")
    assert again == first and again.run_id == "first"
    data = shards.paths(plan.output, 1)["data"]
    original = data.read_bytes()
    data.write_bytes(original.replace(b"\n", b"\n\n", 1))  # same rows, other bytes: sha256 differs
    assert shards.valid_manifest(plan.output, plan, 1) is None
    redone = scale.compute_shard(plan, 1, "third")
    assert redone.run_id == "third"
    assert strip_run(jsonl.read_rows(data)) == strip_run([json.loads(x) for x in original.decode().splitlines()])


def test_a_manifest_of_another_identity_does_not_count(tmp_path):
    plan = plan_for(tmp_path / "o")
    scale.claim(plan, "r")
    scale.compute_shard(plan, 0, "r")
    other = plan_for(tmp_path / "o", overwrite=True, config=_write(tmp_path / "c.yaml", {"response_generation": {"max_new_tokens": 64}}))
    assert other.identity != plan.identity
    assert shards.valid_manifest(plan.output, plan, 0) is not None
    assert shards.valid_manifest(other.output, other, 0) is None


def test_a_manifest_read_from_disk_is_typed_checked_and_tolerates_keys_a_later_version_adds(tmp_path):
    plan = plan_for(tmp_path / "o")
    scale.claim(plan, "r")
    written = scale.compute_shard(plan, 0, "r")
    path = shards.paths(plan.output, 0)["manifest"]
    raw = json.loads(path.read_text())
    path.write_text(json.dumps({**raw, "written_by": "a later stage1"}))
    assert shards.valid_manifest(plan.output, plan, 0) == written  # an added key: still complete
    for broken in ({k: v for k, v in raw.items() if k != "counts"}, {**raw, "rows": "three"}, [raw]):
        path.write_text(json.dumps(broken))
        assert shards.valid_manifest(plan.output, plan, 0) is None  # a field missing or of the wrong type


def _write(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_collect_manifests_names_missing_shards(tmp_path):
    plan = plan_for(tmp_path / "o")
    scale.claim(plan, "r")
    scale.compute_shard(plan, 0, "r")
    with pytest.raises(RuntimeError, match="2 of 3 shards are not complete.*shard-00001, shard-00002"):
        scale.collect_manifests(plan)


def test_lock_is_exclusive_and_names_the_folder(tmp_path):
    with hold_lock(tmp_path / ".lock"):
        with pytest.raises(LockedError) as e:
            with hold_lock(tmp_path / ".lock"):
                pass
        assert str(tmp_path) in e.value.render() and f"pid {os.getpid()}" in e.value.render()
    with hold_lock(tmp_path / ".lock"):  # released on exit
        pass


def test_lock_is_released_when_the_holder_is_killed(tmp_path):
    code = ("import sys, time; from stage1_core.infra.locks import hold_lock\n"
            f"with hold_lock({str(tmp_path / '.lock')!r}):\n    print('held', flush=True); time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    with pytest.raises(LockedError):
        with hold_lock(tmp_path / ".lock"):
            pass
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    with hold_lock(tmp_path / ".lock"):
        pass


def _pilot_dir(tmp_path: Path, decision: str, temperature: float = 0.5) -> Path:
    d = tmp_path / f"pilot-{decision}"
    d.mkdir()
    from stage1_core.infra.config import load_pilot_config

    cfg = load_pilot_config(None, {"model": {"id": "fake:1"}, "seed": 7}).model_dump(mode="json")
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    final = dict(cfg["response_generation"], temperature=temperature)
    (d / "session_manifest.json").write_text(json.dumps({
        "run_id": "p" * 32, "config_hash": "h", "decision": {"decision": decision, "reasons": ["x"], "failed": []},
        "iterations": [{"response_generation": cfg["response_generation"]}, {"response_generation": final}],
        "tokens": {"total": 3000}, "gpu_seconds": 0.0, "artifacts": [{"path": str(d / "pilot_data.jsonl"), "rows": 30}]}))
    return d


def test_from_pilot_uses_the_final_settings_and_refuses_unless_scale(tmp_path):
    ok = _pilot_dir(tmp_path, "scale")
    plan = scale.prepare_scale(output=str(tmp_path / "o"), from_pilot=str(ok), count=10, shard_size=5)
    assert plan.config.response_generation.temperature == 0.5
    assert plan.config.seed == 7 and plan.config.model.id == "fake:1" and not plan.forced
    est = scale.estimate(plan)
    assert est["tokens"] == 1000 and "measured in the pilot" in est["tokens_basis"]  # 3000 tokens / 30 pairs × 10

    halted = _pilot_dir(tmp_path, "halt")
    with pytest.raises(InputError, match="gate said 'halt', not 'scale'") as e:
        scale.prepare_scale(output=str(tmp_path / "o"), from_pilot=str(halted), count=10)
    assert "--force" in e.value.render()
    forced = scale.prepare_scale(output=str(tmp_path / "o"), from_pilot=str(halted), count=10, force=True)
    assert forced.forced is True and forced.pilot.decision["decision"] == "halt"


@pytest.mark.parametrize("kw,match", [
    ({"count": None}, "--count is required with --from-pilot"),
    ({"config": "x.yaml"}, "--config cannot be combined with --from-pilot"),
    ({"model": "fake:2"}, "--model cannot be combined with --from-pilot"),
])
def test_from_pilot_input_errors(tmp_path, kw, match):
    ok = _pilot_dir(tmp_path, "scale")
    params = {"output": str(tmp_path / "o"), "from_pilot": str(ok), "count": 10, **kw}
    with pytest.raises(InputError, match=match):
        scale.prepare_scale(**params)
    assert not (tmp_path / "o").exists()


def test_from_pilot_folder_that_is_not_a_finished_pilot(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(InputError, match="not a finished pilot"):
        scale.prepare_scale(output=str(tmp_path / "o"), from_pilot=str(tmp_path / "half"), count=10)
    with pytest.raises(InputError, match="pilot folder not found"):
        scale.prepare_scale(output=str(tmp_path / "o"), from_pilot=str(tmp_path / "nope"), count=10)


def test_settings_errors_name_the_flag_or_the_file(tmp_path):
    with pytest.raises(InputError) as e:
        plan_for(tmp_path / "o", shard_size=0)
    assert e.value.field == "scale.shard_size" and e.value.fix == "correct --shard-size"
    cfg = _write(tmp_path / "c.yaml", {"scale": {"shard_size": 5, "bogus": 1}})
    with pytest.raises(InputError) as e:
        plan_for(tmp_path / "o", shard_size=None, config=cfg)
    assert e.value.file == cfg and e.value.field == "scale.bogus"
    with pytest.raises(InputError, match="--count is required"):
        scale.prepare_scale(output=str(tmp_path / "o"), model=FAKE)


def test_config_yaml_reproduces_the_plan_and_operational_settings_are_not_identity(tmp_path):
    plan = plan_for(tmp_path / "o", gpu_hour_usd=2.5)
    scale.claim(plan, "r")
    again = scale.prepare_scale(output=str(tmp_path / "o"), config=str(tmp_path / "o" / "config.yaml"))
    assert again.identity == plan.identity and again.folder_state == "resume"
    assert again.shards == plan.shards
    cheaper = plan_for(tmp_path / "o", gpu_hour_usd=1.0, shard_timeout_s=60)
    assert cheaper.identity == plan.identity and cheaper.folder_state == "resume"
    with pytest.raises(InputError, match="belongs to another run"):
        plan_for(tmp_path / "o", shard_size=2)


def test_dry_run_plan_lists_shards_tokens_time_and_cost(tmp_path):
    plan = plan_for(tmp_path / "o", count=15000, shard_size=500, gpu_hour_usd=2.0)
    text = scale.dry_run_text(plan)
    est = scale.estimate(plan)
    assert "30 shards of 500" in text and "shard-00000" in text and "shard-00029" in text
    assert f"{est['tokens']:,}" in text and "GPU-hours" in text and f"${est['cost_usd']:,.2f}" in text
    assert est["cost_usd"] == round(est["gpu_seconds"] / 3600 * 2.0, 2) and est["tokens"] > 15000
    assert not (tmp_path / "o").exists()


def test_scheduled_seed_is_the_start_time():
    t = datetime(2026, 11, 29, 2, 0, tzinfo=timezone.utc)
    assert scale.seed_from_time(t) == 1795917600 == scale.seed_from_time(t)


@pytest.mark.parametrize("spec,point,name,fires", [
    ("write:1", "write", "x.jsonl", True), ("write:1", "generate", None, False),
    ("write@shard-*.jsonl:1", "write", "shard-00001.jsonl", True),
    ("write@shard-*.jsonl:1", "write", "scale_data.jsonl", False),
    ("merge", "merge", None, True), ("shard_write@shard-00001:1", "shard_write", "shard-00000", False),
])
def test_fault_specs(monkeypatch, spec, point, name, fires):
    killed = []
    monkeypatch.setenv("STAGE1_FAULT", spec)
    monkeypatch.setattr(faults, "_hits", faults.Counter())
    monkeypatch.setattr(faults.os, "kill", lambda pid, sig: killed.append(sig))
    faults.maybe_fault(point, name)
    assert killed == ([signal.SIGKILL] if fires else [])


# -- rescheduling lost shard runs (stage1_core.scale.retry; the Prefect side is tasks/scale.py) -------------
from stage1_core.scale import retry  # noqa: E402

SILENT = "No heartbeat for 600 s: marked Crashed by 'stage1: crash silent flow runs'"
EXC = "Flow run encountered an exception: "


@pytest.mark.parametrize("end,cause,action", [
    (retry.ShardEnd("CRASHED", "Flow run infrastructure exited with non-zero status code -9."), "crashed", "retry"),
    (retry.ShardEnd("CRASHED", SILENT), "silent", "retry"),
    (retry.ShardEnd("FAILED", "Submission failed. KeyError: 'gpu'"), "infrastructure", "retry"),
    (retry.ShardEnd("FAILED", EXC + "TimeoutError: read timed out"), "transient", "retry"),
    (retry.ShardEnd("FAILED", EXC + "httpx.ConnectError: [Errno 111]"), "transient", "retry"),
    (retry.ShardEnd("FAILED", EXC + "LockedError: shard 3 in /o/shards is locked by another run (pid 7)"), "locked",
     "retry"),
    (retry.ShardEnd(None, error="ConnectError: All connection attempts failed"), "transient", "retry"),
    (retry.ShardEnd("FAILED", EXC + "InputError: error: bad seeds\n  file: s.jsonl"), "bad_input", "fail"),
    (retry.ShardEnd("FAILED", EXC + "DeviceOOM: out of memory at one prompt (batch 1)"), "out_of_memory", "fail"),
    (retry.ShardEnd("FAILED", EXC + "EngineOOM: one slot does not fit"), "out_of_memory", "fail"),
    (retry.ShardEnd("FAILED", EXC + "ModelGuardError: sentinel failed"), "model_guard", "fail"),
    (retry.ShardEnd("FAILED", EXC + "WriteError: disk full"), "write_refused", "fail"),
    (retry.ShardEnd("FAILED", EXC + "KeyError: 'rows'"), "error", "fail"),
    (retry.ShardEnd("CANCELLED", "cancelled by a person"), "cancelled", "fail"),
    (retry.ShardEnd("RUNNING", None, timed_out=True), "timeout", "fail"),
    (retry.ShardEnd("COMPLETED", "All states completed."), "files_missing", "fail"),
    (retry.ShardEnd(None, error="ObjectNotFound: deployment stage1/scale-shard"), "not_started", "fail"),
    # the files are the record: whatever the state says, a valid shard is done
    (retry.ShardEnd("CRASHED", SILENT, files_valid=True), "completed", "done"),
    (retry.ShardEnd("COMPLETED", None, files_valid=True), "completed", "done"),
])
def test_a_lost_shard_is_retried_and_bad_input_or_oom_is_not(end, cause, action):
    d = retry.decide(end, attempt=1, retries=2)
    assert (d.cause, d.action) == (cause, action), d
    assert retry.CAUSES[cause].split(" (")[0] in d.reason
    if action == "fail":
        assert "not retried" in d.reason and retry.FIXES[cause] in d.reason
    if end.message and action != "done":  # the run's own words reach the reason, shortened
        assert retry._short(end.message)[:40] in d.reason


def test_retries_stop_after_shard_retries_and_a_locked_shard_waits():
    crashed = retry.ShardEnd("CRASHED", SILENT)
    assert [retry.decide(crashed, a, retries=2).action for a in (1, 2, 3)] == ["retry", "retry", "fail"]
    last = retry.decide(crashed, 3, retries=2)
    assert last.cause == "silent" and "no retries left (scale.shard_retries is 2)" in last.reason
    assert retry.decide(crashed, 1, retries=0).action == "fail"
    assert retry.decide(crashed, 1, retries=2).delay_s == 0
    locked = retry.ShardEnd("FAILED", EXC + "LockedError: locked")
    assert retry.decide(locked, 1, retries=2).delay_s == retry.LOCKED_RETRY_DELAY_S


def test_exception_names_and_the_texts_shown_for_failures_and_progress():
    assert retry.exception_name(EXC + "InputError: x: y") == "InputError"
    assert retry.exception_name(EXC + "prefect.exceptions.CrashedRun") == "CrashedRun"
    assert retry.exception_name("ReadTimeout: 5 s") == "ReadTimeout"
    assert retry.exception_name("no exception here") is None and retry.exception_name(None) is None
    failed = {3: retry.decide(retry.ShardEnd("FAILED", EXC + "InputError: bad"), 1, 2)}
    text = retry.failure_text(failed, 12)
    assert text.startswith("1 of 12 shards failed: shard-00003: bad input") and "rerun the same run" in text
    history = {4: [{"attempt": 1, "action": "retry", "cause": "silent"}, {"attempt": 2, "action": "retry", "cause": "crashed"}],
               7: [{"attempt": 1, "action": "fail", "cause": "bad_input"}]}
    assert retry.progress_text(10, 12, history) == \
        "scale: 10/12 shards; rescheduled: shard-00004 (attempt 1 silent, attempt 2 crashed); failed: shard-00007"
    assert retry.progress_text(0, 12, {}) == "scale: 0/12 shards"


def test_shard_retries_is_an_operational_setting_and_attempts_reach_the_manifest(tmp_path, monkeypatch):
    plan = plan_for(tmp_path / "o")
    assert plan.config.scale.shard_retries == 2
    scale.claim(plan, "r")
    again = plan_for(tmp_path / "o", shard_retries=0)  # a resume may change it
    assert again.identity == plan.identity and again.folder_state == "resume"
    with pytest.raises(InputError) as e:
        plan_for(tmp_path / "o", shard_retries=-1)
    assert e.value.field == "scale.shard_retries" and e.value.fix == "correct --shard-retries"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    earlier = [{"attempt": 1, "flow_run_name": "lost", "state": "Crashed", "cause": "silent", "action": "retry"}]
    this = shards.this_attempt(2, flow_run_name="again")
    manifest = scale.compute_shard(plan, 1, "r", [*earlier, this])
    assert [a["attempt"] for a in manifest.attempts] == [1, 2]
    assert manifest.attempts[1]["cuda_visible_devices"] == "2" and manifest.attempts[1]["pid"] == os.getpid()
    assert shards.valid_manifest(plan.output, plan, 1).attempts == manifest.attempts
    local = scale.compute_shard(plan, 0, "r")  # computed in this process, no orchestrator: attempt 1
    assert [(a["attempt"], a["host"]) for a in local.attempts] == [(1, shards.socket.gethostname())]
