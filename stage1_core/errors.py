"""Error types of Stage 1.

`InputError` is bad user input (config, seeds, model path, output folder): the CLI prints its
`render()` block, writes nothing and exits 2. Every InputError names where (file, line, field),
what was expected, and what to do.
"""

from __future__ import annotations

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
