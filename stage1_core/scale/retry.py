"""Whether a shard run that ended without a valid shard is started again: the scale orchestrator's
decision, kept free of Prefect so it can be tested on its own (the orchestrator in tasks/scale.py
reads the run's state and hands it here as plain strings).

    end = ShardEnd(state="CRASHED", message="No heartbeat for 600 s: marked Crashed by ...", files_valid=False)
    decide(end, attempt=1, retries=2)  # Decision(action="retry", cause="silent", reason="...")

Retried (up to `scale.shard_retries` times): the run Crashed (its worker died, was OOM-killed or lost
its GPU; or the zombie-run automation found it silent past its window), failed by infrastructure
(the worker could not submit it), failed on a transient error (a timeout or a dropped connection),
or failed because the shard's lock was still held (an earlier attempt's process was still alive).
Not retried, the run fails with the reason: bad input (`InputError`), out of device memory at one
prompt (`DeviceOOM`, `EngineOOM`), a model that fails its guards, a write refused by the disk, any
other error of the shard's own code (it would fail the same way again), a cancelled shard run, a
shard run still going after `scale.shard_timeout_s`, and a run that Completed while its files are
not valid in the output folder (the worker writes somewhere the orchestrator does not read).
Whatever the state says, a shard whose files validate is done: the files are the record.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Literal

from stage1_core.scale.shards import stem

Action = Literal["done", "retry", "fail"]

# Exception names (as Prefect writes them in a Failed state's message) and what they mean.
NOT_RETRIED = {"InputError": "bad_input", "DeviceOOM": "out_of_memory", "EngineOOM": "out_of_memory",
               "ModelGuardError": "model_guard", "WriteError": "write_refused"}
TRANSIENT = frozenset({"TimeoutError", "ConnectionError", "BrokenPipeError", "ConnectionResetError",
                       "ConnectionRefusedError", "ConnectError", "ConnectTimeout", "ReadTimeout", "WriteTimeout",
                       "PoolTimeout", "ReadError", "RemoteProtocolError"})
LOCKED = "LockedError"
SUBMISSION_FAILED = "Submission failed."  # the worker's message when it cannot start a run's infrastructure
SILENT_MARKERS = ("No heartbeat for", "crash silent flow runs")  # the zombie-run automation's message
LOCKED_RETRY_DELAY_S = 30.0
"""Wait before retrying a shard whose lock an earlier attempt's process still held."""

CAUSES = {
    "completed": "its files are valid",
    "crashed": "the run crashed (its worker or process died)",
    "silent": "no heartbeat past the silence window (marked Crashed by the zombie-run automation)",
    "infrastructure": "the worker could not start the run",
    "transient": "a transient error (timeout or dropped connection)",
    "locked": "the shard's lock was held by another process (an earlier attempt still running?)",
    "bad_input": "bad input",
    "out_of_memory": "out of device memory at one prompt",
    "model_guard": "the model failed its guards",
    "write_refused": "a write was refused (disk full, quota or permissions)",
    "error": "an error in the shard's computation",
    "cancelled": "the shard run was cancelled",
    "timeout": "still running after scale.shard_timeout_s (cancelled)",
    "files_missing": "the run Completed but its files are not valid in the output folder",
    "not_started": "the shard run could not be started or awaited",
}
RETRIED = frozenset({"crashed", "silent", "infrastructure", "transient", "locked"})
FIXES = {
    "bad_input": "correct the input the message names",
    "out_of_memory": "lower the batch or max_new_tokens, or use a larger GPU",
    "model_guard": "check the model (docs/install.md)",
    "write_refused": "free space or fix permissions on the output filesystem",
    "error": "see the shard run's logs",
    "cancelled": "rerun to compute it",
    "timeout": "raise scale.shard_timeout_s (--shard-timeout-s)",
    "files_missing": "put the output folder on one filesystem every worker and the orchestrator mount at the "
                     "same path (docs/scale.md#workers-on-other-machines)",
    "not_started": "check that stage1/scale-shard is deployed (python -m deployments.stack deploy)",
}


@dataclass(frozen=True)
class ShardEnd:
    """How one attempt at a shard ended, as the orchestrator saw it.

    Attributes:
        state: the Prefect state type (`COMPLETED`, `FAILED`, `CRASHED`, `CANCELLED`, `RUNNING`, ...),
            or None when no run could be started or read.
        message: the state's message (Prefect writes `Flow run encountered an exception: Name: text`).
        files_valid: the shard's manifest and files validate on disk.
        timed_out: the run was still not final after `scale.shard_timeout_s`.
        error: `Name: text` of the exception raised while starting or awaiting the run, if any.
    """

    state: str | None
    message: str | None = None
    files_valid: bool = False
    timed_out: bool = False
    error: str | None = None


@dataclass(frozen=True)
class Decision:
    """What the orchestrator does next: `done`, `retry` (start the shard again) or `fail`."""

    action: Action
    cause: str
    reason: str
    delay_s: float = 0.0

    def record(self) -> dict[str, Any]:
        return asdict(self)


def exception_name(text: str | None) -> str | None:
    """The exception's class name in a Failed state's message (`Flow run encountered an exception:
    InputError: ...`) or an error text (`ConnectError: ...`); None when there is none."""
    if not text:
        return None
    m = re.search(r"encountered an exception:\s*([A-Za-z_][\w.]*)\s*(?::|$)", text) or \
        re.match(r"\s*([A-Za-z_][\w.]*)\s*:", text)
    return m.group(1).rsplit(".", 1)[-1] if m else None


def cause_of(end: ShardEnd) -> str:
    """Why the attempt ended as it did: a key of CAUSES."""
    if end.files_valid:
        return "completed"
    if end.error is not None:
        name = exception_name(end.error)
        return "transient" if name in TRANSIENT else "not_started"
    if end.timed_out:
        return "timeout"
    state, message = (end.state or "").upper(), end.message or ""
    if state == "CRASHED":
        return "silent" if any(m in message for m in SILENT_MARKERS) else "crashed"
    if state in ("CANCELLED", "CANCELLING"):
        return "cancelled"
    if state == "COMPLETED":
        return "files_missing"
    if state == "FAILED":
        if message.startswith(SUBMISSION_FAILED):
            return "infrastructure"
        name = exception_name(message)
        if name == LOCKED:
            return "locked"
        if name in NOT_RETRIED:
            return NOT_RETRIED[name]
        return "transient" if name in TRANSIENT else "error"
    return "crashed" if not state else "error"  # a state the shard flow never reaches on its own


def decide(end: ShardEnd, attempt: int, retries: int) -> Decision:
    """What to do after attempt number `attempt` (1 = the first run) of a shard ended as `end`.

    Args:
        end: how the attempt ended.
        attempt: which attempt this was, from 1.
        retries: `scale.shard_retries`: how many times a lost shard is started again.
    Returns:
        done when the files validate; retry for the causes in RETRIED while attempts are left
        (`attempt <= retries`); fail otherwise, with the reason and its fix.
    """
    cause = cause_of(end)
    detail = f" ({_short(end.error or end.message)})" if (end.error or end.message) and cause != "completed" else ""
    what = f"{CAUSES[cause]}{detail}"
    if cause == "completed":
        return Decision("done", cause, what)
    if cause in RETRIED:
        if attempt <= retries:
            return Decision("retry", cause, f"attempt {attempt}: {what}; starting attempt {attempt + 1} of "
                                            f"{retries + 1}", LOCKED_RETRY_DELAY_S if cause == "locked" else 0.0)
        return Decision("fail", cause, f"attempt {attempt}: {what}; no retries left (scale.shard_retries is {retries})")
    return Decision("fail", cause, f"{what}; not retried: {FIXES.get(cause, 'see the shard run')}")


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def failure_text(failed: dict[int, Decision], total: int) -> str:
    """The error that fails a scale run whose shards could not all be computed."""
    lines = [f"{len(failed)} of {total} shards failed: " + "; ".join(
        f"{stem(i)}: {d.reason}" for i, d in sorted(failed.items())[:10])]
    if len(failed) > 10:
        lines.append(f"… and {len(failed) - 10} more")
    lines.append("Complete shards are kept: after the fix, rerun the same run (same output or run_key) to "
                 "compute only these.")
    return " ".join(lines)


def progress_text(done: int, total: int, history: dict[int, list[dict[str, Any]]]) -> str:
    """The progress artifact's description: shards done, and every shard that needed more than one
    attempt with the cause of each lost attempt (`scale: 11/12 shards; rescheduled: shard-00004
    (attempt 1 silent)`)."""
    text = f"scale: {done}/{total} shards"
    again = {i: [a for a in h if a.get("action") == "retry"] for i, h in sorted(history.items())}
    again = {i: lost for i, lost in again.items() if lost}
    if again:
        listed = [f"{stem(i)} (" + ", ".join(f"attempt {a['attempt']} {a['cause']}" for a in lost) + ")"
                  for i, lost in list(again.items())[:5]]
        more = f" and {len(again) - 5} more" if len(again) > 5 else ""
        text += f"; rescheduled: {'; '.join(listed)}{more}"
    failed = [i for i, h in history.items() if h and h[-1].get("action") == "fail"]
    if failed:
        text += "; failed: " + ", ".join(stem(i) for i in sorted(failed)[:5]) + (" …" if len(failed) > 5 else "")
    return text
