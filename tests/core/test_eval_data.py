"""Tests of stage1_core.train.eval_data: every loader error names file, line and field; the shipped files
load, and are disjoint from the seeds, the critic dev set, the config's examples and each other."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from stage1_core.train import checkers
from stage1_core.infra.errors import InputError
from stage1_core.infra.stats import wilson_ci
from stage1_core.train.eval_data import (SHIPPED_PROMPTS, SHIPPED_REFERENCE, EvalPrompt, ReferencePair, load_eval_prompts,
                                   load_reference)
from stage1_core.phases.filters import RougeDeduper, normalize
from stage1_core.phases.seeds import PACKAGED_SEEDS

REPO = Path(__file__).resolve().parents[2]
SHARED_SEEDS = Path("/work/shared/data/self_instruct_seed_tasks.jsonl")
DEV_SETS = sorted((REPO / "stage1_core" / "data").glob("critic_dev*.jsonl"))
CONFIGS = sorted((REPO / "configs").glob("**/*.yaml"))

Loader = Callable[[Path], Any]


def _write(tmp_path: Path, content: str | bytes, name: str = "items.jsonl") -> Path:
    p = tmp_path / name
    p.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return p


def _lines(*objs: object) -> str:
    return "".join(json.dumps(o) + "\n" for o in objs)


def _prompt(i: int, **over: object) -> dict[str, object]:
    return {"id": f"eval-{i:03d}", "instruction": f"Name a colour number {i}.", **over}


def _pair(i: int, **over: object) -> dict[str, object]:
    return {"id": f"ref-{i:03d}", "instruction": f"Name a colour number {i}.", "response": "Blue.", **over}


def _reject(load: Loader, path: Path, line: int | None, field: str | None) -> InputError:
    with pytest.raises(InputError) as info:
        load(path)
    err = info.value
    assert err.file == str(path) and str(path) in err.render()
    assert err.line == line
    assert err.field == field
    assert err.expected and err.fix
    return err


# --- accepted files -------------------------------------------------------------------------------


WORDS = "length_constraints:number_words"


def test_prompts_load_with_and_without_instructions(tmp_path: Path) -> None:
    p = _write(tmp_path, "\ufeff" + _lines(_prompt(1), _prompt(2, instruction_id_list=[WORDS, "punctuation:no_comma"],
                                                                kwargs=[{"num_words": 5, "relation": "less than"}, {}],
                                                                note="x"))
               + "\n  \n" + _lines(_prompt(3, instruction_id_list=["punctuation:no_comma"])).replace("\n", "\r\n"))
    got = load_eval_prompts(p)
    assert got == [EvalPrompt("eval-001", "Name a colour number 1.", (), (), 1),
                   EvalPrompt("eval-002", "Name a colour number 2.", (WORDS, "punctuation:no_comma"),
                              ({"num_words": 5, "relation": "less than"}, {}), 2),
                   EvalPrompt("eval-003", "Name a colour number 3.", ("punctuation:no_comma",), ({},), 5)]
    assert [x.checked for x in got] == [False, True, True]


def test_an_ifeval_dataset_row_loads_with_its_null_kwargs(tmp_path: Path) -> None:
    """The IFEval dataset lists every argument name with null for the unused ones."""
    kw = {"num_words": 50, "relation": "at least", "keywords": None, "language": None, "num_sentences": None}
    p = _write(tmp_path, _lines(_prompt(1, instruction_id_list=[WORDS], kwargs=[kw])))
    assert load_eval_prompts(p)[0].kwargs == ({"num_words": 50, "relation": "at least"},)


def test_reference_loads(tmp_path: Path) -> None:
    p = _write(tmp_path, _lines(_pair(1), _pair(2, source="hand-written")))
    assert load_reference(str(p)) == [ReferencePair("ref-001", "Name a colour number 1.", "Blue.", 1),
                                      ReferencePair("ref-002", "Name a colour number 2.", "Blue.", 2)]


# --- one test per error kind, for both loaders ----------------------------------------------------

LOADERS = [pytest.param(load_eval_prompts, _prompt, id="prompts"), pytest.param(load_reference, _pair, id="reference")]


@pytest.mark.parametrize(("load", "row"), LOADERS)
def test_missing_file(tmp_path: Path, load: Loader, row: Callable[..., dict[str, object]]) -> None:
    err = _reject(load, tmp_path / "nope.jsonl", None, None)
    assert "not found" in err.message


@pytest.mark.parametrize(("load", "row"), LOADERS)
def test_directory(tmp_path: Path, load: Loader, row: Callable[..., dict[str, object]]) -> None:
    err = _reject(load, tmp_path, None, None)
    assert "is a directory" in err.message


@pytest.mark.parametrize(("load", "row"), LOADERS)
def test_not_utf8(tmp_path: Path, load: Loader, row: Callable[..., dict[str, object]]) -> None:
    p = _write(tmp_path, _lines(row(1)).encode() + b'{"id": "caf\xe9"}\n')
    err = _reject(load, p, 2, None)
    assert "not valid UTF-8: byte 0xe9 at column 12" in err.message


@pytest.mark.parametrize(("load", "row"), LOADERS)
def test_bad_json(tmp_path: Path, load: Loader, row: Callable[..., dict[str, object]]) -> None:
    p = _write(tmp_path, _lines(row(1)) + '{"id": "x", "instruction": \n')
    err = _reject(load, p, 2, None)
    assert err.message.startswith("invalid JSON: Expecting value")


@pytest.mark.parametrize(("load", "row"), LOADERS)
def test_not_an_object(tmp_path: Path, load: Loader, row: Callable[..., dict[str, object]]) -> None:
    p = _write(tmp_path, _lines(row(1), row(2), ["eval-003", "Name a colour."]))
    err = _reject(load, p, 3, None)
    assert err.message == "line is a JSON array, not an object"


@pytest.mark.parametrize(("load", "row"), LOADERS)
@pytest.mark.parametrize("key", ["id", "instruction"])
def test_missing_field(tmp_path: Path, load: Loader, row: Callable[..., dict[str, object]], key: str) -> None:
    bad = row(2)
    del bad[key]
    err = _reject(load, _write(tmp_path, _lines(row(1), bad)), 2, key)
    assert err.message == f"missing required field {key!r}"


def test_reference_missing_response(tmp_path: Path) -> None:
    bad = _pair(1)
    del bad["response"]
    err = _reject(load_reference, _write(tmp_path, _lines(bad)), 1, "response")
    assert err.message == "missing required field 'response'"


@pytest.mark.parametrize(("load", "row"), LOADERS)
def test_wrong_type(tmp_path: Path, load: Loader, row: Callable[..., dict[str, object]]) -> None:
    err = _reject(load, _write(tmp_path, _lines(row(1, id=7))), 1, "id")
    assert err.message == "field 'id' is a JSON number, expected a string"


@pytest.mark.parametrize(("load", "row"), LOADERS)
def test_blank_field(tmp_path: Path, load: Loader, row: Callable[..., dict[str, object]]) -> None:
    err = _reject(load, _write(tmp_path, _lines(row(1), row(2, instruction=" \n "))), 2, "instruction")
    assert err.message == "field 'instruction' is empty"


@pytest.mark.parametrize(("load", "row"), LOADERS)
def test_duplicate_id(tmp_path: Path, load: Loader, row: Callable[..., dict[str, object]]) -> None:
    p = _write(tmp_path, _lines(row(1), row(2), row(1, instruction="Name a fruit.")))
    err = _reject(load, p, 3, "id")
    assert "duplicate id" in err.message and "lines 1 and 3" in err.message


@pytest.mark.parametrize(("load", "row"), LOADERS)
@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path: Path, load: Loader, row: Callable[..., dict[str, object]], content: str) -> None:
    err = _reject(load, _write(tmp_path, content), None, None)
    assert "is empty" in err.message


@pytest.mark.parametrize(("ids", "kwargs", "field", "fragment"), [
    (["keywords:one_word"], [{}], "instruction_id_list", "unknown instruction id 'keywords:one_word'; IFEval's ids: "
                                                         "keywords:existence"),
    ([WORDS], [{"num_words": 5}], "kwargs[0]", "needs the argument 'relation'"),
    ([WORDS], [{"num_words": 5, "relation": "at most"}], "kwargs[0]", 'must be one of "less than", "at least"'),
    ([WORDS], [{"num_words": 5, "relation": "less than", "n": 2}], "kwargs[0]", "does not take the argument(s) n"),
    ([WORDS], [{"num_words": True, "relation": "less than"}], "kwargs[0]", "must be an integer >= 1"),
    (["punctuation:no_comma", "keywords:existence"], [{}, {"keywords": ["(unclosed"]}], "kwargs[1]",
     "valid regular expression"),
])
def test_bad_instruction(tmp_path: Path, ids: object, kwargs: object, field: str, fragment: str) -> None:
    p = _write(tmp_path, _lines(_prompt(1), _prompt(2, instruction_id_list=ids, kwargs=kwargs)))
    err = _reject(load_eval_prompts, p, 2, field)
    assert err.message.startswith("invalid instruction ") and fragment in err.message
    assert "docs/eval.md" in (err.expected or "")


@pytest.mark.parametrize(("extra", "field", "fragment"), [
    ({"instruction_id_list": "punctuation:no_comma"}, "instruction_id_list", "is a JSON string"),
    ({"instruction_id_list": [7]}, "instruction_id_list", "not a string"),
    ({"instruction_id_list": ["punctuation:no_comma", "punctuation:no_comma"], "kwargs": [{}, {}]},
     "instruction_id_list", "appears twice"),
    ({"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}, {}]}, "kwargs", "one object per instruction id (1)"),
    ({"instruction_id_list": ["punctuation:no_comma"], "kwargs": {}}, "kwargs", "got a JSON object"),
    ({"kwargs": [{}]}, "kwargs", "without 'instruction_id_list'"),
    ({"instruction_ids": ["punctuation:no_comma"]}, "instruction_ids", "did you mean 'instruction_id_list'"),
    ({"check": {"type": "one_word"}}, "check", "was replaced by IFEval's instruction_id_list"),
])
def test_bad_instruction_shape(tmp_path: Path, extra: dict[str, object], field: str, fragment: str) -> None:
    p = _write(tmp_path, _lines(_prompt(1), _prompt(2, **extra)))
    err = _reject(load_eval_prompts, p, 2, field)
    assert fragment in err.message


# --- the hardened reader's guarantees (stage1_core.infra.jsonl), as for seeds ----------------------------


@pytest.mark.parametrize(("load", "row"), LOADERS)
def test_a_repeated_key_is_an_error_not_the_last_value(tmp_path: Path, load: Loader, row: Callable[..., dict[str, object]]) -> None:
    line = json.dumps(row(2))[:-1] + ', "instruction": "Something else."}\n'
    err = _reject(load, _write(tmp_path, _lines(row(1)) + line), 2, "instruction")
    assert err.message == "key 'instruction' appears twice in this object"


@pytest.mark.parametrize(("load", "row"), LOADERS)
def test_an_overlong_line_is_an_error(tmp_path: Path, load: Loader, row: Callable[..., dict[str, object]]) -> None:
    err = _reject(load, _write(tmp_path, _lines(row(1), row(2, instruction="x" * 100_001))), 2, None)
    assert err.message.startswith("line is too long (100,0")


@pytest.mark.parametrize(("load", "row"), LOADERS)
def test_a_lone_surrogate_is_an_error(tmp_path: Path, load: Loader, row: Callable[..., dict[str, object]]) -> None:
    p = _write(tmp_path, _lines(row(1)) + '{"id": "x", "instruction": "bad \\ud800 text", "response": "r"}\n')
    err = _reject(load, p, 2, "instruction")
    assert "lone UTF-16 surrogate" in err.message


@pytest.mark.parametrize(("load", "row"), LOADERS)
def test_a_json_array_file_says_how_to_convert(tmp_path: Path, load: Loader, row: Callable[..., dict[str, object]]) -> None:
    err = _reject(load, _write(tmp_path, json.dumps([row(1), row(2)])), 1, None)
    assert "JSON array" in err.message and "jq -c" in (err.fix or "")


@pytest.mark.parametrize(("load", "row"), LOADERS)
def test_invisible_text_is_blank(tmp_path: Path, load: Loader, row: Callable[..., dict[str, object]]) -> None:
    err = _reject(load, _write(tmp_path, _lines(row(1, instruction="\u200b\ufeff "))), 1, "instruction")
    assert err.message == "field 'instruction' is empty"


# --- the shipped files ----------------------------------------------------------------------------


def test_shipped_prompts_load() -> None:
    prompts = load_eval_prompts(None)
    assert load_eval_prompts(SHIPPED_PROMPTS) == prompts
    assert [p.id for p in prompts] == [f"eval-{i:03d}" for i in range(1, 132)]
    checked = [p for p in prompts if p.checked]
    assert len(checked) == 107 and sum(len(p.instruction_ids) for p in checked) == 115
    # every IFEval instruction type is exercised, and the prompt-level interval is at most +-0.1 at any accuracy
    assert {i for p in checked for i in p.instruction_ids} == set(checkers.INSTRUCTIONS)
    lo, hi = wilson_ci(len(checked) // 2, len(checked))
    assert hi - lo <= 0.2


def test_shipped_reference_loads_one_line_answers() -> None:
    pairs = load_reference()
    assert load_reference(SHIPPED_REFERENCE) == pairs
    assert [p.id for p in pairs] == [f"ref-{i:03d}" for i in range(1, 33)]
    for p in pairs:
        for text in (p.instruction, p.response):
            assert text == text.strip() and "\n" not in text, p.id
            assert "instruction:" not in text.lower() and "response:" not in text.lower(), p.id
        assert len(p.response.split()) <= 40, p.id


def _config_instructions(node: Any) -> list[str]:
    """Every `instruction` string anywhere in a YAML tree (worked examples, rubric examples)."""
    if isinstance(node, dict):
        own = [node["instruction"]] if isinstance(node.get("instruction"), str) else []
        return own + [t for v in node.values() for t in _config_instructions(v)]
    if isinstance(node, list):
        return [t for v in node for t in _config_instructions(v)]
    return []


def _external_instructions() -> dict[str, list[str]]:
    seeds = [json.loads(line)["instruction"] for line in PACKAGED_SEEDS.read_text().splitlines() if line.strip()]
    if SHARED_SEEDS.is_file():
        seeds += [json.loads(line)["instruction"] for line in SHARED_SEEDS.read_text().splitlines() if line.strip()]
    dev = [json.loads(line)["instruction"] for f in DEV_SETS for line in f.read_text().splitlines() if line.strip()]
    examples = [t for f in CONFIGS for t in _config_instructions(yaml.safe_load(f.read_text()))]
    return {"seeds": seeds, "dev": dev, "config": examples}


def test_the_sources_to_avoid_are_found() -> None:
    ext = _external_instructions()
    assert len(ext["seeds"]) >= 175 and len(ext["dev"]) >= 100
    assert "Give three tips for staying healthy." in ext["config"]
    assert "Name three rivers in Europe." in ext["config"]


def test_shipped_items_are_disjoint_from_everything_else() -> None:
    ext = _external_instructions()
    mine = ([("prompt " + p.id, p.instruction) for p in load_eval_prompts(None)]
            + [("reference " + p.id, p.instruction) for p in load_reference(None)])
    outside = [t for texts in ext.values() for t in texts]
    outside_norm = {normalize(t) for t in outside}
    pool = RougeDeduper(outside, threshold=0.7)
    problems = []
    for i, (name, text) in enumerate(mine):
        if normalize(text) in outside_norm:
            problems.append(f"{name} copies an outside instruction: {text!r}")
        score, similar = pool.check(text)
        if score >= 0.7:
            problems.append(f"{name} is near {similar!r} (ROUGE-L {score:.2f})")
        others = RougeDeduper([t for j, (_, t) in enumerate(mine) if j != i], threshold=0.7)
        score, similar = others.check(text)
        if score >= 0.7:
            problems.append(f"{name} is near the shipped {similar!r} (ROUGE-L {score:.2f})")
    assert len({normalize(t) for _, t in mine}) == len(mine)
    assert not problems, "\n".join(problems)


def test_disjointness_check_can_fail() -> None:
    pool = RougeDeduper(["What is the capital of Japan?"], threshold=0.7)
    assert pool.check("What is the capital of Canada?")[0] >= 0.7


# --- hostile input, property-based (as tests/core/test_hostile_input.py does for seeds) -------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_FAST = settings(max_examples=60, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                       lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                       max_leaves=8)


@_FAST
@given(data=st.binary(max_size=300))
def test_random_bytes_load_or_raise_input_error(tmp_path: Path, data: bytes) -> None:
    p = _write(tmp_path, data, "hostile.jsonl")
    for load in (load_eval_prompts, load_reference):
        try:
            load(p)
        except InputError as e:
            assert e.file == str(p) and e.render().encode("utf-8")


@_FAST
@given(ids=_VALUES, kwargs=_VALUES)
def test_random_instruction_fields_load_or_raise_input_error(tmp_path: Path, ids: object, kwargs: object) -> None:
    p = _write(tmp_path, _lines(_prompt(1, instruction_id_list=ids, kwargs=kwargs)), "hostile.jsonl")
    try:
        got = load_eval_prompts(p)
    except InputError as e:
        assert e.line == 1 and e.field and e.expected and e.fix
    else:
        assert got[0].checked == bool(ids)
