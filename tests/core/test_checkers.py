"""Tests of stage1_core.checkers: every check type passes and fails where its rule says, spec
validation, and the shipped prompts' checks (valid, every type used, satisfiable)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stage1_core.checkers import CHECKERS, passes, validate_check
from stage1_core.eval_data import load_eval_prompts

# (spec, response, expected): at least one pass and one fail per type, plus the edges each rule names.
CASES: list[tuple[dict[str, Any], str, bool]] = [
    ({"type": "one_word"}, "Mars", True),
    ({"type": "one_word"}, "  Mercury.\n", True),
    ({"type": "one_word"}, "well-known!", True),
    ({"type": "one_word"}, "don't", True),
    ({"type": "one_word"}, "New York", False),
    ({"type": "one_word"}, "Mercury, obviously", False),
    ({"type": "one_word"}, '"Mercury"', False),
    ({"type": "one_word"}, "...", False),
    ({"type": "all_caps"}, "CAUTION: WET FLOOR!", True),
    ({"type": "all_caps"}, "CAUTION: Wet floor", False),
    ({"type": "all_caps"}, "123 !!", False),
    ({"type": "all_lowercase"}, "i like ripe mangoes, 2 a day.", True),
    ({"type": "all_lowercase"}, "I like ripe mangoes.", False),
    ({"type": "all_lowercase"}, "42", False),
    ({"type": "exactly_n_items", "n": 3}, "1. Carrot\n2. Potato\n3. Beet", True),
    ({"type": "exactly_n_items", "n": 3}, "Here are three:\n1) Carrot\n2) Potato\n3) Beet", True),
    ({"type": "exactly_n_items", "n": 3}, "- Carrot\n\n* Potato\n• Beet", True),
    ({"type": "exactly_n_items", "n": 3}, "Carrot\nPotato\n\nBeet\n", True),
    ({"type": "exactly_n_items", "n": 3}, "1. Carrot\n2. Potato", False),
    ({"type": "exactly_n_items", "n": 3}, "1. Carrot\n2. Potato\n3. Beet\n4. Onion", False),
    ({"type": "exactly_n_items", "n": 3}, "1. Carrot\n2.\n3.", False),
    ({"type": "exactly_n_items", "n": 3}, "Carrots, potatoes and beets.", False),
    ({"type": "exactly_n_items", "n": 1}, "Carrots, potatoes and beets.", True),
    ({"type": "exactly_n_items", "n": 2}, "-5 degrees\n1.5 kg of flour", True),  # no marker: two plain lines
    ({"type": "ends_with_question_mark"}, "Where did you grow up?", True),
    ({"type": "ends_with_question_mark"}, '"Where did you grow up?"', True),
    ({"type": "ends_with_question_mark"}, "Where did you grow up?!", False),
    ({"type": "ends_with_question_mark"}, "Why? Tell me.", False),
    ({"type": "no_letter", "letter": "s"}, "A hot cup of tea warm in my hand.", True),
    ({"type": "no_letter", "letter": "s"}, "Tea soothes.", False),
    ({"type": "no_letter", "letter": "e"}, "EAT", False),
    ({"type": "max_words", "n": 3}, "It measures heat.", True),
    ({"type": "max_words", "n": 3}, "It measures heat - roughly.", False),
    ({"type": "max_words", "n": 3}, "Heat - ok", True),  # a lone dash is not a word
    ({"type": "min_words", "n": 4}, "Librarians help people find books.", True),
    ({"type": "min_words", "n": 4}, "They lend books.", False),
    ({"type": "min_words", "n": 4}, "They lend books - :)", False),
    ({"type": "starts_with", "text": "Dear Sam"}, "dear sam, I can't make lunch.", True),
    ({"type": "starts_with", "text": "  Dear Sam "}, "Dear Sam, I can't make lunch.", True),
    ({"type": "starts_with", "text": "Dear Sam"}, "Hi Sam, dear friend.", False),
    ({"type": "ends_with", "text": "Enjoy your meal!"}, "Rinse the rice first. ENJOY YOUR MEAL!  ", True),
    ({"type": "ends_with", "text": "Enjoy your meal!"}, "Rinse the rice first. Enjoy your meal.", False),
    ({"type": "contains_word", "word": "umbrella"}, "I opened my Umbrella, then ran.", True),
    ({"type": "contains_word", "word": "cat"}, "The cat's bowl is empty.", True),
    ({"type": "contains_word", "word": "umbrella"}, "The umbrellas stayed home.", False),
    ({"type": "contains_word", "word": "cat"}, "A category of its own.", False),
    ({"type": "n_sentences", "n": 2}, "Firefighters put out fires. They also rescue people!", True),
    ({"type": "n_sentences", "n": 2}, 'He said "Stop." Then he left', True),
    ({"type": "n_sentences", "n": 2}, "It weighs 3.5 kg... Really?! Yes.", False),
    ({"type": "n_sentences", "n": 3}, "It weighs 3.5 kg... Really?! Yes.", True),
    ({"type": "n_sentences", "n": 1}, "Line one\nline two", True),
    ({"type": "n_sentences", "n": 2}, "Firefighters put out fires.", False),
    ({"type": "no_commas"}, "Red then amber then green.", True),
    ({"type": "no_commas"}, "Red, amber and green.", False),
    ({"type": "no_commas"}, "Red，amber", False),
    ({"type": "json_object"}, '{"country": "France", "capital": "Paris"}', True),
    ({"type": "json_object"}, '```json\n{"country": "France", "capital": "Paris"}\n```', True),
    ({"type": "json_object"}, '["France", "Paris"]', False),
    ({"type": "json_object"}, '{"country": "France"} is my answer', False),
    ({"type": "json_object"}, "{country: France}", False),
]


@pytest.mark.parametrize(("spec", "response", "expected"), CASES)
def test_checker_rule(spec: dict[str, Any], response: str, expected: bool) -> None:
    assert passes(spec, response) is expected


def test_cases_cover_every_type_both_ways() -> None:
    outcomes = {(spec["type"], expected) for spec, _, expected in CASES}
    for name in CHECKERS:
        assert (name, True) in outcomes and (name, False) in outcomes, name


def _valid_spec(name: str) -> dict[str, Any]:
    values = {"n": 1, "letter": "z", "text": "x", "word": "x"}
    return {"type": name, **{p: values[p] for p in CHECKERS[name].params}}


@pytest.mark.parametrize("name", sorted(CHECKERS))
@pytest.mark.parametrize("response", ["", "   ", "\n\t"])
def test_empty_response_fails_every_checker(name: str, response: str) -> None:
    assert passes(_valid_spec(name), response) is False


@pytest.mark.parametrize("name", sorted(CHECKERS))
def test_every_checker_documents_its_rule(name: str) -> None:
    doc = CHECKERS[name].fn.__doc__ or ""
    assert doc.startswith("Passes when"), name


@given(st.sampled_from(sorted(CHECKERS)), st.text(max_size=60), st.sampled_from(["", " ", "\n  ", "\t"]))
def test_surrounding_whitespace_never_matters(name: str, response: str, pad: str) -> None:
    spec = _valid_spec(name)
    assert passes(spec, pad + response + pad) == passes(spec, response.strip())


# --- spec validation ------------------------------------------------------------------------------


def test_validate_returns_a_copy() -> None:
    spec = {"type": "max_words", "n": 10}
    out = validate_check(spec)
    assert out == spec and out is not spec


@pytest.mark.parametrize(("spec", "fragment"), [
    ("one_word", "must be a JSON object"),
    (["one_word"], "must be a JSON object"),
    ({"n": 3}, "no 'type' key; known types: one_word, all_caps"),
    ({"type": "one_sentence"}, "unknown check type 'one_sentence'; known types: one_word, all_caps"),
    ({"type": 3}, "unknown check type 3"),
    ({"type": "one_word", "n": 1}, "does not take the parameter(s) n (its parameters: none)"),
    ({"type": "max_words", "n": 5, "m": 1}, "does not take the parameter(s) m (its parameters: n)"),
    ({"type": "max_words"}, "'max_words' needs the parameter 'n', an integer >= 1"),
    ({"type": "max_words", "n": "10"}, "parameter 'n' of check type 'max_words' must be an integer >= 1, got '10'"),
    ({"type": "max_words", "n": True}, "must be an integer >= 1, got True"),
    ({"type": "max_words", "n": 2.0}, "must be an integer >= 1, got 2.0"),
    ({"type": "exactly_n_items", "n": 0}, "must be an integer >= 1, got 0"),
    ({"type": "no_letter", "letter": "ab"}, "must be a single letter, got 'ab'"),
    ({"type": "no_letter", "letter": "1"}, "must be a single letter, got '1'"),
    ({"type": "starts_with", "text": "  "}, "must be a non-empty string"),
    ({"type": "contains_word", "word": "two words"}, "must be one word"),
])
def test_invalid_specs_are_named(spec: Any, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        validate_check(spec)
    assert fragment in str(info.value)
    with pytest.raises(ValueError):
        passes(spec, "anything")


# --- the shipped prompts --------------------------------------------------------------------------

# A plausible good answer per checked shipped prompt: each check can be met by a real answer.
GOOD_ANSWERS: dict[str, str] = {
    "eval-001": "Mars.",
    "eval-003": "CAUTION: WET FLOOR!",
    "eval-005": "1. Carrot\n2. Potato\n3. Beetroot",
    "eval-007": "What do you like most about living on this street?",
    "eval-009": "A warm cup of tea in the morning light.",
    "eval-011": "It measures temperature.",
    "eval-013": ("A librarian helps people find books and information, organizes the collection, answers "
                 "questions, runs reading programs for children and adults, and teaches visitors how to use "
                 "catalogues, databases and other research tools."),
    "eval-015": "Dear Sam, I am sorry but I can't make lunch tomorrow. Can we meet next week instead?",
    "eval-017": "Rinse the rice before cooking it to remove extra starch. Enjoy your meal!",
    "eval-019": "I grabbed my umbrella as the rain tapped on the windows.",
    "eval-021": "A firefighter puts out fires and rescues people from danger. They also teach fire safety.",
    "eval-023": "A traffic light shows red and amber and green.",
    "eval-025": '{"country": "Spain", "capital": "Madrid"}',
    "eval-027": "a ripe mango is sweet, juicy and golden.",
    "eval-029": "Mercury.",
    "eval-031": "- Water only when the soil is dry.\n- Give it bright light.\n- Use a pot with drainage.\n"
                "- Wipe dust off the leaves.",
    "eval-033": "Does the library open at nine?",
    "eval-035": "A daily walk strengthens your heart, lifts your mood and helps you sleep.",
    "eval-037": ("Take slow, deep breaths and remember that you have prepared well. Get a good night's sleep, "
                 "eat a light breakfast, and read each question carefully before you answer."),
    "eval-039": "A budget is a plan for how you will spend and save your money.",
    "eval-041": "People wear sunscreen because it protects their skin from the sun's harmful rays.",
    "eval-043": ("Place the egg in a pot and cover it with cold water. Bring the water to a boil, then simmer "
                 "for nine minutes. Cool the egg in cold water before peeling it."),
    "eval-045": "I wake up at seven and drink a glass of water. Then I shower and eat breakfast.",
    "eval-047": "Kenya\nNigeria\nEgypt\nGhana\nMorocco",
}


def test_shipped_checks_validate_and_use_every_type() -> None:
    prompts = load_eval_prompts(None)
    checked = [p for p in prompts if p.check is not None]
    assert len(prompts) == 48 and len(checked) == 24
    for p in checked:
        assert validate_check(p.check) == p.check
    assert {p.check["type"] for p in checked if p.check} == set(CHECKERS)


def test_shipped_checks_can_be_met_and_the_instruction_states_them() -> None:
    prompts = {p.id: p for p in load_eval_prompts(None)}
    assert set(GOOD_ANSWERS) == {pid for pid, p in prompts.items() if p.check is not None}
    for pid, answer in GOOD_ANSWERS.items():
        check = prompts[pid].check
        assert check is not None and passes(check, answer), pid
        for key in ("n", "text", "word", "letter"):
            if key in check and key != "n":
                assert str(check[key]).lower() in prompts[pid].instruction.lower(), pid


def test_shipped_checks_reject_a_plain_unconstrained_answer() -> None:
    # The same text fails most checks: they discriminate, they are not always true.
    plain = "Sure, here is my answer. It is a good one, I think"
    prompts = [p for p in load_eval_prompts(None) if p.check is not None]
    failed = [p.id for p in prompts if p.check and not passes(p.check, plain)]
    assert len(failed) >= 20
