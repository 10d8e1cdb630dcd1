"""Fault injection for crash tests: `STAGE1_FAULT=<point>[@<glob>]:<n>` SIGKILLs the process the n-th
time execution reaches `<point>` (1-based, counted per process). With `@<glob>`, only hits whose
name (for `write`: the target file's name) matches the glob count, e.g. `write@shard-*.jsonl:2`.
Unset: no effect.

Points:
- `write`: an atomic write's temp file is written and fsynced, before the rename (name: the file).
- `generate`: after a generation batch.
- `critic`: after a critic batch.
- `phase_end`: a pilot phase's output is written, before its cache sidecar and before its task returns.
- `shard_write`: a scale shard's data files are written, before its manifest (name: `shard-NNNNN`).
- `merge`: the scale merge has written `scale_data.jsonl` and `rejected.jsonl`, before
  `qc_summary.json`, the dataset card and `session_manifest.json`.
"""

from __future__ import annotations

import fnmatch
import os
import signal
from collections import Counter

_hits: Counter[str] = Counter()


def maybe_fault(point: str, name: str | None = None) -> None:
    """SIGKILL this process if STAGE1_FAULT names `point` (and `name` matches its glob) for the n-th time.

    Args:
        point: the fault point reached.
        name: what the point is acting on (a file name, a shard), matched against `@<glob>`.
    """
    spec = os.environ.get("STAGE1_FAULT")
    if not spec:
        return
    target, _, n = spec.rpartition(":") if spec.rpartition(":")[2].isdigit() else (spec, "", "1")
    wanted, _, pattern = target.partition("@")
    if wanted != point or (pattern and (name is None or not fnmatch.fnmatchcase(name, pattern))):
        return
    _hits[point] += 1
    if _hits[point] >= int(n or "1"):
        os.kill(os.getpid(), signal.SIGKILL)
