"""Held-out evaluation data: instruction prompts (some with IFEval verifiable instructions) and reference pairs.

Two JSON Lines files, read by the one hardened reader (`stage1_core.infra.jsonl`: UTF-8, a leading BOM
accepted, blank lines skipped, a repeated key, an over-long line or invalid JSON is an error):

* prompts: ``{"id": "eval-001", "instruction": "...", "instruction_id_list": ["punctuation:no_comma"],
  "kwargs": [{}]}``; `instruction_id_list` (IFEval's instruction ids, `stage1_core.train.checkers`) and
  `kwargs` (one object per id, IFEval's keyword arguments; null values are dropped, so rows of the
  IFEval dataset load as they are) are optional: a prompt without them is judged but not checked;
* reference pairs: ``{"id": "ref-001", "instruction": "...", "response": "..."}``, a good answer
  per instruction, used to measure the perplexity of good responses.

`id` is a non-empty string, unique in its file; `instruction` and `response` are strings that are not
only whitespace. Other keys are ignored, except a near-miss of a known key ("instruction_ids") and the
retired single-check key `check`, which are errors. Every problem raises `InputError` naming the file,
the 1-based line and the field. The shipped files (`SHIPPED_PROMPTS`, `SHIPPED_REFERENCE`) were
written for Stage 1 and are disjoint from the seed tasks, the critic dev set and the config's
examples (tests/core/test_eval_data.py).

Usage::

    prompts = load_eval_prompts(None)       # the shipped held-out prompts, most with IFEval instructions
    pairs = load_reference(None)            # the shipped 32 reference pairs
    checkers.follows(prompts[0].instruction_ids, prompts[0].kwargs, response)
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stage1_core.train import checkers
from stage1_core.infra.errors import InputError
from stage1_core.infra.jsonl import JsonlKind, json_type, no_duplicate_ids, printable, read_jsonl, require_string

SHIPPED_PROMPTS = Path(__file__).resolve().parents[1] / "data" / "eval_prompts.jsonl"
SHIPPED_REFERENCE = Path(__file__).resolve().parents[1] / "data" / "eval_reference.jsonl"

PROMPT_FILE = JsonlKind(
    item="eval prompt",
    example=('{"id": "eval-001", "instruction": "Name a planet. Do not use any commas.", '
             '"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}'),
    missing_fix="check the path (omit --prompts and the config's prompts: to use the shipped file)",
    empty_fix="add prompts, or omit the path to use the shipped file")
REFERENCE_FILE = JsonlKind(
    item="reference pair", example='{"id": "ref-001", "instruction": "Name a planet.", "response": "Mars."}',
    missing_fix="check the path (omit the config's reference: to use the shipped file)",
    empty_fix="add pairs, or omit the path to use the shipped file")

_PROMPT_KEYS = ("id", "instruction", "instruction_id_list", "kwargs")
_REFERENCE_KEYS = ("id", "instruction", "response")


@dataclass(frozen=True)
class EvalPrompt:
    """One evaluation prompt.

    Args:
        id: unique, non-empty identifier within its file.
        instruction: the task given to the model.
        instruction_ids: IFEval instruction ids the response must follow (empty: not checked).
        kwargs: per id, its validated keyword arguments.
        line: 1-based line of the prompt in its file.
    """

    id: str
    instruction: str
    instruction_ids: tuple[str, ...] = ()
    kwargs: tuple[dict[str, Any], ...] = field(default_factory=tuple)
    line: int = 0

    @property
    def checked(self) -> bool:
        return bool(self.instruction_ids)


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
        InputError: any reader error (stage1_core.infra.jsonl), a missing, wrong-typed or blank
            id/instruction, a near-miss key or the retired `check` key, an invalid
            instruction_id_list or kwargs, a duplicate id, or no prompts at all.
    """
    p = SHIPPED_PROMPTS if path is None else Path(path)
    name = str(p)
    out: list[EvalPrompt] = []
    for line_no, obj in read_jsonl(p, PROMPT_FILE):
        _known_keys(obj, _PROMPT_KEYS, name, line_no)
        if "check" in obj:
            raise InputError("the single-check key 'check' was replaced by IFEval's instruction_id_list and kwargs",
                             file=name, line=line_no, field="check",
                             expected='"instruction_id_list": ["length_constraints:number_words"], "kwargs": '
                                      '[{"num_words": 10, "relation": "less than"}] (ids and arguments: docs/eval.md)',
                             fix="rewrite the check as IFEval instructions")
        pid = require_string(obj, "id", name, line_no, PROMPT_FILE)
        instruction = require_string(obj, "instruction", name, line_no, PROMPT_FILE)
        ids, kwargs = _instructions(obj, name, line_no)
        out.append(EvalPrompt(id=pid, instruction=instruction, instruction_ids=ids, kwargs=kwargs, line=line_no))
    no_duplicate_ids([(x.id, x.line) for x in out], name)
    return out


def load_reference(path: str | Path | None = None) -> list[ReferencePair]:
    """Read and validate a reference pairs file.

    Args:
        path: a JSON Lines file; None for the shipped pairs (`SHIPPED_REFERENCE`).
    Returns:
        The pairs in file order.
    Raises:
        InputError: any reader error, a missing, wrong-typed or blank id/instruction/response, a
            near-miss key, a duplicate id, or no pairs at all.
    """
    p = SHIPPED_REFERENCE if path is None else Path(path)
    name = str(p)
    out: list[ReferencePair] = []
    for line_no, obj in read_jsonl(p, REFERENCE_FILE):
        _known_keys(obj, _REFERENCE_KEYS, name, line_no)
        values = [require_string(obj, k, name, line_no, REFERENCE_FILE) for k in _REFERENCE_KEYS]
        out.append(ReferencePair(*values, line=line_no))
    no_duplicate_ids([(x.id, x.line) for x in out], name)
    return out


def _known_keys(obj: dict[str, Any], known: tuple[str, ...], file: str, line_no: int) -> None:
    """Unknown keys are ignored, but one that looks like a misspelt known key is an error (a typo
    in `instruction_id_list` would otherwise silently drop the prompt's checks)."""
    for key in obj:
        if key in known:
            continue
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
        if close:
            raise InputError(f"unknown key {printable(key)!r}; did you mean {close[0]!r}?", file=file, line=line_no,
                             field=printable(key), expected=f"the keys {', '.join(known)} (others are ignored)",
                             fix=f"rename it to {close[0]!r}")


def _instructions(obj: dict[str, Any], file: str, line_no: int) -> tuple[tuple[str, ...], tuple[dict[str, Any], ...]]:
    """The validated (instruction ids, kwargs) of one prompt line."""
    ids = obj.get("instruction_id_list")
    kwargs = obj.get("kwargs")
    if ids is None:
        if kwargs not in (None, []):
            raise InputError("'kwargs' without 'instruction_id_list'", file=file, line=line_no, field="kwargs",
                             expected="kwargs only beside instruction_id_list, one object per id",
                             fix="add instruction_id_list, or remove kwargs")
        return (), ()
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise InputError(f"'instruction_id_list' is a JSON {json_type(ids)}" if not isinstance(ids, list)
                         else "'instruction_id_list' holds a value that is not a string", file=file, line=line_no,
                         field="instruction_id_list", expected='a list of IFEval instruction ids, e.g. ["punctuation:no_comma"]',
                         fix="write the ids as a list of strings (docs/eval.md lists them)")
    if len(set(ids)) != len(ids):
        raise InputError("an instruction id appears twice in 'instruction_id_list'", file=file, line=line_no,
                         field="instruction_id_list", expected="each id once per prompt", fix="remove the repeat")
    if kwargs is None:
        kwargs = [{} for _ in ids]
    if not isinstance(kwargs, list) or len(kwargs) != len(ids):
        got = f"{len(kwargs)} entries" if isinstance(kwargs, list) else f"a JSON {json_type(kwargs)}"
        raise InputError(f"'kwargs' must have one object per instruction id ({len(ids)}), got {got}", file=file,
                         line=line_no, field="kwargs", expected="a list of objects, in the order of instruction_id_list",
                         fix="give every instruction its arguments object ({} when it takes none)")
    valid = []
    for k, (iid, kw) in enumerate(zip(ids, kwargs)):
        try:
            valid.append(checkers.validate(iid, kw))
        except ValueError as e:
            where = "instruction_id_list" if iid not in checkers.INSTRUCTIONS else f"kwargs[{k}]"
            raise InputError(f"invalid instruction {k + 1}: {e}", file=file, line=line_no, field=where,
                             expected="an IFEval instruction id with its arguments (docs/eval.md, stage1_core/train/checkers.py)",
                             fix="correct the id or its arguments") from None
    return tuple(ids), tuple(valid)
