"""Verifiable-instruction checkers (IFEval style): does a response obey a stated constraint?

A check is a JSON object ``{"type": NAME, ...params}``, e.g. ``{"type": "max_words", "n": 10}``;
`CHECKERS` maps each type to its parameter schema and its function, whose docstring states exactly
what passes. Every check sees the response stripped of surrounding whitespace, and an empty
response fails every check. Checks are pure code: no model, no network.

Usage::

    spec = validate_check({"type": "exactly_n_items", "n": 3})   # ValueError on a bad spec
    passes(spec, "1. Carrot\\n2. Potato\\n3. Beet")               # True

Words, for `max_words`, `min_words`: whitespace-separated tokens holding at least one letter or
digit (a lone dash or emoji is not a word). Sentences, for `n_sentences`: see `n_sentences`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable

_LIST_MARKER_RE = re.compile(r"^(?:\d+[.)]|[-*•])(?:\s+(.*))?$")
"""A list line: `1.`, `1)`, `-`, `*` or `•`, then whitespace and the item (or nothing: an empty item)."""
_ONE_WORD_RE = re.compile(r"^[^\W_]+(?:['’-][^\W_]+)*[.!?]*$")
_SENTENCE_END_RE = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"'”’)\]])\s+")
_CLOSERS = "\"'”’»)]"
_FENCE_RE = re.compile(r"^```[A-Za-z]*\s*\n?(.*?)\n?\s*```$", re.DOTALL)


def _has_alnum(text: str) -> bool:
    return any(c.isalnum() for c in text)


def _words(text: str) -> list[str]:
    """Whitespace-separated tokens that hold at least one letter or digit."""
    return [t for t in text.split() if _has_alnum(t)]


def one_word(response: str) -> bool:
    """Passes when the response is exactly one word: letters or digits, with optional inner
    apostrophes or hyphens ("don't", "well-known"), then optionally `.`, `!` or `?` at the end.
    "Mercury." passes; "New York", "Mercury, obviously" and '"Mercury"' fail."""
    return bool(_ONE_WORD_RE.match(response))


def all_caps(response: str) -> bool:
    """Passes when the response has at least one cased letter and no lower-case letter
    (`str.isupper`): "WET FLOOR: CAUTION!" passes, "Wet floor" and "123" fail."""
    return response.isupper()


def all_lowercase(response: str) -> bool:
    """Passes when the response has at least one cased letter and no upper-case letter
    (`str.islower`): "i like apples." passes, "I like apples." and "123" fail."""
    return response.islower()


def exactly_n_items(response: str, n: int) -> bool:
    """Passes when the response is a list of exactly `n` non-empty items.

    The response is split into lines and blank lines are dropped. A list line starts with `1.`,
    `1)` (any number), `-`, `*` or `•` followed by whitespace. If at least one line is a list line,
    the items are the list lines only (an intro such as "Here are three:" is not counted) and every
    one must have text after its marker ("2." alone fails). If no line is a list line, the items are
    the non-blank lines ("one per line"). Numbering is not checked; items on one line
    ("carrots, beets and potatoes") are one item.
    """
    lines = [line.strip() for line in response.splitlines() if line.strip()]
    marked = [m for m in (_LIST_MARKER_RE.match(line) for line in lines) if m]
    if not marked:
        return len(lines) == n
    return len(marked) == n and all(m.group(1) and m.group(1).strip() for m in marked)


def ends_with_question_mark(response: str) -> bool:
    """Passes when the last character is `?`, ignoring closing quotes and brackets after it
    (`"Why?"` passes); "Why?!" and "Why? Tell me." fail."""
    return response.rstrip(_CLOSERS).endswith("?")


def no_letter(response: str, letter: str) -> bool:
    """Passes when `letter` does not occur in the response, in either case ("e" also forbids "E")."""
    return letter.casefold() not in response.casefold()


def max_words(response: str, n: int) -> bool:
    """Passes when the response has at least one and at most `n` words (see the module docstring)."""
    return 1 <= len(_words(response)) <= n


def min_words(response: str, n: int) -> bool:
    """Passes when the response has at least `n` words (see the module docstring)."""
    return len(_words(response)) >= n


def starts_with(response: str, text: str) -> bool:
    """Passes when the response starts with `text` (the parameter, stripped), case-insensitively.
    A plain prefix test: "A budget" also matches "A budgetary plan"."""
    return response.casefold().startswith(text.strip().casefold())


def ends_with(response: str, text: str) -> bool:
    """Passes when the response ends with `text` (the parameter, stripped), case-insensitively;
    punctuation counts: for "Enjoy your meal!" the response "... enjoy your meal." fails."""
    return response.casefold().endswith(text.strip().casefold())


def contains_word(response: str, word: str) -> bool:
    """Passes when `word` occurs as a whole word, case-insensitively: not inside a longer run of
    letters and digits ("cat" is found in "The cat's bowl" and "CAT!", not in "category")."""
    pattern = rf"(?<![^\W_]){re.escape(word)}(?![^\W_])"
    return re.search(pattern, response, re.IGNORECASE) is not None


def n_sentences(response: str, n: int) -> bool:
    """Passes when the response has exactly `n` sentences.

    A sentence ends at `.`, `!` or `?` (a run such as `?!` or `...` is one end), optionally followed
    by closing quotes or brackets, and then whitespace; text after the last end counts as one more
    sentence. Pieces without a letter or digit do not count. Line breaks alone do not end a
    sentence, and abbreviations are not special ("Dr. Smith came." is two sentences).
    """
    pieces = _SENTENCE_END_RE.split(response)
    return sum(1 for p in pieces if _has_alnum(p)) == n


def no_commas(response: str) -> bool:
    """Passes when the response has no comma: neither `,` nor the full-width `，` nor `、`."""
    return not any(c in response for c in ",，、")


def json_object(response: str) -> bool:
    """Passes when the response parses as one JSON object (`{...}`, per `json.loads`), optionally
    inside a single Markdown code fence (```` ```json ... ``` ````); an array, a string or trailing
    text fails."""
    fenced = _FENCE_RE.match(response)
    body = fenced.group(1) if fenced else response
    try:
        return isinstance(json.loads(body), dict)
    except (ValueError, RecursionError):
        return False


@dataclass(frozen=True)
class Param:
    """One parameter of a check type.

    Args:
        kind: int or str (bool is never accepted as an int).
        expected: what a valid value looks like, for error messages.
        valid: extra condition on a value of the right kind.
    """

    kind: type
    expected: str
    valid: Callable[[Any], bool]


@dataclass(frozen=True)
class Checker:
    """A check type: its parameters (JSON key -> Param) and its function.

    `fn(response, *values)` gets the stripped, non-empty response and the parameter values in the
    order of `params`.
    """

    params: dict[str, Param]
    fn: Callable[..., bool]


_COUNT = Param(int, "an integer >= 1", lambda v: v >= 1)
_TEXT = Param(str, "a non-empty string", lambda v: bool(v.strip()))
_WORD = Param(str, "one word (letters or digits, no spaces)", lambda v: bool(v) and not any(c.isspace() for c in v)
              and _has_alnum(v))
_LETTER = Param(str, "a single letter", lambda v: len(v) == 1 and v.isalpha())

CHECKERS: dict[str, Checker] = {
    "one_word": Checker({}, one_word),
    "all_caps": Checker({}, all_caps),
    "all_lowercase": Checker({}, all_lowercase),
    "exactly_n_items": Checker({"n": _COUNT}, exactly_n_items),
    "ends_with_question_mark": Checker({}, ends_with_question_mark),
    "no_letter": Checker({"letter": _LETTER}, no_letter),
    "max_words": Checker({"n": _COUNT}, max_words),
    "min_words": Checker({"n": _COUNT}, min_words),
    "starts_with": Checker({"text": _TEXT}, starts_with),
    "ends_with": Checker({"text": _TEXT}, ends_with),
    "contains_word": Checker({"word": _WORD}, contains_word),
    "n_sentences": Checker({"n": _COUNT}, n_sentences),
    "no_commas": Checker({}, no_commas),
    "json_object": Checker({}, json_object),
}
"""Check type -> Checker. Each function's docstring is the rule."""


def validate_check(spec: Any) -> dict[str, Any]:
    """Check that `spec` is a valid check object.

    Args:
        spec: a parsed JSON value, e.g. ``{"type": "max_words", "n": 10}``.
    Returns:
        A copy of `spec` (a new dict with the same keys and values).
    Raises:
        ValueError: one sentence naming the problem: not an object, no or non-string `type`, an
            unknown type (listing the known ones), a missing, unknown or ill-typed parameter.
    """
    if not isinstance(spec, dict):
        raise ValueError(f"a check must be a JSON object like {{\"type\": \"max_words\", \"n\": 10}}, "
                         f"got a {type(spec).__name__}")
    if "type" not in spec:
        raise ValueError(f"the check has no 'type' key; known types: {', '.join(CHECKERS)}")
    kind = spec["type"]
    if not isinstance(kind, str) or kind not in CHECKERS:
        raise ValueError(f"unknown check type {kind!r}; known types: {', '.join(CHECKERS)}")
    params = CHECKERS[kind].params
    extra = sorted(str(k) for k in spec if k != "type" and k not in params)
    if extra:
        allowed = ", ".join(params) if params else "none"
        raise ValueError(f"check type {kind!r} does not take the parameter(s) {', '.join(extra)} "
                         f"(its parameters: {allowed})")
    for name, param in params.items():
        if name not in spec:
            raise ValueError(f"check type {kind!r} needs the parameter {name!r}, {param.expected}")
        value = spec[name]
        if isinstance(value, bool) or not isinstance(value, param.kind) or not param.valid(value):
            raise ValueError(f"parameter {name!r} of check type {kind!r} must be {param.expected}, got {value!r}")
    return dict(spec)


def passes(spec: dict[str, Any], response: str) -> bool:
    """Whether `response` satisfies the check `spec`.

    Args:
        spec: a check object (validated here with `validate_check`).
        response: the model's response; surrounding whitespace is stripped first.
    Returns:
        True when the check passes; False for an empty (or whitespace-only) response.
    Raises:
        ValueError: `spec` is not a valid check.
    """
    spec = validate_check(spec)
    text = response.strip()
    if not text:
        return False
    checker = CHECKERS[spec["type"]]
    return checker.fn(text, *(spec[name] for name in checker.params))
