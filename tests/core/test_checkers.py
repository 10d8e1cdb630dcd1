"""Tests of stage1_core.train.checkers: every IFEval instruction type passes and fails where IFEval's
published rule does (each type has at least one passing and one failing response, checked by a test
below); strict vs loose; argument validation; the sentence splitter and word count as IFEval's."""

from __future__ import annotations

import pytest

from stage1_core.train import checkers
from stage1_core.train.checkers import INSTRUCTIONS, check, follows, loose_variants, split_into_sentences, validate

LT, AL = "less than", "at least"

# (instruction id, kwargs, response, expected strict result)
CASES: list[tuple[str, dict, str, bool]] = [
    ("keywords:existence", {"keywords": ["umbrella", "rain"]}, "Take an Umbrella, the RAIN is coming.", True),
    ("keywords:existence", {"keywords": ["umbrella", "rain"]}, "Take an umbrella.", False),
    ("keywords:existence", {"keywords": ["cat"]}, "A category error.", True),  # IFEval: a substring search
    ("keywords:frequency", {"keyword": "rest", "frequency": 2, "relation": AL}, "Rest well. REST more.", True),
    ("keywords:frequency", {"keyword": "rest", "frequency": 2, "relation": AL}, "Rest well.", False),
    ("keywords:frequency", {"keyword": "bread", "frequency": 2, "relation": LT}, "Good bread.", True),
    ("keywords:frequency", {"keyword": "bread", "frequency": 2, "relation": LT}, "Bread, bread!", False),
    ("keywords:forbidden_words", {"forbidden_words": ["sand", "hot"]}, "Cold dunes under stars; sandy.", True),
    ("keywords:forbidden_words", {"forbidden_words": ["sand", "hot"]}, "It is HOT at noon.", False),
    ("keywords:letter_frequency", {"letter": "s", "let_frequency": 2, "let_relation": LT}, "A warm cup of tea.", True),
    ("keywords:letter_frequency", {"letter": "s", "let_frequency": 2, "let_relation": LT}, "Sweet tea is best.", False),
    ("keywords:letter_frequency", {"letter": "E", "let_frequency": 3, "let_relation": AL}, "Eee!", True),
    ("language:response_language", {"language": "fr"},
     "Bonjour, je suis très content de vous voir aujourd'hui dans notre petite maison.", True),
    ("language:response_language", {"language": "fr"}, "Good morning, I am very happy to see you in our house today.",
     False),
    ("language:response_language", {"language": "fr"}, "12345 !!!", True),  # undetectable: IFEval counts it followed
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": LT}, "One. Two!", True),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": LT}, "One. Two! Three?", False),
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": AL}, "Dr. Smith came. He sat.", True),
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": AL}, "Dr. Smith came home.", False),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "Dogs are loyal.\n***\nThey guard homes.", True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "Dogs are loyal.\n\nThey guard homes.", False),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "A\n***\n***\nB", False),  # empty inner piece
    ("length_constraints:number_words", {"num_words": 5, "relation": LT}, "Mars, the red one.", True),
    ("length_constraints:number_words", {"num_words": 5, "relation": LT}, "It is the planet Mars.", False),
    ("length_constraints:number_words", {"num_words": 3, "relation": AL}, "don't stop", True),  # \w+: don, t, stop
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "however"},
     "Tea is calm.\n\n\"However, it has caffeine.", True),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "however"},
     "Tea is calm.\n\nBut it has caffeine.", False),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "however"},
     "Tea is calm.\n\nHowever it is strong.\n\nThird.", False),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name], see you at [place].", True),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name], see you.", False),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Thanks!\n\nP.S. Bring cake.", True),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Thanks! Bring cake.", False),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Hi.\np. p. s. water them", True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3}, "Intro:\n* Carrot\n* Potato\n- Beet", True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3}, "1. Carrot\n2. Potato\n3. Beet", False),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* a\n** not a bullet\n* b", True),
    ("detectable_format:constrained_response", {}, "My answer is yes.", True),
    ("detectable_format:constrained_response", {}, "Yes, it is.", False),
    ("detectable_format:constrained_response", {}, "my answer is yes.", False),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "Eat *oats* and *fruit*.", True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "Eat *oats* and fruit. * *", False),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2},
     "SECTION 1\nFood\nSECTION 2\nGames", True),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2},
     "SECTION 1\nFood and games", False),
    ("detectable_format:json_format", {}, '```json\n{"name": "Tom", "age": 3}\n```', True),
    ("detectable_format:json_format", {}, '["Maths", "Art"]', True),
    ("detectable_format:json_format", {}, 'Here: {"name": "Tom"}', False),
    ("detectable_format:title", {}, "<<Wind Song>>\nThe wind blows.", True),
    ("detectable_format:title", {}, "Wind Song\nThe wind blows. << >>", False),
    ("combination:two_responses", {}, "Goldie\n******\nBubbles", True),
    ("combination:two_responses", {}, "Goldie\n******\nGoldie", False),
    ("combination:two_responses", {}, "Goldie\n******\n******\nBubbles", False),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Explain what a budget is."},
     "explain what a budget is. A plan for money.", True),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Explain what a budget is."}, "A budget is a plan.", False),
    ("startend:end_checker", {"end_phrase": "Enjoy your meal!"}, "Rinse the rice. enjoy your meal!\"", True),
    ("startend:end_checker", {"end_phrase": "Enjoy your meal!"}, "Rinse the rice. Enjoy your meal.", False),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": AL}, "Buy FRESH BREAD now.",
     True),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": AL}, "Buy FRESH bread.", False),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": AL}, "The WELL-KNOWN shop.",
     False),  # a hyphenated word is one word
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": LT}, "Buy FRESH bread.", True),
    ("change_case:english_capital", {}, "CAUTION: THE FLOOR IS WET AND SLIPPERY TODAY.", True),
    ("change_case:english_capital", {}, "Caution: the floor is wet.", False),
    ("change_case:english_lowercase", {}, "i like sweet ripe mangoes because they taste of summer.", True),
    ("change_case:english_lowercase", {}, "I like sweet ripe mangoes.", False),
    ("change_case:english_lowercase", {}, "j'aime beaucoup les mangues sucrées parce qu'elles ont le goût de l'été.",
     False),  # lower case, but not English
    ("punctuation:no_comma", {}, "Red and amber and green.", True),
    ("punctuation:no_comma", {}, "Red, amber and green.", False),
    ("startend:quotation", {}, '  "A rainbow is light split by rain."  ', True),
    ("startend:quotation", {}, "\"A rainbow is light split by rain.", False),
    ("startend:quotation", {}, '"', False),
]


@pytest.mark.parametrize(("iid", "kwargs", "response", "expected"), CASES,
                         ids=[f"{c[0]}-{'pass' if c[3] else 'fail'}-{i}" for i, c in enumerate(CASES)])
def test_strict_rule(iid: str, kwargs: dict, response: str, expected: bool) -> None:
    assert check(iid, kwargs, response) is expected


def test_every_instruction_type_has_a_passing_and_a_failing_case() -> None:
    assert len(INSTRUCTIONS) == 25
    for iid in INSTRUCTIONS:
        results = {c[3] for c in CASES if c[0] == iid}
        assert results == {True, False}, iid


@pytest.mark.parametrize("iid", sorted(INSTRUCTIONS))
def test_an_empty_response_fails_strict_and_loose(iid: str) -> None:
    kwargs = next(c[1] for c in CASES if c[0] == iid)
    assert follows([iid], [kwargs], "  \n ") == {"strict": [False], "loose": [False]}


def test_loose_forgives_an_intro_line_and_markdown_asterisks() -> None:
    # IFEval's loose example: a preamble line before the answer, a bold word around the comma rule
    response = "Sure, here it is:\nRed and amber and green."
    assert follows(["punctuation:no_comma"], [{}], response) == {"strict": [False], "loose": [True]}
    response = "**Answer**: it is light split by rain"
    assert follows(["startend:end_checker"], [{"end_phrase": "**rain**"}], response)["strict"] == [False]
    assert follows(["detectable_format:title"], [{}], "<<*Wind*>>") == {"strict": [True], "loose": [True]}
    assert follows(["startend:quotation"], [{}], 'Here you go:\n"A rainbow."') == {"strict": [False], "loose": [True]}
    assert follows(["punctuation:no_comma"], [{}], "Yes, it is.\nNo.") == {"strict": [False], "loose": [True]}
    assert follows(["punctuation:no_comma"], [{}], "A, b.\nYes, it is.\nC, d.") == {"strict": [False], "loose": [False]}


def test_loose_variants_are_ifevals_eight() -> None:
    v = loose_variants("*a*\nb\n*c*")
    assert v == ["*a*\nb\n*c*", "a\nb\nc", "b\n*c*", "*a*\nb", "b", "b\nc", "a\nb", "b"]


def test_follows_reports_each_instruction() -> None:
    got = follows(["punctuation:no_comma", "length_constraints:number_words"],
                  [{}, {"num_words": 3, "relation": "less than"}], "Yes it is.")
    assert got == {"strict": [True, False], "loose": [True, False]}


def test_sentence_splitter_is_ifevals() -> None:
    assert split_into_sentences("Mr. Smith paid $2.50 at example.com. He left... Then? Yes!") == [
        "Mr. Smith paid $2.50 at example.com.", "He left...", "Then?", "Yes!"]
    assert split_into_sentences("The U.S.A. is big. I agree.") == ["The U.S.A. is big.", "I agree."]
    assert checkers.count_words("don't stop-now 42") == 5


def test_language_detection_is_deterministic() -> None:
    text = "Hola, me gusta mucho el color azul porque me recuerda al mar."
    assert {checkers._detect_language(text) for _ in range(5)} == {"es"}


@pytest.mark.parametrize(("iid", "kwargs", "fragment"), [
    ("keywords:nope", {}, "unknown instruction id 'keywords:nope'"),
    (7, {}, "unknown instruction id 7"),
    ("punctuation:no_comma", [], "must be a JSON object"),
    ("punctuation:no_comma", {"x": 1}, "does not take the argument(s) x (its arguments: none)"),
    ("length_constraints:number_words", {"num_words": 5}, "needs the argument 'relation'"),
    ("length_constraints:number_words", {"num_words": 0, "relation": "less than"}, "an integer >= 1"),
    ("length_constraints:number_words", {"num_words": "5", "relation": "less than"}, "an integer >= 1"),
    ("keywords:letter_frequency", {"letter": "ab", "let_frequency": 1, "let_relation": "at least"}, "a single letter"),
    ("language:response_language", {"language": "xx"}, "ISO 639-1"),
    ("keywords:existence", {"keywords": []}, "non-empty list"),
    ("keywords:forbidden_words", {"forbidden_words": ["ok", 3]}, "non-empty list of non-empty strings"),
])
def test_validate_rejects(iid: object, kwargs: object, fragment: str) -> None:
    with pytest.raises(ValueError) as e:
        validate(iid, kwargs)
    assert fragment in str(e.value)


def test_validate_drops_nulls_and_returns_a_copy() -> None:
    kw = {"num_words": 5, "relation": "less than", "keywords": None}
    out = validate("length_constraints:number_words", kw)
    assert out == {"num_words": 5, "relation": "less than"} and "keywords" in kw


def test_blank_line_instructions_are_the_multiline_ones() -> None:
    assert checkers.needs_blank_lines(["punctuation:no_comma", "length_constraints:number_paragraphs"])
    assert not checkers.needs_blank_lines(["punctuation:no_comma", "length_constraints:number_words"])
    assert {i for i, ins in INSTRUCTIONS.items() if ins.multiline} == {
        "length_constraints:number_paragraphs", "length_constraints:nth_paragraph_first_word",
        "detectable_content:postscript", "detectable_format:multiple_sections", "detectable_format:json_format",
        "detectable_format:title", "combination:two_responses", "combination:repeat_prompt"}
