"""Fault injection for crash tests: `STAGE1_FAULT=<point>:<n>` SIGKILLs the process the n-th time
execution reaches `<point>` (1-based). Points: `write` (temp file written, before rename),
`generate` (after a generation batch), `phase_end` (a phase's output is written, before its task
returns), `critic` (after a critic batch). Unset: no effect.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_hits: Counter[str] = Counter()


def maybe_fault(point: str) -> None:
    spec = os.environ.get("STAGE1_FAULT")
    if not spec:
        return
    name, _, n = spec.partition(":")
    if name != point:
        return
    _hits[point] += 1
    if _hits[point] >= int(n or "1"):
        os.kill(os.getpid(), signal.SIGKILL)
