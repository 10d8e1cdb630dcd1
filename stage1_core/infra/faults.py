"""Fault injection for crash tests: `STAGE1_FAULT=<point>[@<glob>]:<n>` SIGKILLs the process the n-th
time execution reaches `<point>` (1-based, counted per process). With `@<glob>`, only hits whose
name (for `write`: the target file's name) matches the glob count, e.g. `write@shard-*.jsonl:2`; a
glob with a `/` is matched against the target's whole path (`*` crosses folders), e.g.
`write@*/out/pilot_data.jsonl` (the top-level file, not `out/iterations/01/pilot_data.jsonl`).
Unset: no effect.

`STAGE1_FAULT=<point>[@<glob>][:<n>]:<ERRNO>` raises `OSError(<ERRNO>)` there instead of the SIGKILL,
e.g. `write@pilot_data.jsonl:1:ENOSPC` or `write:3:EACCES` (any name of the `errno` module: ENOSPC,
EACCES, EROFS, EDQUOT, EIO...), at the n-th matching hit and every later one, as a full disk stays
full. At `write` the temp file is then written and fsynced but not yet renamed: the writer turns
the OSError into a `WriteError` (CLI exit 1, previous file untouched, temp file removed). At other
points it surfaces as an unexpected error. Tests run as root, where chmod cannot produce EACCES.

Points:
- `write`: an atomic write's temp file is written and fsynced, before the rename (name: the file).
- `generate`: after a generation batch.
- `critic`: after a critic batch.
- `phase_end`: a pilot phase's output is written, before its cache sidecar and before its task returns.
- `shard_write`: a scale shard's data files are written, before its manifest (name: `shard-NNNNN`).
- `sft_step`: an SFT optimizer step has finished (name: the step number).
- `sft_save`: an SFT checkpoint is written and fsynced in its staging folder, before its rename to
  `checkpoint-N` (name: `checkpoint-N`).
- `merge`: the scale merge has written `scale_data.jsonl` and `rejected.jsonl`, before
  `qc_summary.json`, the dataset card and `session_manifest.json`.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import signal
from collections import Counter

_hits: Counter[str] = Counter()


def parse(spec: str) -> tuple[str, str, int, int | None]:
    """Split a STAGE1_FAULT value into (point, glob, n, errno or None); glob is "" when absent.

    Raises:
        ValueError: a trailing part that is neither a count nor an errno name.
    """
    target, code = spec, None
    head, sep, last = spec.rpartition(":")
    if sep and not last.isdigit():
        if not hasattr(errno, last) or not last.startswith("E"):
            raise ValueError(f"STAGE1_FAULT={spec!r}: {last!r} is neither a count nor an errno name "
                             "(ENOSPC, EACCES, ...)")
        target, code = head, getattr(errno, last)
    head, sep, last = target.rpartition(":")
    n = 1
    if sep and last.isdigit():
        target, n = head, int(last)
    point, _, pattern = target.partition("@")
    return point, pattern, n, code


def maybe_fault(point: str, name: str | None = None) -> None:
    """SIGKILL this process if STAGE1_FAULT names `point` (and `name` matches its glob) for the n-th
    time; with an errno in the spec, raise that OSError from the n-th time on.

    Args:
        point: the fault point reached.
        name: what the point is acting on (a file's path, a shard), matched against `@<glob>`: a
            glob with a `/` against the whole name, otherwise against its last part.

    Raises:
        OSError: the spec ends in an errno name (`...:ENOSPC`) and this is its n-th hit.
    """
    spec = os.environ.get("STAGE1_FAULT")
    if not spec:
        return
    wanted, pattern, n, code = parse(spec)
    if wanted != point or (pattern and (name is None or not fnmatch.fnmatchcase(
            name if "/" in pattern else os.path.basename(name), pattern))):
        return
    _hits[point] += 1
    if _hits[point] < n:
        return
    if code is None:
        os.kill(os.getpid(), signal.SIGKILL)
    else:
        raise OSError(code, os.strerror(code), name)
