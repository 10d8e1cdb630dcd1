"""The one hardened JSON Lines reader: seeds, the critic dev set, eval prompts and references, SFT data,
and a run's own files (`read_rows`: phase outputs, shards, the final data).

A file is read as bytes and checked before any object is used: a directory, a missing or unreadable
file, UTF-16, a JSON array instead of JSON Lines, invalid UTF-8, a line over `MAX_LINE_CHARS`,
invalid JSON, a repeated key inside one object (json.loads would silently keep the last value),
nesting too deep, a huge integer, a line that is not an object, and a file without objects each raise
`InputError` naming the file, the 1-based line and what to do. A leading UTF-8 BOM, CRLF line ends
and blank lines are accepted. `JsonlKind` holds the words an error uses for one kind of file, so the
messages read "seed file is not valid UTF-8" or "eval prompts file is not valid UTF-8".

Usage::

    for line_no, obj in read_jsonl(path, EVAL_PROMPTS):   # a kind defined by the caller
        name = require_string(obj, "instruction", str(path), line_no, EVAL_PROMPTS)
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from stage1_core.infra.errors import InputError

MAX_LINE_CHARS = 100_000
"""Longest accepted line, in characters (an item is a few hundred; longer is a wrong file)."""

_UTF8_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


@dataclass(frozen=True)
class JsonlKind:
    """The words errors use for one kind of JSON Lines file.

    Args:
        item: one object's name ("seed"): "seed file", "a seed", "each seed".
        example: one valid line, quoted in errors.
        dir_fix: the fix when the path is a directory.
        missing_fix: the fix when the file does not exist.
        empty_fix: the fix when the file has no objects.
        allow_empty: a file without objects is valid (a run file that kept nothing).
        max_line_chars: the longest accepted line.
    """

    item: str
    example: str
    dir_fix: str = "pass the .jsonl file inside it"
    missing_fix: str = "check the path"
    empty_fix: str = "add items, one JSON object per line"
    allow_empty: bool = False
    max_line_chars: int = MAX_LINE_CHARS

    @property
    def file(self) -> str:
        return f"{self.item} file"


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type (null, boolean, number, string, array, object)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def printable(text: str) -> str:
    """`text` as it can be shown in an error block: escaped when it holds unprintable characters."""
    return text if text.isprintable() else ascii(text)[1:-1]


def open_jsonl(path: Path, kind: JsonlKind) -> tuple[bytes, str]:
    """The file's body (without a UTF-8 BOM) and the sha256 of its bytes.

    Raises:
        InputError: a directory, a missing or unreadable file, UTF-16, a JSON array.
    """
    name = str(path)
    if path.is_dir():
        raise InputError(f"{kind.item} path is a directory, not a file: {name}", file=name,
                         expected=f"a JSON Lines file with one {kind.item} object per line", fix=kind.dir_fix)
    if not path.is_file():
        raise InputError(f"{kind.file} not found: {name}", file=name, expected="an existing JSON Lines file",
                         fix=kind.missing_fix)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read {kind.file}: {e.strerror or e}", file=name, expected="a readable file",
                         fix="check the file's permissions") from e
    sha = hashlib.sha256(data).hexdigest()
    if data.startswith(_UTF16_BOMS):
        raise InputError(f"{kind.file} is UTF-16 (it starts with a UTF-16 byte-order mark), not UTF-8", file=name,
                         line=1, expected="UTF-8 text", fix="re-save the file as UTF-8")
    body = data[len(_UTF8_BOM):] if data.startswith(_UTF8_BOM) else data
    stripped = body.lstrip()
    if stripped.startswith(b"["):
        line_no = body[: len(body) - len(stripped)].count(b"\n") + 1
        raise InputError(f"{kind.file} is a JSON array; expected one object per line (JSON Lines)", file=name,
                         line=line_no, expected=f"one JSON object per line, e.g. {kind.example}",
                         fix=f"convert it: jq -c '.[]' {name} > {kind.item.replace(' ', '_')}s.jsonl")
    return body, sha


def objects(body: bytes, file: str, kind: JsonlKind) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of every non-blank line, lazily: the caller validates line k before
    line k + 1 is parsed, so the first bad line is the one reported.

    Raises:
        InputError: see the module docstring; after the last line, when no line held an object.
    """
    seen = False
    for line_no, raw in enumerate(body.split(b"\n"), start=1):
        text = decode_line(raw, file, line_no, kind)
        if not text.strip():
            continue
        seen = True
        yield line_no, parse_line(text, file, line_no, kind)
    if not seen and not kind.allow_empty:
        raise InputError(f"{kind.file} is empty (no {kind.item} objects)", file=file,
                         expected=f"one JSON object per line, e.g. {kind.example}", fix=kind.empty_fix)


def read_jsonl(path: str | Path, kind: JsonlKind) -> list[tuple[int, dict[str, Any]]]:
    """Every (line number, object) of a JSON Lines file (see the module docstring)."""
    p = Path(path)
    body, _ = open_jsonl(p, kind)
    return list(objects(body, str(p), kind))


RUN_FILE = JsonlKind(item="run file", example='{"id": "r01-p000-i00", "instruction": "..."}',
                     missing_fix="rerun the run (a phase's output is missing: it was deleted or moved)",
                     allow_empty=True, max_line_chars=10 * MAX_LINE_CHARS)
"""A file a run wrote itself: it may be empty (nothing kept); a line may hold a long completion."""


def read_rows(path: str | Path, kind: JsonlKind = RUN_FILE) -> list[dict[str, Any]]:
    """The objects of a JSON Lines file, in order, through the same checks as every other file: a
    run file edited by hand or cut short by a full disk is an InputError naming its line."""
    return [obj for _, obj in read_jsonl(path, kind)]


def decode_line(raw: bytes, file: str, line_no: int, kind: JsonlKind) -> str:
    """One line's bytes as text (CR of CRLF dropped); InputError on bad UTF-8 or an over-long line."""
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{kind.file} is not valid UTF-8: byte 0x{raw[e.start]:02x} at column {e.start + 1} "
                         f"of this line ({e.reason})", file=file, line=line_no, expected="UTF-8 text",
                         fix="re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
    if len(text) > kind.max_line_chars:
        raise InputError(f"line is too long ({len(text):,} characters; the limit is {kind.max_line_chars:,})",
                         file=file, line=line_no,
                         expected=f"one {kind.item} object per line, at most {kind.max_line_chars:,} characters",
                         fix=f"check that this is a {kind.file} and that each {kind.item} is on its own line; "
                             f"shorten the {kind.item}")
    return text


class _DuplicateKey(Exception):
    """A JSON object on one line repeats a key (json.loads would silently keep the last value)."""


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key)
        obj[key] = value
    return obj


def parse_line(text: str, file: str, line_no: int, kind: JsonlKind) -> dict[str, Any]:
    """One line's JSON object; InputError for invalid JSON, a repeated key, deep nesting, a huge
    number, or a value that is not an object."""
    expected = f"one JSON object per line, e.g. {kind.example}"
    hint = f"check that this is a {kind.file}; a {kind.item}'s fields are strings"
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise InputError(f"invalid JSON: {e.msg} (column {e.colno})", file=file, line=line_no, expected=expected,
                         fix=f"fix the JSON on this line (a {kind.item} must not span several lines)") from None
    except _DuplicateKey as e:
        key = printable(e.args[0])
        raise InputError(f"key {key!r} appears twice in this object", file=file, line=line_no, field=key,
                         expected="each key at most once per object", fix="remove one of the two") from None
    except RecursionError:
        raise InputError("JSON is nested too deeply to read", file=file, line=line_no, expected=expected,
                         fix=hint) from None
    except ValueError as e:  # e.g. an integer of more than 4,300 digits (sys.get_int_max_str_digits)
        raise InputError(f"invalid JSON: {e}", file=file, line=line_no, expected=expected, fix=hint) from None
    if not isinstance(obj, dict):
        raise InputError(f"line is a JSON {json_type(obj)}, not an object", file=file, line=line_no,
                         expected=expected, fix=f"put each {kind.item} on its own line as a {{...}} object")
    return obj


def check_text(value: str, file: str, line_no: int, field: str) -> None:
    """A string must be encodable text: no lone UTF-16 surrogate (a \\uD800-\\uDFFF escape alone)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"field {field!r} holds a lone UTF-16 surrogate ({ascii(value[e.start])[1:-1]} at "
                         f"character {e.start + 1}), which is not text", file=file, line=line_no, field=field,
                         expected="a string of Unicode characters (a \\uD800-\\uDFFF escape only as half of a pair)",
                         fix="remove the escape, or write the character it was meant to be") from None


def invisible(value: str) -> bool:
    """Only whitespace, control or format (zero-width, BOM, direction mark) characters."""
    return all(c.isspace() or unicodedata.category(c) in ("Cc", "Cf") for c in value)


def require_string(obj: dict[str, Any], key: str, file: str, line_no: int, kind: JsonlKind,
                   field: str | None = None) -> str:
    """`obj[key]`: a string of encodable text that is not only whitespace or invisible characters.

    Raises:
        InputError: missing, not a string, a lone surrogate, or blank; naming file, line and field.
    """
    name = field or key
    if key not in obj:
        raise InputError(f"missing required field {name!r}", file=file, line=line_no, field=name,
                         expected=f"a non-empty string, as in {kind.example}", fix=f"add {key!r} to this line")
    value = obj[key]
    if not isinstance(value, str):
        raise InputError(f"field {name!r} is a JSON {json_type(value)}, expected a string", file=file, line=line_no,
                         field=name, expected="a non-empty string", fix="quote the value")
    check_text(value, file, line_no, name)
    if invisible(value):
        raise InputError(f"field {name!r} is empty", file=file, line=line_no, field=name,
                         expected="a string that is not only whitespace, control or zero-width characters",
                         fix="fill in the value")
    return value


def no_duplicate_ids(ids: list[tuple[str, int]], file: str, what: str = "id") -> None:
    """Each id once; InputError naming both lines."""
    first: dict[str, int] = {}
    for item_id, line_no in ids:
        if item_id in first:
            raise InputError(f"duplicate {what} {item_id!r} on lines {first[item_id]} and {line_no}", file=file,
                             line=line_no, field="id", expected="a unique id per line",
                             fix=f"rename one of the two (lines {first[item_id]} and {line_no})")
        first[item_id] = line_no
