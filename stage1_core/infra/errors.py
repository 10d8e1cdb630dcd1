"""Error types of Stage 1.

`InputError` is bad user input (config, seeds, model path, output folder): the CLI prints its
`render()` block, writes nothing and exits 2. Every InputError names where (file, line, field),
what was expected, and what to do.

`WriteError` is the operating system refusing to write an output file (disk full, quota,
permissions, read-only file system): the CLI prints its `render()` block (the file, the errno name
and text, the fix, and that the previous version of the file is untouched) and exits 1.
"""

from __future__ import annotations

import errno as errno_mod
import os
from dataclasses import dataclass


@dataclass
class InputError(Exception):
    """Bad input, found before any model loads.

    Args:
        message: what is wrong, in one sentence.
        file: the offending file, if any.
        line: 1-based line number in `file`, if known.
        field: dotted field name (config key, seed field), if known.
        expected: what a valid value looks like.
        fix: what the user should do.
    """

    message: str
    file: str | None = None
    line: int | None = None
    field: str | None = None
    expected: str | None = None
    fix: str | None = None

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.render()

    def render(self) -> str:
        """One readable block: where, what, expected, fix."""
        where = self.file or ""
        if self.line is not None:
            where += f":{self.line}"
        parts = ["error: " + self.message]
        if where:
            parts.append(f"  file:     {where}")
        if self.field:
            parts.append(f"  field:    {self.field}")
        if self.expected:
            parts.append(f"  expected: {self.expected}")
        if self.fix:
            parts.append(f"  fix:      {self.fix}")
        return "\n".join(parts)


class ModelGuardError(RuntimeError):
    """A contamination guard or sentinel failed: the model must not be used as loaded."""


class DeviceOOM(RuntimeError):
    """Out of device memory with nothing smaller left to try (one row per pass); the message says
    what to change. Never retried: the same call would fail the same way."""


_WRITE_FIXES: dict[str, str] = {
    "ENOSPC": "free space on the device that holds {folder} (`df -h {folder}`)",
    "EDQUOT": "free space, or raise your disk quota, on the device that holds {folder} (`quota -s`)",
    "EFBIG": "the file is larger than the file system allows: use a folder on another file system (--output)",
    "EACCES": "fix the folder's permissions: the user running Stage 1 must be able to create and rename files "
              "in {folder} (`ls -ld {folder}`), or pass another --output",
    "EPERM": "fix the folder's permissions or attributes (`ls -ld {folder}`, `lsattr -d {folder}`): the user "
             "running Stage 1 must be able to create and rename files in {folder}",
    "EROFS": "the file system that holds {folder} is mounted read-only: remount it read-write, or pass another "
             "--output",
    "EIO": "the device that holds {folder} reported an I/O error: check it (`dmesg`)",
}


class WriteError(Exception):
    """The operating system refused to write an output file (ENOSPC, EDQUOT, EACCES, EROFS, EIO...).

    Raised by the atomic writers of `stage1_core.infra.storage` from the OSError (kept as `__cause__`).
    The temp file is removed and the file's previous version, if any, is byte for byte untouched.

    Args:
        path: the file being written (its final name, not the temp file).
        errno: the OSError's errno.
        strerror: the operating system's text for it.
        step: what was being done ("writing the temp file", "renaming the temp file onto it", ...).
        temp_left: the temp file, only when it could not be removed either.
        existed: whether `path` existed when the error happened (and so is kept as it was).
    """

    def __init__(self, path: str, errno: int, strerror: str, step: str, temp_left: str | None = None,
                 existed: bool = False) -> None:
        self.path, self.errno, self.strerror, self.step = path, errno, strerror, step
        self.temp_left, self.existed = temp_left, existed
        super().__init__(path, errno, strerror, step, temp_left, existed)  # args rebuild it when unpickled

    @property
    def errno_name(self) -> str:
        """`ENOSPC`, `EACCES`, ... (`errno N` for a number this platform has no name for)."""
        return errno_mod.errorcode.get(self.errno, f"errno {self.errno}")

    def __str__(self) -> str:
        return self.render()

    def render(self) -> str:
        """One readable block: the file, the errno name and text, the fix, what was left as it was."""
        folder = os.path.dirname(self.path) or "."
        name = os.path.basename(self.path)
        fix = _WRITE_FIXES.get(self.errno_name, "check that {folder} is writable and its device healthy")
        kept = (f"the previous version of {name} is untouched" if self.existed
                else f"{name} did not exist before and was not created")
        temp = (f"the temp file {self.temp_left} could not be removed: delete it" if self.temp_left
                else "no temp file is left")
        return "\n".join([
            f"error: could not write {self.path}: {self.errno_name} ({self.strerror}) while {self.step}",
            f"  file:     {self.path}",
            f"  fix:      {fix.format(folder=folder)}; then rerun the same command (finished work is reused)",
            f"  kept:     {kept}; {temp}",
        ])
