"""Verifiable instructions, IFEval-compatible: does a response obey each stated constraint?

The 25 instruction types of IFEval (Zhou et al. 2023, google-research/instruction_following_eval,
Apache-2.0) with their published `check_following` rules, ids and keyword arguments, so an IFEval
`instruction_id_list` + `kwargs` pair checks here exactly as there. Each check function's docstring
states the rule. Strict and loose follow IFEval's `evaluation_lib`: strict checks the response as
is; loose passes when any of 8 variants passes (the response, without its first line, without its
last line, without both, and each of those with every `*` removed). An empty response fails both.

Written here rather than imported: `lm_eval`'s ifeval task and `if-verifiable` both load NLTK's punkt
sentence model at run time (a download; this product runs offline), and `if-verifiable` also pulls
`datasets`. Two rules therefore use IFEval's own published regex instead of punkt, documented where
they apply: `length_constraints:number_sentences` (IFEval's `split_into_sentences`) and
`change_case:capital_word_frequency` (a Treebank-like word split). Language identification is
`langdetect` (as in IFEval), seeded for determinism.

Usage::

    kw = validate("length_constraints:number_words", {"num_words": 5, "relation": "less than"})
    check("length_constraints:number_words", kw, "Paris is the capital.")   # True
    follows(["punctuation:no_comma"], [{}], "Yes, it is.")                 # {"strict": [False], "loose": [False]}
"""

from __future__ import annotations

import collections
import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

RELATIONS = ("less than", "at least")
"""IFEval's comparison relations: `less than` is strict (<), `at least` inclusive (>=)."""

CONSTRAINED_RESPONSES = ("My answer is yes.", "My answer is no.", "My answer is maybe.")

LANGUAGE_CODES = ("en", "es", "pt", "ar", "hi", "fr", "ru", "de", "ja", "it", "bn", "uk", "th", "ur", "ta", "te", "bg",
                  "ko", "pl", "he", "fa", "vi", "ne", "sw", "kn", "mr", "gu", "pa", "ml", "fi")
"""ISO 639-1 codes IFEval's response_language accepts (its LANGUAGE_CODES)."""


def _compare(value: int, relation: str, n: int) -> bool:
    return value < n if relation == "less than" else value >= n


def _detect_language(text: str) -> str | None:
    """langdetect's language of `text` (seeded: the same text always gives the same answer); None when
    it cannot tell (no letters), which IFEval counts as followed."""
    from langdetect import DetectorFactory, LangDetectException, detect

    DetectorFactory.seed = 0
    try:
        return str(detect(text))
    except LangDetectException:
        return None


# IFEval's instructions_util.split_into_sentences, verbatim in behaviour.
_ALPHABETS = "([A-Za-z])"
_PREFIXES = "(Mr|St|Mrs|Ms|Dr)[.]"
_SUFFIXES = "(Inc|Ltd|Jr|Sr|Co)"
_STARTERS = r"(Mr|Mrs|Ms|Dr|Prof|Capt|Cpt|Lt|He\s|She\s|It\s|They\s|Their\s|Our\s|We\s|But\s|However\s|That\s|This\s|Wherever)"
_ACRONYMS = "([A-Z][.][A-Z][.](?:[A-Z][.])?)"
_WEBSITES = "[.](com|net|org|io|gov|edu|me)"
_DIGITS = "([0-9])"
_MULTIPLE_DOTS = r"\.{2,}"


def split_into_sentences(text: str) -> list[str]:
    """IFEval's regex sentence splitter: `.`, `?`, `!` end a sentence except in titles (Mr.),
    initials, acronyms, decimals, web domains and `...` runs; empty pieces are dropped."""
    text = " " + text + "  "
    text = text.replace("\n", " ")
    text = re.sub(_PREFIXES, "\\1<prd>", text)
    text = re.sub(_WEBSITES, "<prd>\\1", text)
    text = re.sub(_DIGITS + "[.]" + _DIGITS, "\\1<prd>\\2", text)
    text = re.sub(_MULTIPLE_DOTS, lambda m: "<prd>" * len(m.group(0)) + "<stop>", text)
    if "Ph.D" in text:
        text = text.replace("Ph.D.", "Ph<prd>D<prd>")
    text = re.sub(r"\s" + _ALPHABETS + "[.] ", " \\1<prd> ", text)
    text = re.sub(_ACRONYMS + " " + _STARTERS, "\\1<stop> \\2", text)
    text = re.sub(_ALPHABETS + "[.]" + _ALPHABETS + "[.]" + _ALPHABETS + "[.]", "\\1<prd>\\2<prd>\\3<prd>", text)
    text = re.sub(_ALPHABETS + "[.]" + _ALPHABETS + "[.]", "\\1<prd>\\2<prd>", text)
    text = re.sub(" " + _SUFFIXES + "[.] " + _STARTERS, " \\1<stop> \\2", text)
    text = re.sub(" " + _SUFFIXES + "[.]", " \\1<prd>", text)
    text = re.sub(" " + _ALPHABETS + "[.]", " \\1<prd>", text)
    text = text.replace(".”", "”.").replace('."', '".').replace('!"', '"!').replace('?"', '"?')
    text = text.replace(".", ".<stop>").replace("?", "?<stop>").replace("!", "!<stop>").replace("<prd>", ".")
    sentences = [s.strip() for s in text.split("<stop>")]
    if sentences and not sentences[-1]:
        sentences = sentences[:-1]
    return sentences


def count_words(text: str) -> int:
    """IFEval's count_words: runs of word characters (`\\w+`, NLTK's RegexpTokenizer)."""
    return len(re.findall(r"\w+", text))


_TREEBANK_WORD = re.compile(r"\w+(?:[-'’]\w+)*|[^\w\s]")


# --------------------------------------------------------------------------- the 25 rules

def keywords_existence(r: str, keywords: list[str]) -> bool:
    """Every keyword occurs, case-insensitively (IFEval `re.search(keyword)`: a substring, so "cat"
    is found in "category")."""
    return all(re.search(k, r, flags=re.IGNORECASE) for k in keywords)


def keywords_frequency(r: str, keyword: str, frequency: int, relation: str) -> bool:
    """The keyword's case-insensitive occurrences (substrings) compared with `frequency`: `less than`
    is <, `at least` is >=."""
    return _compare(len(re.findall(keyword.strip(), r, flags=re.IGNORECASE)), relation, frequency)


def keywords_forbidden_words(r: str, forbidden_words: list[str]) -> bool:
    """No forbidden word occurs as a whole word (`\\b...\\b`), case-insensitively."""
    return not any(re.search(r"\b" + w + r"\b", r, flags=re.IGNORECASE) for w in forbidden_words)


def keywords_letter_frequency(r: str, letter: str, let_frequency: int, let_relation: str) -> bool:
    """The letter's count (case-insensitive) compared with `let_frequency`."""
    return _compare(collections.Counter(r.lower())[letter.strip().lower()], let_relation, let_frequency)


def language_response_language(r: str, language: str) -> bool:
    """langdetect names `language` (an ISO 639-1 code); an undetectable text passes, as in IFEval."""
    found = _detect_language(r)
    return found is None or found == language


def length_number_sentences(r: str, num_sentences: int, relation: str) -> bool:
    """Sentences (IFEval's `split_into_sentences`; IFEval itself counts with NLTK punkt) compared with
    `num_sentences`."""
    return _compare(len(split_into_sentences(r)), relation, num_sentences)


def length_number_paragraphs(r: str, num_paragraphs: int) -> bool:
    """Exactly `num_paragraphs` paragraphs separated by the markdown divider `***`; an empty piece is
    allowed only at the start or end."""
    parts = re.split(r"\s?\*\*\*\s?", r)
    n = len(parts)
    for i, p in enumerate(parts):
        if not p.strip():
            if i in (0, len(parts) - 1):
                n -= 1
            else:
                return False
    return n == num_paragraphs


def length_number_words(r: str, num_words: int, relation: str) -> bool:
    """Words (`\\w+` runs: "don't" is two) compared with `num_words`."""
    return _compare(count_words(r), relation, num_words)


def length_nth_paragraph_first_word(r: str, num_paragraphs: int, nth_paragraph: int, first_word: str) -> bool:
    """Exactly `num_paragraphs` paragraphs separated by a blank line (`\\n\\n`), and the
    `nth_paragraph`-th (1-based) starts with `first_word` (case-insensitive; leading quotes and
    anything from the first punctuation mark on are ignored)."""
    parts = re.split(r"\n\n", r)
    n = sum(1 for p in parts if p.strip())
    if nth_paragraph > n:
        return False
    para = parts[nth_paragraph - 1].strip()
    if not para:
        return False
    word = para.split()[0].strip().lstrip("'").lstrip('"')
    first = ""
    for ch in word:
        if ch in {".", ",", "?", "!", "'", '"'}:
            break
        first += ch.lower()
    return n == num_paragraphs and first == first_word.lower()


def content_number_placeholders(r: str, num_placeholders: int) -> bool:
    """At least `num_placeholders` square-bracket placeholders such as [address]."""
    return len(re.findall(r"\[.*?\]", r)) >= num_placeholders


def content_postscript(r: str, postscript_marker: str) -> bool:
    """A line (case-insensitive) holds the marker: "P.S." matches `p. s.`-like spellings, "P.P.S"
    likewise, any other marker literally."""
    marker = postscript_marker.strip()
    if marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + marker.lower() + r".*$"
    return bool(re.findall(pattern, r.lower(), flags=re.MULTILINE))


def format_number_bullet_lists(r: str, num_bullets: int) -> bool:
    """Exactly `num_bullets` markdown bullet lines (`* item` or `- item`; numbered lines do not count)."""
    return len(re.findall(r"^\s*\*[^\*].*$", r, flags=re.MULTILINE)) + \
        len(re.findall(r"^\s*-.*$", r, flags=re.MULTILINE)) == num_bullets


def format_constrained_response(r: str) -> bool:
    """Contains one of "My answer is yes.", "My answer is no.", "My answer is maybe." (case-sensitive)."""
    return any(c in r.strip() for c in CONSTRAINED_RESPONSES)


def format_number_highlighted_sections(r: str, num_highlights: int) -> bool:
    """At least `num_highlights` non-empty markdown highlights (`*text*`; a `**text**` counts in both
    IFEval patterns)."""
    n = sum(1 for h in re.findall(r"\*[^\n\*]*\*", r) if h.strip("*").strip())
    n += sum(1 for h in re.findall(r"\*\*[^\n\*]*\*\*", r) if h.removeprefix("**").removesuffix("**").strip())
    return n >= num_highlights


def format_multiple_sections(r: str, section_spliter: str, num_sections: int) -> bool:
    """At least `num_sections` sections headed `{section_spliter} N` (e.g. "SECTION 1")."""
    return len(re.split(r"\s?" + section_spliter.strip() + r"\s?\d+\s?", r)) - 1 >= num_sections


def format_json_format(r: str) -> bool:
    """The whole response parses as JSON (any value), after stripping a ```json fence."""
    body = (r.strip().removeprefix("```json").removeprefix("```Json").removeprefix("```JSON").removeprefix("```")
            .removesuffix("```").strip())
    try:
        json.loads(body)
    except (ValueError, RecursionError):
        return False
    return True


def format_title(r: str) -> bool:
    """Holds a non-empty title in double angular brackets on one line, like <<poem of joy>>."""
    return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", r))


def combination_two_responses(r: str) -> bool:
    """Exactly two different non-empty responses separated by `******` (an empty piece only at the
    start or end)."""
    valid = []
    parts = r.split("******")
    for i, p in enumerate(parts):
        if not p.strip():
            if i not in (0, len(parts) - 1):
                return False
        else:
            valid.append(p)
    return len(valid) == 2 and valid[0].strip() != valid[1].strip()


def combination_repeat_prompt(r: str, prompt_to_repeat: str) -> bool:
    """Starts with `prompt_to_repeat`, case-insensitively."""
    return r.strip().lower().startswith(prompt_to_repeat.strip().lower())


def startend_end_checker(r: str, end_phrase: str) -> bool:
    """Ends with `end_phrase`, case-insensitively, ignoring surrounding whitespace and double quotes;
    nothing may follow it (not even a full stop the phrase lacks)."""
    return r.strip().strip('"').lower().endswith(end_phrase.strip().lower())


def case_capital_word_frequency(r: str, capital_frequency: int, capital_relation: str) -> bool:
    """All-capital words (Treebank-like split: hyphenated words are one word; IFEval uses NLTK's
    word_tokenize) compared with `capital_frequency`."""
    return _compare(sum(1 for w in _TREEBANK_WORD.findall(r) if w.isupper()), capital_relation, capital_frequency)


def case_english_capital(r: str) -> bool:
    """No lower-case letter (`str.isupper`) and langdetect says English (undetectable: passes)."""
    return r.isupper() and _detect_language(r) in (None, "en")


def case_english_lowercase(r: str) -> bool:
    """No upper-case letter (`str.islower`) and langdetect says English (undetectable: passes)."""
    return r.islower() and _detect_language(r) in (None, "en")


def punctuation_no_comma(r: str) -> bool:
    """No ASCII comma `,`."""
    return "," not in r


def startend_quotation(r: str) -> bool:
    """The whole response is wrapped in double quotation marks `"..."`."""
    v = r.strip()
    return len(v) > 1 and v[0] == '"' and v[-1] == '"'


# --------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class Param:
    """One keyword argument: `kind` is int, str or list (of non-empty strings); `valid` further
    restricts it; `expected` describes a valid value for errors."""

    kind: type
    expected: str
    valid: Callable[[Any], bool] = lambda v: True


@dataclass(frozen=True)
class Instruction:
    """An IFEval instruction type: its keyword arguments (in call order), its rule, and whether a
    response to it needs blank lines (so generation must not stop at the first one)."""

    params: dict[str, Param]
    fn: Callable[..., bool]
    multiline: bool = False


def _regex(v: str) -> bool:
    try:
        re.compile(v)
    except re.error:
        return False
    return True


_COUNT = Param(int, "an integer >= 1", lambda v: v >= 1)
_RELATION = Param(str, 'one of "less than", "at least"', lambda v: v in RELATIONS)
_TEXT = Param(str, "a non-empty string", lambda v: bool(v.strip()))
_PATTERN = Param(str, "a non-empty string that is a valid regular expression (IFEval searches it as one)",
                 lambda v: bool(v.strip()) and _regex(v))
_WORDS = Param(list, "a non-empty list of non-empty strings, each a valid regular expression",
               lambda v: bool(v) and all(isinstance(x, str) and x.strip() and _regex(x) for x in v))

INSTRUCTIONS: dict[str, Instruction] = {
    "keywords:existence": Instruction({"keywords": _WORDS}, keywords_existence),
    "keywords:frequency": Instruction({"keyword": _PATTERN, "frequency": _COUNT, "relation": _RELATION},
                                      keywords_frequency),
    "keywords:forbidden_words": Instruction({"forbidden_words": _WORDS}, keywords_forbidden_words),
    "keywords:letter_frequency": Instruction(
        {"letter": Param(str, "a single letter", lambda v: len(v.strip()) == 1 and v.strip().isalpha()),
         "let_frequency": _COUNT, "let_relation": _RELATION}, keywords_letter_frequency),
    "language:response_language": Instruction(
        {"language": Param(str, f"an ISO 639-1 code among {', '.join(LANGUAGE_CODES)}", lambda v: v in LANGUAGE_CODES)},
        language_response_language),
    "length_constraints:number_sentences": Instruction({"num_sentences": _COUNT, "relation": _RELATION},
                                                       length_number_sentences),
    "length_constraints:number_paragraphs": Instruction({"num_paragraphs": _COUNT}, length_number_paragraphs,
                                                        multiline=True),
    "length_constraints:number_words": Instruction({"num_words": _COUNT, "relation": _RELATION}, length_number_words),
    "length_constraints:nth_paragraph_first_word": Instruction(
        {"num_paragraphs": _COUNT, "nth_paragraph": _COUNT, "first_word": _TEXT}, length_nth_paragraph_first_word,
        multiline=True),
    "detectable_content:number_placeholders": Instruction({"num_placeholders": _COUNT}, content_number_placeholders),
    "detectable_content:postscript": Instruction({"postscript_marker": _PATTERN}, content_postscript, multiline=True),
    "detectable_format:number_bullet_lists": Instruction({"num_bullets": _COUNT}, format_number_bullet_lists),
    "detectable_format:constrained_response": Instruction({}, format_constrained_response),
    "detectable_format:number_highlighted_sections": Instruction({"num_highlights": _COUNT},
                                                                 format_number_highlighted_sections),
    "detectable_format:multiple_sections": Instruction({"section_spliter": _PATTERN, "num_sections": _COUNT},
                                                       format_multiple_sections, multiline=True),
    "detectable_format:json_format": Instruction({}, format_json_format, multiline=True),
    "detectable_format:title": Instruction({}, format_title, multiline=True),
    "combination:two_responses": Instruction({}, combination_two_responses, multiline=True),
    "combination:repeat_prompt": Instruction({"prompt_to_repeat": _TEXT}, combination_repeat_prompt, multiline=True),
    "startend:end_checker": Instruction({"end_phrase": _TEXT}, startend_end_checker),
    "change_case:capital_word_frequency": Instruction({"capital_frequency": _COUNT, "capital_relation": _RELATION},
                                                      case_capital_word_frequency),
    "change_case:english_capital": Instruction({}, case_english_capital),
    "change_case:english_lowercase": Instruction({}, case_english_lowercase),
    "punctuation:no_comma": Instruction({}, punctuation_no_comma),
    "startend:quotation": Instruction({}, startend_quotation),
}
"""IFEval instruction id -> Instruction (the 25 of IFEval's INSTRUCTION_DICT)."""


def validate(instruction_id: Any, kwargs: Any) -> dict[str, Any]:
    """Check an instruction id and its keyword arguments.

    Args:
        instruction_id: e.g. "punctuation:no_comma".
        kwargs: its keyword arguments, e.g. {} or {"num_words": 50, "relation": "less than"}; keys
            whose value is null are dropped first (the IFEval dataset lists every key, mostly null).
    Returns:
        The keyword arguments without null values.
    Raises:
        ValueError: one sentence naming the problem (unknown id, listing the known ones; a missing,
            unknown or ill-typed argument, with what is expected).
    """
    if not isinstance(instruction_id, str) or instruction_id not in INSTRUCTIONS:
        raise ValueError(f"unknown instruction id {instruction_id!r}; IFEval's ids: {', '.join(INSTRUCTIONS)}")
    if not isinstance(kwargs, dict):
        raise ValueError(f"the arguments of {instruction_id!r} must be a JSON object, got {type(kwargs).__name__}")
    params = INSTRUCTIONS[instruction_id].params
    kw = {k: v for k, v in kwargs.items() if v is not None}
    extra = sorted(str(k) for k in kw if k not in params)
    if extra:
        raise ValueError(f"{instruction_id!r} does not take the argument(s) {', '.join(extra)} "
                         f"(its arguments: {', '.join(params) or 'none'})")
    for name, p in params.items():
        if name not in kw:
            raise ValueError(f"{instruction_id!r} needs the argument {name!r}, {p.expected}")
        v = kw[name]
        if isinstance(v, bool) or not isinstance(v, p.kind) or not p.valid(v):
            raise ValueError(f"argument {name!r} of {instruction_id!r} must be {p.expected}, got {v!r}")
    return kw


def check(instruction_id: str, kwargs: dict[str, Any], response: str) -> bool:
    """IFEval's strict rule: a non-empty (after stripping) response that passes the instruction's rule.

    Raises:
        ValueError: an invalid id or arguments (see `validate`).
    """
    kw = validate(instruction_id, kwargs)
    if not response.strip():
        return False
    ins = INSTRUCTIONS[instruction_id]
    return bool(ins.fn(response, *(kw[n] for n in ins.params)))


def loose_variants(response: str) -> list[str]:
    """IFEval's 8 loose variants: the response, without the first line, without the last, without
    both, then the same four with every `*` removed."""
    lines = response.split("\n")
    cut = ["\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return [response, response.replace("*", ""), *cut, *(c.replace("*", "") for c in cut)]


def follows(instruction_ids: Sequence[str], kwargs: Sequence[dict[str, Any]], response: str) -> dict[str, list[bool]]:
    """Per instruction, strict and loose results.

    Returns:
        {"strict": [bool per instruction], "loose": [bool per instruction]}.
    """
    variants = loose_variants(response)
    strict = [check(i, k, response) for i, k in zip(instruction_ids, kwargs)]
    loose = [any(check(i, k, v) for v in variants) for i, k in zip(instruction_ids, kwargs)]
    return {"strict": strict, "loose": loose}


def needs_blank_lines(instruction_ids: Sequence[str]) -> bool:
    """Whether a response to these instructions needs blank lines (paragraphs, sections, a title, a
    postscript, JSON, two responses, a repeated prompt), so generation must not stop at the first."""
    return any(INSTRUCTIONS[i].multiline for i in instruction_ids)
