"""The CLI as a user runs it: --help, --dry-run, exit codes, bad input (exit 2, nothing written),
folder rules, and credentials never reaching an output file."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from flows.pilot import build_parser, main
from stage1_core.phases.seeds import PACKAGED_SEEDS

SEED_LINE = '{"id": "s%d", "instruction": "Write a sentence about topic number %d.", "input": "", "output": null}'


def seeds_file(path: Path, n: int = 12) -> Path:
    path.write_text("\n".join(SEED_LINE % (i, i) for i in range(n)) + "\n")
    return path


def test_help_documents_every_option():
    text = build_parser().format_help()
    for opt in ("--count", "--output", "--seed", "--seeds", "--config", "--model", "--max-iterations", "--dry-run",
                "--overwrite", "--bos-policy", "--allow-pickle"):
        assert opt in text
    assert "Exit codes" in text


def test_dry_run_prints_plan_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--output", str(out), "--dry-run", "--model", "fake:1"]) == 0
    text = capsys.readouterr().out
    assert "generate_instructions" in text and "filter_pairs" in text and "tokens" in text and "min" in text
    assert not out.exists()


def test_dry_run_embedded_model_loads_nothing(tmp_path, capsys, monkeypatch):
    from stage1_core import model

    def no_load(*args, **kwargs):
        raise AssertionError("--dry-run must not load the model")

    monkeypatch.setattr(model.HFBackend, "__init__", no_load)
    monkeypatch.setattr(model, "_BACKENDS", {})
    out = tmp_path / "out"
    assert main(["--output", str(out), "--dry-run"]) == 0
    assert "embedded:gemma-3-270m" in capsys.readouterr().out
    assert not out.exists()


BAD_SEEDS = {
    "invalid_json": ('{"id": "a", "instruction": "x"}\n{"id": "b", "instruction": \n', 2, None),
    "not_object": ('{"id": "a", "instruction": "Do x."}\n[1, 2]\n', 2, None),
    "missing_field": ('{"id": "a"}\n', 1, "instruction"),
    "wrong_type": ('{"id": "a", "instruction": 5}\n', 1, "instruction"),
    "duplicate_ids": ('{"id": "a", "instruction": "Do x."}\n{"id": "a", "instruction": "Do y."}\n', 2, "id"),
    "empty": ("\n\n", None, None),
    "array": ('[{"id": "a", "instruction": "Do x."}]\n', 1, None),
    "unknown_key": ('{"id": "a", "instruction": "Do x.", "colour": "red"}\n', 1, "colour"),
    "too_few_usable": ('{"id": "a", "instruction": "Do x."}\n', None, None),
}


@pytest.mark.parametrize("case", sorted(BAD_SEEDS))
def test_bad_seeds_exit_2_and_write_nothing(case, tmp_path, capsys):
    content, line, field = BAD_SEEDS[case]
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(content)
    out = tmp_path / "out"
    assert main(["--output", str(out), "--seeds", str(seeds), "--model", "fake:1"]) == 2
    err = capsys.readouterr().err
    assert str(seeds) in err and "error:" in err and "Traceback" not in err
    if line is not None:
        assert f"{seeds}:{line}" in err
    if field is not None:
        assert field in err
    assert not out.exists()


def test_non_utf8_and_overlong_seeds(tmp_path, capsys):
    seeds = tmp_path / "s.jsonl"
    seeds.write_bytes(b'{"id": "a", "instruction": "Do x."}\n{"id": "b", "instruction": "caf\xe9"}\n')
    assert main(["--output", str(tmp_path / "o"), "--seeds", str(seeds), "--model", "fake:1"]) == 2
    assert f"{seeds}:2" in capsys.readouterr().err
    seeds.write_text('{"id": "a", "instruction": "' + "x" * 200_000 + '"}\n')
    assert main(["--output", str(tmp_path / "o"), "--seeds", str(seeds), "--model", "fake:1"]) == 2
    assert "long" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args,needle", [
    (["--count", "0"], "--count"),
    (["--count", "-5"], "--count"),
    (["--max-iterations", "-1"], "max_iterations"),
    (["--model", "/nonexistent/model"], "model"),
    (["--model", "fake:x"], "fake"),
    (["--config", "/nonexistent.yaml"], "config"),
])
def test_bad_arguments_exit_2(args, needle, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--output", str(out), "--model", "fake:1", *args][:4] + args if "--model" in args else
                ["--output", str(out), "--model", "fake:1", *args]) == 2
    assert needle in capsys.readouterr().err
    assert not out.exists()


def test_unknown_config_key_exit_2(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("count: 3\nqc:\n  runaway_max: 0.1\n")
    assert main(["--output", str(tmp_path / "o"), "--config", str(cfg), "--model", "fake:1"]) == 2
    err = capsys.readouterr().err
    assert f"{cfg}:3" in err and "qc.runaway_max" in err


def test_pickle_weights_refused(tmp_path, capsys):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gemma3_text"}))
    (folder / "pytorch_model.bin").write_bytes(b"not really")
    assert main(["--output", str(tmp_path / "o"), "--model", str(folder)]) == 2
    assert "pickle" in capsys.readouterr().err.lower()


def test_output_folder_rules(tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert main(["--output", str(a_file), "--model", "fake:1"]) == 2
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["--output", str(foreign), "--model", "fake:1"]) == 2
    outside = tmp_path / "outside"
    outside.mkdir()
    link = Path.cwd() / f".stage1-test-link-{tmp_path.name}"
    link.symlink_to(outside)
    try:
        assert main(["--output", str(link.name), "--model", "fake:1"]) == 2
        assert "symlink" in capsys.readouterr().err
    finally:
        link.unlink()
    assert (foreign / "notes.txt").read_text() == "mine"


def test_exit_codes_and_identity_through_the_real_cli(run_cli, tmp_path):
    # iterate is reachable only with --max-iterations 0 and something to suggest (runaways: cooler responses).
    r = run_cli("--count", "30", "--output", "o", "--seed", "3", "--model", "fake:1,runaway=0.5", "--max-iterations", "0")
    assert r.returncode == 3, r.stderr[-3000:]
    assert (tmp_path / "o" / "suggested_config.yaml").exists()
    assert "gate: iterate" in r.stdout
    # Same identity: resumes (exit code unchanged). Different identity: exit 2 unless --overwrite.
    r = run_cli("--count", "7", "--output", "o", "--seed", "3", "--model", "fake:1", "--max-iterations", "0")
    assert r.returncode == 2 and "another run" in r.stderr
    r = run_cli("--count", "25", "--output", "o", "--seed", "3", "--model", "fake:1", "--max-iterations", "1",
                "--overwrite")
    assert r.returncode in (0, 4), r.stderr[-3000:]
    summary = json.loads((tmp_path / "o" / "qc_summary.json").read_text())
    assert r.returncode == {"scale": 0, "halt": 4}[summary["gate"]["decision"]]
    assert not (tmp_path / "o" / "suggested_config.yaml").exists()


def test_halt_exit_4_when_no_setting_fixes_the_yield(run_cli, tmp_path):
    # bad=0.95: most instructions fail the heuristics (too short, blacklisted) -> a low yield, which
    # iterates, but no row of the adjustment table changes that loss -> halt, saying so, without a rerun.
    for reruns in ("0", "1"):
        r = run_cli("--count", "20", "--output", f"h{reruns}", "--model", "fake:1,bad=0.95", "--max-iterations", reruns)
        assert r.returncode == 4, r.stdout[-2000:] + r.stderr[-3000:]
        assert "instruction_acceptance" in r.stdout and "no further adjustment possible" in r.stdout
        assert "largest loss: too_short" in r.stdout or "largest loss: blacklisted" in r.stdout  # the fake's two bad kinds
        assert not (tmp_path / f"h{reruns}" / "iterations" / "02").exists()
        assert not (tmp_path / f"h{reruns}" / "suggested_config.yaml").exists()


def test_halt_exit_4_when_the_critic_rejects_most(run_cli, tmp_path):
    r = run_cli("--count", "20", "--output", "c", "--model", "fake:1,critic_bad=0.8", "--max-iterations", "2")
    assert r.returncode == 4, r.stdout[-2000:] + r.stderr[-3000:]
    assert "instruction_critic_acceptance" in r.stdout and "quality bar" in r.stdout


def test_credentials_never_reach_output_files(run_cli, tmp_path):
    # A copy of this checkout whose git remote carries a token, and secrets in the environment.
    from tests.flows.conftest import REPO

    repo = tmp_path / "repo"
    shutil.copytree(REPO, repo, ignore=shutil.ignore_patterns(".venv", "__pycache__", "artifacts", ".pytest_cache"),
                    symlinks=True)
    if not (repo / ".git").exists():
        subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "remote", "remove", "origin"], cwd=repo, capture_output=True)
    subprocess.run(["git", "remote", "add", "origin", "https://user:ghp_SECRETTOKEN123@example.com/r.git"], cwd=repo,
                   check=True)
    env = {"HF_TOKEN": "hf_SECRETTOKEN456", "PREFECT_API_KEY": "pnu_SECRETKEY789", "PYTHONPATH": str(repo),
           "DATABASE_URL": "postgresql://admin:SECRETPW@db.example.com/x",
           "PREFECT_API_DATABASE_CONNECTION_URL": "postgresql+asyncpg://admin:SECRETPW2@db.example.com/x"}
    r = run_cli("--count", "6", "--output", str(tmp_path / "o"), "--model", "fake:1", "--max-iterations", "0",
                env=env, cwd=repo)
    assert r.returncode in (0, 3, 4), r.stderr[-3000:]
    manifest = json.loads((tmp_path / "o" / "session_manifest.json").read_text())
    assert manifest["git"]["remote"] == "https://example.com/r.git"
    files = [f for f in (tmp_path / "o").rglob("*") if f.is_file()]
    assert len(files) > 10
    for f in files:
        text = f.read_text(errors="replace")
        for secret in ("SECRETTOKEN123", "SECRETTOKEN456", "SECRETKEY789", "SECRETPW"):
            assert secret not in text, f"{secret} leaked into {f}"


def test_progress_is_visible_with_sane_rates_and_timed_loads(run_cli):
    import re

    r = run_cli("--count", "20", "--output", "p", "--model", "fake:1",
                env={"STAGE1_FAKE_DELAY": "0.05", "PREFECT_LOGGING_LEVEL": "INFO"})  # the suite runs at WARNING
    assert r.returncode in (0, 3, 4), r.stderr[-3000:]
    err = r.stderr.replace("\r", "\n")
    rates = [float(x) for x in re.findall(r"([0-9.]+)(?:prompt|item)/s", err)]
    # Bars start with their phase: the fake takes 0.05 s per batch of 8, so no honest rate is in the
    # thousands (a bar made at the first finished batch showed rates like 1,766,022 prompt/s).
    assert rates and max(rates) < 1000, sorted(rates)[-5:]
    assert re.search(r"generate_responses \(iteration 1\):\s+\d+%\|.*\| 8/20", err)  # it moves before the end
    logs = r.stdout + err  # Prefect's log lines
    assert re.search(r"model fake:1 ready in [0-9.]+ s", logs)
    assert re.search(r"critic dev set: \d+ items scored in [0-9.]+ s", logs)


def test_the_flow_takes_its_parameters_from_the_options_declaration():
    """Issue 21: the flow's Prefect parameter schema (the deployment form, `--param` validation) is the
    PilotOptions declaration: same names and order, the config key's bounds, the meanings."""
    from flows.pilot import pilot
    from stage1_core.phases.options import PilotOptions

    props = pilot.parameters.model_dump()["properties"]
    assert list(props) == list(PilotOptions.model_fields)
    count = next(a for a in props["count"]["anyOf"] if a.get("type") == "integer")
    assert count["exclusiveMinimum"] == 0 and count["maximum"] == 1_000_000 and props["count"]["default"] is None
    assert props["count"]["description"] == PilotOptions.model_fields["count"].description
    assert any(a.get("pattern") for a in props["run_key"]["anyOf"])
    with pytest.raises(Exception, match="count"):
        pilot.validate_parameters({"count": 0})
