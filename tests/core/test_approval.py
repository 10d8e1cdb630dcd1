"""Approval records, the terminal prompt (answers, unclear answers, end of input, timeout) and how a
decision changes the gate."""

from __future__ import annotations

import io
import os

import pytest

from stage1_core.phases import approval

GATE = {"decision": "scale", "reasons": ["all gated metrics passed"], "failed": []}


def _ask(text: str | None, timeout: float = 5.0) -> tuple[dict, str]:
    r, w = os.pipe()
    if text is not None:
        os.write(w, text.encode())
        os.close(w)
    out = io.StringIO()
    with os.fdopen(r) as stdin:
        try:
            return approval.ask_terminal("QC TABLE", timeout, stdin=stdin, stdout=out), out.getvalue()
        finally:
            if text is None:
                os.close(w)


@pytest.mark.parametrize(("line", "expected"), [
    ("y\n", ("approved", "")), ("yes looks good\n", ("approved", "looks good")), ("APPROVE\n", ("approved", "")),
    ("n\n", ("rejected", "")), ("reject too many fragments\n", ("rejected", "too many fragments")),
])
def test_terminal_answers(line, expected):
    rec, shown = _ask(line)
    assert (rec["decision"], rec["note"]) == expected
    assert rec["source"] == "terminal" and rec["decided"] and "QC TABLE" in shown


def test_unclear_answer_is_asked_again():
    rec, shown = _ask("maybe\ny ok\n")
    assert rec["decision"] == "approved" and rec["note"] == "ok"
    assert "please answer y or n" in shown


def test_end_of_input_rejects():
    rec, _ = _ask("")
    assert rec["decision"] == "rejected" and rec["note"] == "end of input"


def test_no_answer_in_time_is_rejected_timeout():
    rec, shown = _ask(None, timeout=0.3)
    assert rec["decision"] == "rejected (timeout)" and rec["note"] == approval.TIMEOUT_NOTE
    assert "rejected (timeout)" in shown


def test_gate_after_approval():
    assert approval.apply_to_gate(GATE, None) == GATE
    assert approval.apply_to_gate(GATE, approval.record("approved", source="terminal")) == GATE
    halted = approval.apply_to_gate(GATE, approval.record("rejected (timeout)", note="late", source="prefect-ui"))
    assert halted["decision"] == "halt" and halted["reasons"][-1] == "scale not approved: rejected (timeout) (late)"
    halt = {**GATE, "decision": "halt"}
    assert approval.apply_to_gate(halt, approval.record("approved", source="terminal")) == halt
    with pytest.raises(ValueError):
        approval.record("maybe", source="terminal")  # type: ignore[arg-type]
