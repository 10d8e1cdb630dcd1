"""Tests of stage1_core.phases.seeds: the packaged seeds, both formats, every rejection, require_usable."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from stage1_core.infra.errors import InputError
from stage1_core.phases.seeds import PACKAGED_SEEDS, Seed, SeedSet, load_seeds, require_usable

PACKAGED_COUNT = 175
PACKAGED_WITH_INPUT = 125
PACKAGED_USABLE = 144  # 31 seeds with an input are longer than 300 chars on one line
SHARED_SEEDS = Path("/work/shared/data/self_instruct_seed_tasks.jsonl")


def _write(tmp_path: Path, content: str | bytes, name: str = "seeds.jsonl") -> Path:
    p = tmp_path / name
    p.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return p


def _lines(*objs: object) -> str:
    return "".join(json.dumps(o) + "\n" for o in objs)


def _si(i: int, **over: object) -> dict[str, object]:
    row: dict[str, object] = {"id": f"seed_task_{i}", "name": f"task_{i}", "instruction": f"Do task {i}.",
                              "instances": [{"input": "", "output": f"done {i}"}], "is_classification": False}
    row.update(over)
    return row


def _ours(i: int, **over: object) -> dict[str, object]:
    row: dict[str, object] = {"id": f"s{i}", "instruction": f"Do task {i}.", "input": "", "output": None}
    row.update(over)
    return row


def _reject(path: Path) -> InputError:
    with pytest.raises(InputError) as info:
        load_seeds(path)
    err = info.value
    assert str(path) in err.render()
    assert err.file == str(path)
    assert err.fix
    return err


# --- accepted files ---------------------------------------------------------------------------


def test_packaged_seeds_load() -> None:
    ss = load_seeds(None)
    assert ss.path == str(PACKAGED_SEEDS)
    assert ss.format == "self_instruct"
    assert ss.count == PACKAGED_COUNT
    assert sum(1 for s in ss.seeds if s.input) == PACKAGED_WITH_INPUT
    assert ss.usable == PACKAGED_USABLE
    assert len(ss.usable_seeds()) == PACKAGED_USABLE
    assert ss.sha256 == hashlib.sha256(PACKAGED_SEEDS.read_bytes()).hexdigest()
    assert ss.summary() == {"path": str(PACKAGED_SEEDS), "format": "self_instruct", "count": PACKAGED_COUNT,
                            "usable": PACKAGED_USABLE, "sha256": ss.sha256}
    first = ss.seeds[0]
    assert first.id == "seed_task_0"
    assert first.input == ""
    assert first.output is not None and first.output.startswith("Yes, you can have")
    second = ss.seeds[1]
    assert second.list_text() == "What is the relation between the given pairs? Input: Night : Day :: Right : Left"
    for s in ss.usable_seeds():
        text = s.list_text()
        assert text is not None and "\n" not in text and len(text) <= 300


@pytest.mark.skipif(not SHARED_SEEDS.is_file(), reason="shared Self-Instruct seed file not present")
def test_shared_seed_file_loads_by_path() -> None:
    ss = load_seeds(SHARED_SEEDS)
    assert ss.path == str(SHARED_SEEDS)
    assert ss.format == "self_instruct"
    assert ss.count == PACKAGED_COUNT
    assert ss.usable == PACKAGED_USABLE


def test_our_format_round_trip(tmp_path: Path) -> None:
    seeds = [Seed(id="a", instruction="Name three primary colors."),
             Seed(id="b", instruction="Summarize the text.", input="Cats sleep a lot.", output="Cats nap."),
             Seed(id="c", instruction="Translate to French.", input="hello", output=None)]
    p = _write(tmp_path, "".join(s.model_dump_json() + "\n" for s in seeds))
    ss = load_seeds(str(p))
    assert isinstance(ss, SeedSet)
    assert ss.format == "stage1"
    assert ss.seeds == seeds
    assert ss.count == 3 and ss.usable == 3


def test_our_format_optional_fields_and_blank_lines(tmp_path: Path) -> None:
    p = _write(tmp_path, '\n{"id": "a", "instruction": "Do it."}\n   \r\n{"id": "b", "instruction": "Go.", "output": null}\r\n\n')
    ss = load_seeds(p)
    assert [(s.id, s.input, s.output) for s in ss.seeds] == [("a", "", None), ("b", "", None)]


def test_bom_accepted(tmp_path: Path) -> None:
    p = _write(tmp_path, b"\xef\xbb\xbf" + _lines(_ours(1), _ours(2)).encode("utf-8"))
    ss = load_seeds(p)
    assert [s.id for s in ss.seeds] == ["s1", "s2"]
    assert ss.sha256 == hashlib.sha256(p.read_bytes()).hexdigest()


def test_list_text_collapses_whitespace_and_limits_length() -> None:
    assert Seed(id="a", instruction="  Write\n\na  poem.\t").list_text() == "Write a poem."
    assert Seed(id="a", instruction="Sort:", input="3\n1\n  2").list_text() == "Sort: Input: 3 1 2"
    assert Seed(id="a", instruction="Say hi.", input=" \n ").list_text() == "Say hi."
    at_limit = Seed(id="a", instruction="x" * 290, input="y" * 2)  # 290 + len(" Input: ") + 2 = 300
    assert at_limit.list_text() is not None and len(at_limit.list_text() or "") == 300
    assert Seed(id="a", instruction="x" * 290, input="y" * 3).list_text() is None
    assert Seed(id="a", instruction="x" * 301).list_text() is None


# --- rejections: each names file, line and field ----------------------------------------------


def test_reject_missing_file(tmp_path: Path) -> None:
    err = _reject(tmp_path / "nope.jsonl")
    assert "not found" in err.message and err.line is None


def test_reject_directory(tmp_path: Path) -> None:
    err = _reject(tmp_path)
    assert "directory" in err.message and err.line is None


def test_reject_empty_file(tmp_path: Path) -> None:
    err = _reject(_write(tmp_path, ""))
    assert "empty" in err.message and err.line is None


def test_reject_only_blank_lines(tmp_path: Path) -> None:
    err = _reject(_write(tmp_path, "\n  \n\t\n"))
    assert "empty" in err.message


def test_reject_invalid_json(tmp_path: Path) -> None:
    err = _reject(_write(tmp_path, _lines(_ours(1)) + '{"id": "s2", "instruction": "x",}\n'))
    assert err.line == 2 and err.field is None
    assert "invalid JSON" in err.message and "column" in err.message


def test_reject_line_not_object(tmp_path: Path) -> None:
    err = _reject(_write(tmp_path, _lines(_ours(1), _ours(2)) + '"just a string"\n'))
    assert err.line == 3
    assert "not an object" in err.message and "string" in err.message


def test_reject_json_array(tmp_path: Path) -> None:
    err = _reject(_write(tmp_path, "\n" + json.dumps([_ours(1), _ours(2)])))
    assert err.line == 2
    assert "JSON array; expected one object per line (JSON Lines)" in err.message
    assert "jq -c '.[]'" in (err.fix or "")


def test_reject_non_utf8_reports_line(tmp_path: Path) -> None:
    data = _lines(_ours(1), _ours(2)).encode("utf-8") + b'{"id": "s3", "instruction": "caf\xe9"}\n'
    err = _reject(_write(tmp_path, data))
    assert err.line == 3
    assert "UTF-8" in err.message and "0xe9" in err.message


def test_reject_utf16(tmp_path: Path) -> None:
    err = _reject(_write(tmp_path, _lines(_ours(1)).encode("utf-16")))
    assert err.line == 1 and "UTF-16" in err.message


def test_reject_overlong_line(tmp_path: Path) -> None:
    long_row = _ours(2, output="z" * 100_001)
    err = _reject(_write(tmp_path, _lines(_ours(1), long_row)))
    assert err.line == 2
    assert "too long" in err.message and "100,000" in err.message


def test_reject_missing_instruction(tmp_path: Path) -> None:
    err = _reject(_write(tmp_path, _lines(_ours(1), {"id": "s2", "input": ""})))
    assert (err.line, err.field) == (2, "instruction")
    assert "missing" in err.message


def test_reject_missing_id(tmp_path: Path) -> None:
    err = _reject(_write(tmp_path, _lines({"instruction": "Do it."})))
    assert (err.line, err.field) == (1, "id")


def test_reject_wrong_type_id(tmp_path: Path) -> None:
    err = _reject(_write(tmp_path, _lines(_ours(1), _ours(2, id=7))))
    assert (err.line, err.field) == (2, "id")
    assert "number" in err.message


def test_reject_wrong_type_output(tmp_path: Path) -> None:
    err = _reject(_write(tmp_path, _lines(_ours(1, output=["a"]))))
    assert (err.line, err.field) == (1, "output")
    assert "string or null" in (err.expected or "")


def test_reject_empty_id(tmp_path: Path) -> None:
    err = _reject(_write(tmp_path, _lines(_ours(1, id=""))))
    assert (err.line, err.field) == (1, "id")


def test_reject_blank_instruction(tmp_path: Path) -> None:
    err = _reject(_write(tmp_path, _lines(_ours(1), _ours(2, instruction="  \n "))))
    assert (err.line, err.field) == (2, "instruction")


def test_reject_overlong_instruction(tmp_path: Path) -> None:
    err = _reject(_write(tmp_path, _lines(_ours(1, instruction="x" * 2001))))
    assert (err.line, err.field) == (1, "instruction")
    assert "2,000" in (err.expected or "")


def test_reject_unknown_key_ours(tmp_path: Path) -> None:
    err = _reject(_write(tmp_path, _lines(_ours(1), _ours(2, category="x"))))
    assert (err.line, err.field) == (2, "category")
    assert "unknown key" in err.message


def test_reject_instances_in_our_format_explains_detection(tmp_path: Path) -> None:
    err = _reject(_write(tmp_path, _lines(_ours(1), _si(2))))
    assert (err.line, err.field) == (2, "instances")
    assert "first seed" in err.message


def test_reject_duplicate_id_names_both_lines(tmp_path: Path) -> None:
    err = _reject(_write(tmp_path, _lines(_ours(1), _ours(2), _ours(3, id="s1"))))
    assert (err.line, err.field) == (3, "id")
    assert "'s1'" in err.message and "1" in err.message and "3" in err.message
    assert "lines 1 and 3" in err.message


def test_self_instruct_missing_instances_on_later_line(tmp_path: Path) -> None:
    row = _si(2)
    del row["instances"]
    err = _reject(_write(tmp_path, _lines(_si(1), row)))
    assert (err.line, err.field) == (2, "instances")


def test_self_instruct_unknown_key(tmp_path: Path) -> None:
    err = _reject(_write(tmp_path, _lines(_si(1, extra=1))))
    assert (err.line, err.field) == (1, "extra")


def test_self_instruct_wrong_type_instance_input(tmp_path: Path) -> None:
    err = _reject(_write(tmp_path, _lines(_si(1), _si(2, instances=[{"input": 5, "output": "x"}]))))
    assert (err.line, err.field) == (2, "instances[0].input")


def test_self_instruct_missing_instance_output(tmp_path: Path) -> None:
    err = _reject(_write(tmp_path, _lines(_si(1, instances=[{"input": ""}]))))
    assert (err.line, err.field) == (1, "instances[0].output")


def test_self_instruct_empty_instances(tmp_path: Path) -> None:
    err = _reject(_write(tmp_path, _lines(_si(1), _si(2), _si(3, instances=[]))))
    assert (err.line, err.field) == (3, "instances")


def test_self_instruct_wrong_type_is_classification(tmp_path: Path) -> None:
    err = _reject(_write(tmp_path, _lines(_si(1, is_classification="no"))))
    assert (err.line, err.field) == (1, "is_classification")


def test_self_instruct_maps_first_instance(tmp_path: Path) -> None:
    row = _si(1, instances=[{"input": "a b", "output": "c"}, {"input": "ignored", "output": "ignored"}])
    ss = load_seeds(_write(tmp_path, _lines(row, _si(2))))
    assert ss.format == "self_instruct"
    assert (ss.seeds[0].input, ss.seeds[0].output) == ("a b", "c")
    assert ss.seeds[0].list_text() == "Do task 1. Input: a b"


# --- require_usable ---------------------------------------------------------------------------


def test_require_usable_passes_and_fails(tmp_path: Path) -> None:
    ss = load_seeds(None)
    require_usable(ss, 8)
    require_usable(ss, PACKAGED_USABLE)
    with pytest.raises(InputError) as info:
        require_usable(ss, PACKAGED_USABLE + 1)
    err = info.value
    assert err.file == str(PACKAGED_SEEDS)
    assert f"only {PACKAGED_USABLE} of {PACKAGED_COUNT}" in err.message
    assert "--seeds" in (err.fix or "") and "few_shot_k" in (err.fix or "")
    assert "300" in (err.expected or "")


def test_require_usable_counts_only_one_line_seeds(tmp_path: Path) -> None:
    rows = [_ours(1), _ours(2), _ours(3, input="x" * 400)]
    p = _write(tmp_path, _lines(*rows))
    ss = load_seeds(p)
    assert (ss.count, ss.usable) == (3, 2)
    require_usable(ss, 2)
    with pytest.raises(InputError) as info:
        require_usable(ss, 3)
    assert str(p) in info.value.render()
    assert "only 2 of 3" in info.value.message
