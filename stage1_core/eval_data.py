"""Held-out evaluation data: instruction prompts (some with a verifiable check) and reference pairs.

Two JSON Lines files (UTF-8, a leading UTF-8 BOM accepted, blank lines skipped), one object per line:

* prompts: ``{"id": "eval-001", "instruction": "...", "check": {"type": "one_word"}}``; `check` is
  optional (a `stage1_core.checkers` spec); other keys are kept in the file but ignored here;
* reference pairs: ``{"id": "ref-001", "instruction": "...", "response": "..."}``, a good answer
  per instruction, used to measure the perplexity of good responses; other keys are ignored.

`id` is a non-empty string, unique in its file; `instruction` and `response` are strings that are not
only whitespace. Every problem raises `InputError` naming the file, the 1-based line and the field.
The shipped files (`SHIPPED_PROMPTS`, `SHIPPED_REFERENCE`) were written for Stage 1 and are disjoint
from the seed tasks, the critic dev set and the config's examples (tests/core/test_eval_data.py).

Usage::

    prompts = load_eval_prompts(None)       # the shipped 48 prompts, 24 with a check
    pairs = load_reference(None)            # the shipped 32 reference pairs
    ok = checkers.passes(prompts[0].check, response) if prompts[0].check else None
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stage1_core import checkers
from stage1_core.errors import InputError
from stage1_core.seeds import json_type

SHIPPED_PROMPTS = Path(__file__).parent / "data" / "eval_prompts.jsonl"
SHIPPED_REFERENCE = Path(__file__).parent / "data" / "eval_reference.jsonl"

_UTF8_BOM = b"\xef\xbb\xbf"
_PROMPT_EXAMPLE = ('{"id": "eval-001", "instruction": "Name a planet. Answer in one word.", '
                   '"check": {"type": "one_word"}}')
_REFERENCE_EXAMPLE = '{"id": "ref-001", "instruction": "Name a planet.", "response": "Mars."}'


@dataclass(frozen=True)
class EvalPrompt:
    """One evaluation prompt.

    Args:
        id: unique, non-empty identifier within its file.
        instruction: the task given to the model.
        check: a validated `checkers` spec, or None when the prompt has no verifiable constraint.
        line: 1-based line of the prompt in its file.
    """

    id: str
    instruction: str
    check: dict[str, Any] | None = None
    line: int = 0


@dataclass(frozen=True)
class ReferencePair:
    """One reference pair: an instruction and a good response to it.

    Args:
        id: unique, non-empty identifier within its file.
        instruction: the task.
        response: a good, correct, concise answer.
        line: 1-based line of the pair in its file.
    """

    id: str
    instruction: str
    response: str
    line: int = 0


def load_eval_prompts(path: str | Path | None = None) -> list[EvalPrompt]:
    """Read and validate an evaluation prompts file.

    Args:
        path: a JSON Lines file; None for the shipped prompts (`SHIPPED_PROMPTS`).
    Returns:
        The prompts in file order.
    Raises:
        InputError: missing file or a directory, non-UTF-8 bytes, invalid JSON, a line that is not an
            object, a missing, wrong-typed or blank id/instruction, a duplicate id, an invalid check,
            or no prompts at all.
    """
    p = SHIPPED_PROMPTS if path is None else Path(path)
    out: list[EvalPrompt] = []
    for line_no, obj in _objects(p, "evaluation prompts", _PROMPT_EXAMPLE):
        _require_text(obj, "id", str(p), line_no, _PROMPT_EXAMPLE)
        _require_text(obj, "instruction", str(p), line_no, _PROMPT_EXAMPLE)
        check = None
        if "check" in obj:
            try:
                check = checkers.validate_check(obj["check"])
            except ValueError as e:
                raise InputError(f"invalid check: {e}", file=str(p), line=line_no, field="check",
                                 expected='a check object such as {"type": "max_words", "n": 10} (the types and '
                                          "their parameters: stage1_core/checkers.py)",
                                 fix="correct the check, or remove the 'check' key for a prompt without one") from None
        out.append(EvalPrompt(id=obj["id"], instruction=obj["instruction"], check=check, line=line_no))
    _no_duplicate_ids([(x.id, x.line) for x in out], str(p))
    return out


def load_reference(path: str | Path | None = None) -> list[ReferencePair]:
    """Read and validate a reference pairs file.

    Args:
        path: a JSON Lines file; None for the shipped pairs (`SHIPPED_REFERENCE`).
    Returns:
        The pairs in file order.
    Raises:
        InputError: missing file or a directory, non-UTF-8 bytes, invalid JSON, a line that is not an
            object, a missing, wrong-typed or blank id/instruction/response, a duplicate id, or no
            pairs at all.
    """
    p = SHIPPED_REFERENCE if path is None else Path(path)
    out: list[ReferencePair] = []
    for line_no, obj in _objects(p, "reference pairs", _REFERENCE_EXAMPLE):
        for key in ("id", "instruction", "response"):
            _require_text(obj, key, str(p), line_no, _REFERENCE_EXAMPLE)
        out.append(ReferencePair(id=obj["id"], instruction=obj["instruction"], response=obj["response"],
                                 line=line_no))
    _no_duplicate_ids([(x.id, x.line) for x in out], str(p))
    return out


def _objects(p: Path, what: str, example: str) -> list[tuple[int, dict[str, Any]]]:
    """The (line number, object) of every non-blank line; InputError for anything else."""
    name = str(p)
    if p.is_dir():
        raise InputError(f"{what} path is a directory, not a file: {name}", file=name,
                         expected=f"a JSON Lines file, one object per line, e.g. {example}",
                         fix="pass the .jsonl file inside it")
    if not p.is_file():
        raise InputError(f"{what} file not found: {name}", file=name, expected="an existing JSON Lines file",
                         fix="check the path (omit it to use the shipped file)")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read {what} file: {e.strerror or e}", file=name, expected="a readable file",
                         fix="check the file's permissions") from e
    body = data[len(_UTF8_BOM):] if data.startswith(_UTF8_BOM) else data
    out: list[tuple[int, dict[str, Any]]] = []
    for line_no, raw in enumerate(body.split(b"\n"), start=1):
        try:
            text = raw.removesuffix(b"\r").decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"{what} file is not valid UTF-8: byte 0x{raw[e.start]:02x} at column {e.start + 1} "
                             f"of this line", file=name, line=line_no, expected="UTF-8 text",
                             fix="re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as e:
            msg = f"{e.msg} (column {e.colno})" if isinstance(e, json.JSONDecodeError) else str(e)
            raise InputError(f"invalid JSON: {msg}", file=name, line=line_no,
                             expected=f"one JSON object per line, e.g. {example}",
                             fix="fix the JSON on this line (an object must not span several lines)") from None
        if not isinstance(obj, dict):
            raise InputError(f"line is a JSON {json_type(obj)}, not an object", file=name, line=line_no,
                             expected=f"one JSON object per line, e.g. {example}",
                             fix="put each item on its own line as a {...} object")
        out.append((line_no, obj))
    if not out:
        raise InputError(f"{what} file is empty (no objects)", file=name,
                         expected=f"one JSON object per line, e.g. {example}",
                         fix="add items, or omit the path to use the shipped file")
    return out


def _require_text(obj: dict[str, Any], key: str, file: str, line_no: int, example: str) -> None:
    """`obj[key]` must be a string that is not only whitespace."""
    if key not in obj:
        raise InputError(f"missing required field {key!r}", file=file, line=line_no, field=key,
                         expected=f"a non-empty string, as in {example}", fix=f"add {key!r} to this line")
    value = obj[key]
    if not isinstance(value, str):
        raise InputError(f"field {key!r} is a JSON {json_type(value)}, expected a string", file=file, line=line_no,
                         field=key, expected="a non-empty string", fix="quote the value")
    if not value.strip():
        raise InputError(f"field {key!r} is empty", file=file, line=line_no, field=key,
                         expected="a string that is not only whitespace", fix="fill in the value")


def _no_duplicate_ids(ids: list[tuple[str, int]], file: str) -> None:
    first: dict[str, int] = {}
    for item_id, line_no in ids:
        if item_id in first:
            raise InputError(f"duplicate id {item_id!r} on lines {first[item_id]} and {line_no}", file=file,
                             line=line_no, field="id", expected="a unique id per line",
                             fix=f"rename one of the two (lines {first[item_id]} and {line_no})")
        first[item_id] = line_no
