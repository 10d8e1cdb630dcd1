"""Seed instructions: the few-shot material of instruction generation, loaded and validated.

A seed set is a JSON Lines file (UTF-8, a leading UTF-8 BOM is accepted, blank lines skipped) in one
of two formats, decided per FILE by the first object:

* ours (``stage1``): exactly the `Seed` fields per line,
  ``{"id": "s1", "instruction": "...", "input": "", "output": null}`` (``input``/``output`` optional);
* Self-Instruct (``self_instruct``, the first object has ``instances``): keys ``id``, ``name``,
  ``instruction``, ``instances``, ``is_classification``; ``instances[0].input`` becomes ``input`` and
  ``instances[0].output`` becomes ``output`` (further instances are ignored).

Unknown keys are rejected in both. The file is read as bytes and validated line by line; every
problem raises `InputError` naming the file, the 1-based line and the field. No model is loaded.

Usage::

    seedset = load_seeds(None)            # the packaged 175 Self-Instruct seed tasks (Apache-2.0)
    require_usable(seedset, k=8)          # the few-shot list needs k one-line seeds
    lines = [s.list_text() for s in seedset.usable_seeds()]
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from stage1_core.infra.errors import InputError
from stage1_core.infra.jsonl import MAX_LINE_CHARS, JsonlKind, json_type, objects, open_jsonl
from stage1_core.infra.jsonl import check_text, printable as _printable

__all__ = ["MAX_LINE_CHARS", "PACKAGED_SEEDS", "SEED_FILE", "Seed", "SeedSet", "json_type", "load_seeds",
           "require_usable"]

PACKAGED_SEEDS = Path(__file__).resolve().parents[1] / "data" / "self_instruct_seed_tasks.jsonl"

MAX_LIST_TEXT_CHARS = 300
"""Longest one-line form a seed may have to appear in the numbered few-shot list."""

SeedFormat = Literal["stage1", "self_instruct"]

_OUR_KEYS = ("id", "instruction", "input", "output")
_SELF_INSTRUCT_KEYS = ("id", "name", "instruction", "instances", "is_classification")
_INSTANCE_KEYS = ("input", "output")
_OUR_EXAMPLE = '{"id": "s1", "instruction": "Name three primary colors.", "input": "", "output": null}'

SEED_FILE = JsonlKind(item="seed", example=_OUR_EXAMPLE, dir_fix="pass the .jsonl file inside it to --seeds",
                      missing_fix="check the --seeds path (omit it to use the packaged Self-Instruct seeds)",
                      empty_fix="add seeds, or omit --seeds to use the packaged Self-Instruct seeds")
"""How errors name a seed file (stage1_core.infra.jsonl reads it)."""


class Seed(BaseModel):
    """One seed task.

    Args:
        id: unique, non-empty identifier within its file.
        instruction: the task, 1-2,000 characters, not only whitespace.
        input: optional task input (the Self-Instruct "instance" input); "" when none.
        output: optional reference output; None when unknown.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    instruction: str = Field(min_length=1, max_length=2000)
    input: str = ""
    output: str | None = None

    @field_validator("id", "instruction")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        # Control (NUL...) and format characters (zero-width space, BOM, RTL marks) are invisible too:
        # a seed made of them would be an empty-looking line in the few-shot list.
        if all(c.isspace() or unicodedata.category(c) in ("Cc", "Cf") for c in value):
            raise ValueError("must not be only whitespace, control or zero-width characters")
        return value

    def list_text(self) -> str | None:
        """The seed as one line of the numbered few-shot list, or None if it does not fit.

        The instruction alone when the input is empty (or only whitespace), else
        ``f"{instruction} Input: {input}"``; whitespace runs (newlines included) collapse to one
        space. Kept only when that line is at most 300 characters. Why: 125 of the 175
        Self-Instruct seeds have an input, and dropping it would leave instructions that refer to
        text that is not there ("the given pairs"), which the base model would then imitate;
        inlining a short input keeps such seeds, while a long (often multi-line) input would break
        the one-item-per-line list the parser relies on, so those seeds are not used in lists.

        Returns:
            The one-line form, or None when it is longer than 300 characters.
        """
        text = self.instruction if not self.input.strip() else f"{self.instruction} Input: {self.input}"
        line = " ".join(text.split())
        return line if len(line) <= MAX_LIST_TEXT_CHARS else None


@dataclass
class SeedSet:
    """A loaded seed file.

    Args:
        path: the file the seeds came from.
        format: "stage1" (ours) or "self_instruct".
        seeds: the seeds, in file order.
        sha256: hex sha256 of the file's bytes.
    """

    path: str
    format: SeedFormat
    seeds: list[Seed] = field(default_factory=list)
    sha256: str = ""

    @property
    def count(self) -> int:
        """Number of seeds."""
        return len(self.seeds)

    @property
    def usable(self) -> int:
        """Number of seeds whose one-line form fits a few-shot list (`Seed.list_text`)."""
        return len(self.usable_seeds())

    def usable_seeds(self) -> list[Seed]:
        """The seeds usable in a few-shot list, in file order.

        Returns:
            Seeds whose `list_text()` is not None.
        """
        return [s for s in self.seeds if s.list_text() is not None]

    def summary(self) -> dict[str, Any]:
        """JSON-able description for manifests.

        Returns:
            {path, format, count, usable, sha256}.
        """
        return {"path": self.path, "format": self.format, "count": self.count,
                "usable": self.usable, "sha256": self.sha256}


def load_seeds(path: str | Path | None) -> SeedSet:
    """Read and validate a seed file.

    Args:
        path: a JSON Lines seed file (ours or Self-Instruct); None for the packaged seeds.

    Returns:
        The validated `SeedSet`.

    Raises:
        InputError: missing file or a directory, non-UTF-8 bytes, a JSON array instead of JSON
            Lines, an over-long line, invalid JSON, a line that is not an object, a missing,
            unknown or wrong-typed field, a duplicate id, or no seeds at all.
    """
    p = PACKAGED_SEEDS if path is None else Path(path)
    name = str(p)
    body, sha = open_jsonl(p, SEED_FILE)
    seeds: list[Seed] = []
    first_line: dict[str, int] = {}
    fmt: SeedFormat | None = None
    for line_no, obj in objects(body, name, SEED_FILE):  # an empty file raises SEED_FILE's "empty" error
        if fmt is None:
            fmt = "self_instruct" if "instances" in obj else "stage1"
        fields = _self_instruct_fields(obj, name, line_no) if fmt == "self_instruct" else _our_fields(obj, name, line_no)
        seed = _make_seed(fields, fmt, name, line_no)
        if seed.id in first_line:
            raise InputError(f"duplicate seed id {seed.id!r} on lines {first_line[seed.id]} and {line_no}",
                             file=name, line=line_no, field="id", expected="a unique id per seed",
                             fix=f"rename one of the two (lines {first_line[seed.id]} and {line_no})")
        first_line[seed.id] = line_no
        seeds.append(seed)

    assert fmt is not None  # objects() raised on a file without objects
    return SeedSet(path=name, format=fmt, seeds=seeds, sha256=sha)


def require_usable(seedset: SeedSet, k: int) -> None:
    """Check that the seed set can fill a few-shot list of k items.

    Args:
        seedset: the loaded seeds.
        k: the few-shot list length (instruction_generation.few_shot_k).

    Raises:
        InputError: fewer than k seeds have a one-line form of at most 300 characters.
    """
    usable = seedset.usable
    if usable < k:
        raise InputError(
            f"only {usable} of {seedset.count} seeds are usable in a few-shot list, which needs {k}",
            file=seedset.path, field="instruction_generation.few_shot_k",
            expected=f"at least {k} seeds whose one-line form (instruction, plus ' Input: ' and the input "
                     f"if any) is <= {MAX_LIST_TEXT_CHARS} characters",
            fix=f"make --seeds provide at least {k} such seeds, or lower instruction_generation.few_shot_k "
                f"to {usable} or less")


def _our_fields(obj: dict[str, Any], file: str, line_no: int) -> dict[str, Any]:
    """Check a line of our format; returns the Seed fields."""
    for key in sorted(obj, key=lambda k: k != "instances"):  # the likeliest mistake is reported first
        if key not in _OUR_KEYS:
            hint = (" (this file's first seed has no 'instances', so it is read in the Stage 1 format; "
                    "Self-Instruct files must have 'instances' on every line)") if key == "instances" else ""
            raise InputError(f"unknown key {key!r}{hint}", file=file, line=line_no, field=_printable(key),
                             expected=f"only the keys {', '.join(_OUR_KEYS)}", fix="remove or rename the key")
    _require(obj, "id", str, file, line_no, "id")
    _require(obj, "instruction", str, file, line_no, "instruction")
    if "input" in obj:
        _check_type(obj["input"], str, file, line_no, "input")
    if obj.get("output") is not None:
        _check_type(obj["output"], str, file, line_no, "output", nullable=True)
    return {"id": obj["id"], "instruction": obj["instruction"], "input": obj.get("input", ""),
            "output": obj.get("output")}


def _self_instruct_fields(obj: dict[str, Any], file: str, line_no: int) -> dict[str, Any]:
    """Check a Self-Instruct line; returns the Seed fields (instances[0] -> input/output)."""
    for key in obj:
        if key not in _SELF_INSTRUCT_KEYS:
            raise InputError(f"unknown key {key!r} in a Self-Instruct seed", file=file, line=line_no,
                             field=_printable(key),
                             expected=f"only the keys {', '.join(_SELF_INSTRUCT_KEYS)} (format decided by the "
                                      "first seed, which has 'instances')",
                             fix="remove or rename the key")
    _require(obj, "id", str, file, line_no, "id")
    _require(obj, "instruction", str, file, line_no, "instruction")
    if "name" in obj:
        _check_type(obj["name"], str, file, line_no, "name")
    if "is_classification" in obj:
        _check_type(obj["is_classification"], bool, file, line_no, "is_classification")
    _require(obj, "instances", list, file, line_no, "instances")
    instances = obj["instances"]
    if not instances:
        raise InputError("'instances' is empty", file=file, line=line_no, field="instances",
                         expected='a list with at least one {"input": ..., "output": ...} object',
                         fix="add an instance (input may be \"\")")
    first = instances[0]
    _check_type(first, dict, file, line_no, "instances[0]")
    for key in first:
        if key not in _INSTANCE_KEYS:
            raise InputError(f"unknown key {key!r} in instances[0]", file=file, line=line_no,
                             field=f"instances[0].{_printable(key)}", expected="only the keys input, output",
                             fix="remove or rename the key")
    _require(first, "input", str, file, line_no, "instances[0].input")
    _require(first, "output", str, file, line_no, "instances[0].output")
    return {"id": obj["id"], "instruction": obj["instruction"], "input": first["input"], "output": first["output"]}


def _make_seed(fields: dict[str, Any], fmt: SeedFormat, file: str, line_no: int) -> Seed:
    try:
        return Seed(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        name = str(err["loc"][0]) if err["loc"] else None
        if fmt == "self_instruct" and name in ("input", "output"):
            name = f"instances[0].{name}"
        expected = {"id": "a non-empty string", "instruction": "a string of 1 to 2,000 characters, not only whitespace"}
        raise InputError(f"invalid {name}: {err['msg'].removeprefix('Value error, ')}", file=file, line=line_no, field=name,
                         expected=expected.get(name or "", "a string"), fix="correct the value") from None


def _require(obj: dict[str, Any], key: str, typ: type, file: str, line_no: int, field_name: str) -> None:
    if key not in obj:
        raise InputError(f"missing required field {field_name!r}", file=file, line=line_no, field=field_name,
                         expected=f"a {_TYPE_NAMES[typ]}", fix=f"add {key!r} to this seed")
    _check_type(obj[key], typ, file, line_no, field_name)


def _check_type(value: Any, typ: type, file: str, line_no: int, field_name: str, nullable: bool = False) -> None:
    # bool is a subclass of int in Python; JSON true/false must not pass as numbers or vice versa.
    ok = isinstance(value, typ) and (typ is bool or not isinstance(value, bool))
    if not ok:
        want = _TYPE_NAMES[typ] + (" or null" if nullable else "")
        raise InputError(f"field {field_name!r} is a JSON {json_type(value)}, expected a {want}", file=file,
                         line=line_no, field=field_name, expected=f"a {want}", fix="correct the value's type")
    if isinstance(value, str):
        check_text(value, file, line_no, field_name)


_TYPE_NAMES: dict[type, str] = {str: "string", bool: "boolean (true/false)", list: "list", dict: "object"}
