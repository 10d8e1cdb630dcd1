"""A model that fails its guards at load is bad input: exit 2 with one error block (no traceback) that
says what to check, and the output folder is left exactly as it was (pilot and scale CLIs, the flows
themselves, a scale-shard run). The orchestrating scale run under a deployment never loads the model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stage1_core.scale import plan as core
from stage1_core.scale import shards
from stage1_core.infra.errors import InputError, ModelGuardError
from tests.flows.conftest import REPO

GUARD_FAIL = "fake:1,guard=1"


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones too) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_guard_block(err: str) -> None:
    assert "error: the model failed its guards at load" in err
    assert "transformers >= 5.24" in err and "Gemma 3 GGUF" in err
    assert "model files" in err and "--bos-policy" in err
    assert "Traceback" not in err


@pytest.fixture()
def guards_fail(monkeypatch):
    """Every model load in this process fails its sentinels."""
    from stage1_core import model

    def fail(cfg):
        raise ModelGuardError(f"sentinel(s) failed for {cfg.id} (bos_policy=always): 'The capital of France is' "
                              "expected ' Paris' in the top 5")

    monkeypatch.setattr(model, "load_backend", fail)


@pytest.mark.parametrize("module,args", [
    ("flows.pilot", ["--count", "6", "--max-iterations", "0"]),
    ("flows.scale", ["--count", "4", "--shard-size", "2"]),
])
def test_cli_guard_failure_exits_2_and_creates_no_folder(module, args, api_url, tmp_path):
    env = dict(os.environ, PREFECT_API_URL=api_url, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", module, *args, "--output", "o", "--model", GUARD_FAIL], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert_guard_block(r.stderr)
    assert GUARD_FAIL in r.stderr and "is as it was" in r.stderr
    assert not (tmp_path / "o").exists()


def test_pilot_guard_failure_leaves_an_existing_run_byte_identical(tmp_path, capsys, request):
    from flows.pilot import main

    # runaways with no reruns allowed: iterate, exit 3, suggested_config.yaml written
    args = ["--count", "30", "--seed", "3", "--output", str(tmp_path / "o"), "--model", "fake:1,runaway=0.5",
            "--max-iterations", "0"]
    assert main(args) == 3  # the first run loads fine
    before = snapshot(tmp_path / "o")
    assert "suggested_config.yaml" in before and ".stage1_run.json" in before  # a resume would remove the former
    capsys.readouterr()
    request.getfixturevalue("guards_fail")
    assert main(args) == 2  # the same command (a resume), but the model now fails its guards
    assert_guard_block(capsys.readouterr().err)
    assert snapshot(tmp_path / "o") == before
    assert main([*args, "--overwrite"]) == 2
    assert snapshot(tmp_path / "o") == before


def test_input_error_at_load_passes_through_as_exit_2(tmp_path, capsys, monkeypatch):
    from flows.pilot import main
    from stage1_core import model

    def too_big(cfg):
        raise InputError("the model needs 140 GiB but 16 GiB are free", field="model.id",
                         expected="a model that fits in memory", fix="pass --model with a smaller model")

    monkeypatch.setattr(model, "load_backend", too_big)
    assert main(["--count", "6", "--output", str(tmp_path / "o"), "--model", "fake:1"]) == 2
    err = capsys.readouterr().err
    assert "error: the model needs 140 GiB" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_pilot_flow_checks_the_model_before_claiming_the_folder(tmp_path):
    """Under a deployment there is no CLI: the flow itself loads before it claims."""
    from flows.pilot import pilot

    with pytest.raises(InputError, match="failed its guards"):
        pilot(count=6, output=str(tmp_path / "o"), model=GUARD_FAIL, max_iterations=0)
    assert not (tmp_path / "o").exists()


def test_scale_flow_checks_the_model_before_locking_the_folder(tmp_path):
    from flows.scale import scale

    with pytest.raises(InputError, match="failed its guards"):
        scale(count=4, shard_size=2, output=str(tmp_path / "o"), model=GUARD_FAIL)
    assert not (tmp_path / "o").exists()


def test_scale_shard_run_writes_no_shard_file_when_guards_fail(tmp_path, guards_fail):
    from flows.scale import scale_shard
    from tasks.scale import shard_parameters

    plan = core.prepare_scale(output=str(tmp_path / "d"), count=4, shard_size=2, seed=5, model="fake:4")
    core.claim(plan, "orchestrator")
    before = snapshot(tmp_path / "d")
    with pytest.raises(InputError, match="failed its guards"):
        scale_shard(**shard_parameters(plan, 1, "orchestrator"))
    assert snapshot(tmp_path / "d") == before
    assert not shards.paths(tmp_path / "d", 1)["lock"].exists()


def test_orchestrating_scale_run_under_a_deployment_never_loads_the_model(tmp_path, monkeypatch):
    import flows.scale as fs
    from flows import runtime
    from stage1_core import model

    loads, dispatched = [], []
    monkeypatch.setattr(model, "load_backend", lambda cfg: loads.append(cfg) or pytest.fail("loaded the model"))
    monkeypatch.setattr(runtime, "deployment_name", lambda: "stage1/scale")
    monkeypatch.setattr(fs.t, "dispatch_shards", lambda plan, pending, run_id, progress: dispatched.extend(pending))
    with pytest.raises(RuntimeError, match="2 of 2 shards are not complete"):  # the shard runs did nothing here
        fs.scale(count=4, shard_size=2, seed=5, output=str(tmp_path / "o"), model="fake:4")
    assert dispatched == [0, 1] and loads == []
    assert (tmp_path / "o" / ".stage1_run.json").is_file()  # the orchestrator claimed the folder without a model
