"""Approval in a local run: asked on the terminal only when the gate says scale; refused (exit 2,
nothing written) without a terminal; a rejection halts and is recorded; the hand-off prints the
scale command."""

from __future__ import annotations

import json
import shlex
import sys

from stage1_core.phases import approval

SCALE_VERDICT = "qc:\n  instruction_acceptance_min: 0.2\n  min_n: 3\n"


def test_cli_refuses_require_approval_without_a_terminal(run_cli, tmp_path):
    r = run_cli("--count", "3", "--model", "fake:1", "--output", "out", "--require-approval")
    assert r.returncode == 2
    assert "field:    --require-approval" in r.stderr and "nothing was written" in r.stderr
    assert not (tmp_path / "out").exists()


def test_rejected_on_the_terminal_halts_and_is_recorded(tmp_path, monkeypatch):
    from flows.pilot import pilot

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(SCALE_VERDICT)
    asked = []

    def fake_ask(qc_text, timeout_s, **_):
        asked.append((qc_text, timeout_s))
        return approval.record("rejected", note="not yet", source="terminal")

    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    monkeypatch.setattr(approval, "ask_terminal", fake_ask)
    out = tmp_path / "p"
    result = pilot(count=3, output=str(out), model="fake:1", config=str(cfg), require_approval=True,
                   approval_timeout_s=30, scale_count=10)
    assert len(asked) == 1 and "gate: scale" in asked[0][0] and asked[0][1] == 30
    assert result["decision"] == "halt" and result["exit_code"] == 4 and result["scale_run"] is None
    manifest = json.loads((out / "session_manifest.json").read_text())
    assert manifest["approval"]["decision"] == "rejected" and manifest["approval"]["note"] == "not yet"
    summary = json.loads((out / "qc_summary.json").read_text())
    assert summary["gate"]["decision"] == "halt" and summary["approval"]["decision"] == "rejected"


def test_approved_prints_the_scale_command_and_no_question_without_scale(tmp_path, monkeypatch, capsys):
    from flows.pilot import pilot

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(SCALE_VERDICT)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    monkeypatch.setattr(approval, "ask_terminal", lambda *a, **k: approval.record("approved", source="terminal"))
    result = pilot(count=3, output=str(tmp_path / "a"), model="fake:1", config=str(cfg), require_approval=True,
                   scale_count=10)
    assert result["decision"] == "scale" and result["exit_code"] == 0
    cmd = shlex.split(result["scale_run"]["command"])
    assert cmd[:3] == ["python", "-m", "flows.scale"]
    assert cmd[3:] == ["--from-pilot", str(tmp_path / "a"), "--output", str(tmp_path / "a-scale"), "--count", "10"]
    # The printed command runs as printed (it once lacked the required --output).
    from flows.scale import main as scale_main

    assert scale_main(cmd[3:]) == 0 and (tmp_path / "a-scale" / "scale_data.jsonl").exists()

    def must_not_ask(*a, **k):
        raise AssertionError("asked although the gate did not say scale")

    monkeypatch.setattr(approval, "ask_terminal", must_not_ask)
    halted = pilot(count=3, output=str(tmp_path / "h"), model="fake:1", require_approval=True)  # min_n 20: no scale
    assert halted["decision"] == "halt" and halted["approval"] is None
