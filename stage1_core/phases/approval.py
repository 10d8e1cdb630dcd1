"""Human approval of a `scale` verdict: the record that goes into the manifest, the terminal
prompt of a local run, and how a decision changes the gate.

A run with `require_approval` asks only when its gate says `scale` (there is nothing to approve
otherwise). Under a Prefect deployment the flow suspends and the answer comes from the run's resume
form (flows/pilot.py); locally it is asked here, on the terminal. A run that gets no answer before
its deadline is recorded as `rejected (timeout)`. Anything but `approved` turns the run's final
decision into `halt`, with the reason, so nothing scales without a yes.
"""

from __future__ import annotations

import select
import sys
from typing import IO, Any, Literal

from stage1_core.infra import provenance

Decision = Literal["approved", "rejected", "rejected (timeout)"]
DECISIONS: tuple[str, ...] = ("approved", "rejected", "rejected (timeout)")
# The note a timed-out resume carries (flows/approval_timeout.py sends it; the pilot recognises it).
TIMEOUT_NOTE = "no decision before the approval deadline"


def record(decision: Decision, *, note: str = "", source: str, deadline: str | None = None,
           requested: str | None = None) -> dict[str, Any]:
    """The approval block of session_manifest.json."""
    if decision not in DECISIONS:
        raise ValueError(f"approval decision must be one of {DECISIONS}, got {decision!r}")
    return {"decision": decision, "note": note, "source": source, "requested": requested,
            "deadline": deadline, "decided": provenance.utc_now()}


def parse_answer(line: str) -> tuple[Decision, str] | None:
    """A terminal answer: `y`/`yes`/`approve` or `n`/`no`/`reject`, optionally followed by a note.

    Returns:
        (decision, note), or None when the answer is neither.
    """
    word, _, note = line.strip().partition(" ")
    word = word.lower()
    if word in {"y", "yes", "approve", "approved"}:
        return "approved", note.strip()
    if word in {"n", "no", "reject", "rejected"}:
        return "rejected", note.strip()
    return None


def ask_terminal(qc_text: str, timeout_s: float, *, stdin: IO[str] | None = None,
                 stdout: IO[str] | None = None) -> dict[str, Any]:
    """Show the QC table and ask for a decision; no answer within `timeout_s` is a timeout.

    An unclear answer is asked again (the deadline does not move). End of input counts as a
    rejection.
    """
    import time

    stdin = stdin or sys.stdin
    stdout = stdout or sys.stderr
    requested = provenance.utc_now()
    deadline = time.monotonic() + timeout_s
    print(qc_text, file=stdout)
    while True:
        left = deadline - time.monotonic()
        print(f"The gate says scale. Approve? [y/n, then an optional note] ({int(max(left, 0))} s left): ",
              end="", file=stdout, flush=True)
        ready, _, _ = select.select([stdin], [], [], max(left, 0))
        if not ready:
            print("\nno answer in time: rejected (timeout)", file=stdout)
            return record("rejected (timeout)", note=TIMEOUT_NOTE, source="terminal", requested=requested)
        line = stdin.readline()
        if line == "":
            return record("rejected", note="end of input", source="terminal", requested=requested)
        answer = parse_answer(line)
        if answer is not None:
            return record(answer[0], note=answer[1], source="terminal", requested=requested)
        print("please answer y or n", file=stdout)


def apply_to_gate(gate: dict[str, Any], approval: dict[str, Any] | None) -> dict[str, Any]:
    """The final gate once a human has spoken: anything but `approved` halts a `scale`."""
    if approval is None or gate["decision"] != "scale" or approval["decision"] == "approved":
        return gate
    reason = f"scale not approved: {approval['decision']}" + (f" ({approval['note']})" if approval.get("note") else "")
    return {**gate, "decision": "halt", "reasons": [*gate["reasons"], reason]}
