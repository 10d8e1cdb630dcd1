"""Advisory file locks that keep two runs from writing the same folder (or the same shard).

`fcntl.flock` on a lock file, non-blocking: the second taker fails at once with `LockedError`
(the scale CLI exits 5). The kernel releases the lock when the holder exits, even on SIGKILL, so a
crashed run never leaves a stale lock behind; the file itself stays (deleting it would race).

    with hold_lock(Path(out) / ".lock", what="output folder"):
        ...  # only one process at a time gets here for this folder
"""

from __future__ import annotations

import fcntl
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from stage1_core.infra import provenance
from stage1_core.infra.errors import InputError

LOCK_NAME = ".lock"


class LockedError(InputError):
    """The lock is held by another process (exit code 5 in the scale CLI, not 2)."""


@contextmanager
def hold_lock(path: str | Path, what: str = "output folder") -> Iterator[None]:
    """Hold an exclusive, non-blocking flock on `path` (created if missing) for the block.

    Args:
        path: the lock file, e.g. `DIR/.lock`; its folder is created if missing.
        what: what the lock protects, for the error message.
    Raises:
        LockedError: another process holds it; the message names the folder and the holder.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise LockedError(f"{what} {p.parent} is locked by another run{f' ({holder})' if holder else ''}",
                          file=str(p), expected="no other stage1 run writing this folder",
                          fix="wait for that run to finish (rerun the same command then to resume), "
                              "or choose another --output") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {provenance.utc_now()}\n".encode())
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""
