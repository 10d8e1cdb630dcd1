"""Hostile input, property-based: seed files and configs end in a valid result or an InputError.

The validation steps are called directly (`load_seeds`, `load_pilot_config`, `load_scale_config`),
never a whole run. Property: the call returns a usable result, or raises `InputError` whose
rendered block names the file and can be printed (UTF-8); nothing else may escape (KeyError,
TypeError, UnicodeError, RecursionError, yaml errors, pydantic ValidationError...). Hypothesis runs
derandomized, so CI sees the same examples every time.

    .venv/bin/python -m pytest -q tests/core/test_hostile_input.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stage1_core.infra import storage
from stage1_core.infra.config import DEFAULT_PILOT_CONFIG, PilotConfig, load_pilot_config
from stage1_core.infra.errors import InputError
from stage1_core.scale.plan import load_scale_config
from stage1_core.phases.seeds import SeedSet, load_seeds

FAST = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
FEW = settings(FAST, max_examples=15)

# Characters that have broken parsers, terminals or encoders: NUL and other controls, BOM, zero-width
# and direction marks, combining marks, line/paragraph separators, NEL, a lone surrogate pair half.
ODD_CHARS = ["\x00", "\x01", "\x1b", "\x7f", "\x85", "\ufeff", "\u200b", "\u200c", "\u200d", "\u200e", "\u200f",
             "\u202e", "\u2066", "\u0301", "\u0336", "\u2028", "\u2029", "\ufffd", "\uffff", "\U0001f600",
             "\u05d0", "\u0627", "\ud800", "\udfff", "\n", "\r", "\t", " ", "\\", '"', "'", "e\u0301", "\u00e9"]
odd_text = st.lists(st.one_of(st.sampled_from(ODD_CHARS), st.characters(codec="utf-8")), max_size=12).map("".join)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), odd_text)
json_values = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                                 st.dictionaries(odd_text, inner, max_size=3)),
                           max_leaves=8)

SEED_KEYS = ["id", "instruction", "input", "output", "name", "instances", "is_classification"]


# --- helpers: the property itself ---------------------------------------------------------------

def _assert_input_error(err: InputError, path: Path, n_lines: int | None = None) -> str:
    text = err.render()
    assert str(path) in text, text
    text.encode("utf-8")  # the CLI prints it: a lone surrogate in a field name would crash the print
    if err.line is not None and n_lines is not None:
        assert 1 <= err.line <= n_lines, (err.line, n_lines)
    assert err.expected and err.fix, text
    return text


def _visible(text: str) -> bool:
    import unicodedata
    return any(not c.isspace() and unicodedata.category(c) not in ("Cc", "Cf") for c in text)


def _assert_valid_seeds(seedset: SeedSet) -> None:
    assert seedset.count >= 1 and len(seedset.sha256) == 64
    ids = [s.id for s in seedset.seeds]
    assert len(set(ids)) == len(ids)
    for s in seedset.seeds:
        assert _visible(s.id) and _visible(s.instruction) and 1 <= len(s.instruction) <= 2000
        for value in (s.id, s.instruction, s.input, s.output or ""):
            value.encode("utf-8")  # written to JSONL and prompts later
    json.dumps(seedset.summary())


def check_seeds(path: Path, data: bytes) -> SeedSet | InputError:
    """Write `data` to `path` and load it: a valid seed set or a well-formed InputError."""
    path.write_bytes(data)
    try:
        seedset = load_seeds(path)
    except InputError as e:
        _assert_input_error(e, path, data.count(b"\n") + 1)
        return e
    _assert_valid_seeds(seedset)
    return seedset


def _assert_valid_config(cfg: PilotConfig) -> None:
    dumped = cfg.model_dump(mode="json")
    canonical = storage.canonical_json(dumped)  # what run.py hashes: must stay small and encodable
    canonical.encode("utf-8")
    assert len(canonical) < 5_000_000
    PilotConfig.model_validate(dumped)  # the written config.yaml is read back by scale runs


def check_config(path: Path, data: bytes) -> PilotConfig | InputError:
    """Write `data` to `path` and load it as --config: a valid config or a well-formed InputError."""
    path.write_bytes(data)
    try:
        cfg = load_pilot_config(path)
    except InputError as e:
        # YAML also breaks lines at a lone CR, NEL, U+2028 and U+2029 (its marks count those).
        text = data.decode("utf-8", "replace")
        _assert_input_error(e, path, len(re.split("\r\n|[\r\n\x85\u2028\u2029]", text)))
        return e
    _assert_valid_config(cfg)
    return cfg


@pytest.fixture
def seeds_file(tmp_path: Path) -> Path:
    return tmp_path / "seeds.jsonl"


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    return tmp_path / "config.yaml"


# --- seed files: generated --------------------------------------------------------------------------

@FAST
@given(data=st.binary(max_size=600))
def test_seeds_random_bytes(seeds_file, data):
    check_seeds(seeds_file, data)


def _dump_line(obj: Any, ascii_only: bool) -> bytes:
    # ensure_ascii=True writes a lone surrogate as a \\ud800 escape; False writes it raw (invalid UTF-8).
    return json.dumps(obj, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


seed_objects = st.dictionaries(st.one_of(st.sampled_from(SEED_KEYS), odd_text), json_values, max_size=6)
good_seed = st.fixed_dictionaries({"id": st.sampled_from(["a", "b", "a ", "A", "\u200b", "a\u200b", "e\u0301",
                                                          "\u00e9", "\ud800", ""]),
                                   "instruction": odd_text}, optional={"input": odd_text, "output": odd_text})


@FAST
@given(lines=st.lists(st.one_of(seed_objects, good_seed), min_size=1, max_size=6), ascii_only=st.booleans(),
       bom=st.booleans(), crlf=st.booleans())
def test_seeds_random_objects(seeds_file, lines, ascii_only, bom, crlf):
    """Wrong keys and types, odd unicode in keys and values, duplicate and invisible ids."""
    end = b"\r\n" if crlf else b"\n"
    data = (b"\xef\xbb\xbf" if bom else b"") + end.join(_dump_line(o, ascii_only) for o in lines) + end
    check_seeds(seeds_file, data)


@FAST
@given(lines=st.lists(good_seed, min_size=1, max_size=5), cut=st.integers(0, 400), junk=st.binary(max_size=8))
def test_seeds_mutated_bytes(seeds_file, lines, cut, junk):
    """A valid-looking file with a few bytes spliced in: truncated JSON, stray bytes, broken UTF-8."""
    data = b"\n".join(_dump_line(o, True) for o in lines)
    cut = min(cut, len(data))
    check_seeds(seeds_file, data[:cut] + junk + data[cut:])


WRONG_TYPE_VALUES = [None, True, 0, 1.5, [], {}, ["x"], {"a": "b"}]


@FAST
@given(field=st.sampled_from(["id", "instruction", "input", "output"]), value=st.sampled_from(WRONG_TYPE_VALUES),
       line=st.integers(1, 4))
def test_seeds_wrong_type_names_line_and_field(seeds_file, field, value, line):
    if field == "output" and value is None:
        value = 3  # null is allowed for output
    rows = [{"id": f"s{i}", "instruction": "Name a color."} for i in range(1, 5)]
    rows[line - 1][field] = value
    err = check_seeds(seeds_file, b"\n".join(_dump_line(r, True) for r in rows))
    assert isinstance(err, InputError) and err.line == line and err.field == field


@FAST
@given(field=st.sampled_from(["id", "instruction", "name", "is_classification", "instances", "instances[0]",
                              "instances[0].input", "instances[0].output"]),
       value=st.sampled_from(WRONG_TYPE_VALUES + ["x"]))
def test_self_instruct_wrong_type_names_field(seeds_file, field, value):
    """Line 1 is a valid Self-Instruct seed (it sets the format); line 2 has one field replaced."""
    base = {"id": "t1", "name": "n", "instruction": "Do it.", "instances": [{"input": "", "output": "o"}],
            "is_classification": False}
    row = json.loads(json.dumps(base)) | {"id": "t2"}
    if field.startswith("instances[0]."):
        row["instances"][0][field.split(".")[1]] = value
    elif field == "instances[0]":
        row["instances"] = [value]
    else:
        row[field] = value
    result = check_seeds(seeds_file, _dump_line(base, True) + b"\n" + _dump_line(row, True) + b"\n")
    if isinstance(result, InputError):
        assert result.line == 2 and (result.field or "").startswith(field), result.render()
    else:
        assert isinstance(value, bool) if field == "is_classification" else value == "x"


# --- seed files: the named cases ------------------------------------------------------------------

@pytest.mark.parametrize("data", [b"", b"\xef\xbb\xbf", b"\n\n  \r\n\t\n", b"\xef\xbb\xbf\r\n"],
                         ids=["empty", "bom-only", "blank-lines", "bom-crlf"])
def test_seeds_empty_files(seeds_file, data):
    err = check_seeds(seeds_file, data)
    assert isinstance(err, InputError) and "empty" in err.message


@pytest.mark.parametrize("opener,closer", [(b"[", b"]"), (b'{"a":', b"}")], ids=["arrays", "objects"])
@pytest.mark.parametrize("where", ["top", "field", "instances"])
def test_seeds_deep_json_is_an_input_error(seeds_file, opener, closer, where):
    deep = opener * 10_000 + b"1" + closer * 10_000
    line = {"top": b'{"id": "a", "instruction": "x", "input": ' + deep + b"}",
            "field": b'{"id": ' + deep + b', "instruction": "x"}',
            "instances": b'{"id": "a", "instruction": "x", "instances": [' + deep + b"]}"}[where]
    err = check_seeds(seeds_file, b'{"id": "s0", "instruction": "ok"}\n' + line + b"\n")
    assert isinstance(err, InputError) and err.line == 2


def test_seeds_huge_number_is_an_input_error(seeds_file):
    err = check_seeds(seeds_file, b'{"id": ' + b"9" * 5000 + b', "instruction": "x"}\n')
    assert isinstance(err, InputError) and err.line == 1


@pytest.mark.parametrize("size", [100_001, 5_000_000])
def test_seeds_huge_line(seeds_file, size):
    line = b'{"id": "a", "instruction": "' + b"x" * size + b'"}'
    err = check_seeds(seeds_file, b'{"id": "s0", "instruction": "ok"}\n' + line + b"\n")
    assert isinstance(err, InputError) and err.line == 2 and "too long" in err.message


@pytest.mark.parametrize("field", ["id", "instruction", "input", "output"])
@pytest.mark.parametrize("escape", ["\\ud800", "\\udfff", "a\\udc00b"])
def test_seeds_lone_surrogate_names_field(seeds_file, field, escape):
    row = {"id": "a", "instruction": "Say hi.", field: "@"}
    err = check_seeds(seeds_file, json.dumps(row).replace("@", escape).encode())
    assert isinstance(err, InputError) and err.field == field and err.line == 1


@pytest.mark.parametrize("key", ["\ud800", "a\nb", "\x1b[31mred", "\u202eevil"])
def test_seeds_unknown_key_is_printable(seeds_file, key):
    err = check_seeds(seeds_file, _dump_line({"id": "a", "instruction": "x", key: 1}, True))
    assert isinstance(err, InputError) and "\n" not in (err.field or "") and err.field.isprintable()


@pytest.mark.parametrize("value", ["\u200b", "\x00", "\ufeff\u200e", " \u200d\t", "\x1b"])
@pytest.mark.parametrize("field", ["id", "instruction"])
def test_seeds_invisible_id_or_instruction(seeds_file, field, value):
    row = {"id": "a", "instruction": "Say hi.", field: value}
    err = check_seeds(seeds_file, _dump_line(row, True))
    assert isinstance(err, InputError) and err.field == field


@pytest.mark.parametrize("text", ["e\u0301", "\u05e9\u05dc\u05d5\u05dd \u202bx\u202c", "a\u200bb", "\U0001f600",
                                  "\u0627\u0644\u0639\u0631\u0628\u064a\u0629"])
def test_seeds_unicode_that_is_text_is_kept(seeds_file, text):
    result = check_seeds(seeds_file, _dump_line({"id": text, "instruction": text, "input": text}, False))
    assert isinstance(result, SeedSet) and result.seeds[0].instruction == text


def test_seeds_duplicate_id_names_both_lines(seeds_file):
    err = check_seeds(seeds_file, b'{"id": "a", "instruction": "x"}\n\n{"id": "a", "instruction": "y"}\n')
    assert isinstance(err, InputError) and err.line == 3 and err.field == "id" and "lines 1 and 3" in err.message


@pytest.mark.parametrize("line", [b'{"id": "a", "id": "b", "instruction": "x"}',
                                  b'{"id": "a", "instruction": "x", "instruction": "y"}',
                                  b'{"id": "a", "instruction": "x", "instances": [{"input": "", "input": "", "output": ""}]}'])
def test_seeds_duplicate_key_in_one_object(seeds_file, line):
    err = check_seeds(seeds_file, line + b"\n")
    assert isinstance(err, InputError) and err.line == 1 and "twice" in err.message


# --- configs: generated --------------------------------------------------------------------------

@FAST
@given(data=st.binary(max_size=400))
def test_config_random_bytes(config_file, data):
    check_config(config_file, data)


YAML_TOKENS = ["count", "model", "id", "critic", "labels", "seed", "instruction_filter", "blacklist", ": ", "- ",
               "\n", "  ", "&a ", "*a", "&b ", "*b", "<<: ", "!!python/object/apply:os.system ['true']",
               "!!python/name:os.system", "!!binary ", "!!set ", "!!str ", "!!int ", "!!float ", "!!bool ",
               "!!timestamp ", "!custom ", "{", "}", "[", "]",
               ", ", "'", '"', "|", ">", "#", "? ", "---", "...", "%YAML 1.1\n", "%TAG ! tag:x,2000:\n", "~", "null",
               ".inf", ".nan", "0x1F", "1e999", "9" * 5000, "\\ud800", "\\0", "\t"]
yaml_like = st.lists(st.one_of(st.sampled_from(YAML_TOKENS), st.sampled_from(ODD_CHARS)), max_size=30).map("".join)


@FAST
@given(text=yaml_like)
def test_config_random_yaml_tokens(config_file, text):
    check_config(config_file, text.encode("utf-8", "surrogatepass"))


LEAVES = ["count", "seed", "seeds_path", "max_iterations", "gpu_hour_usd", "model.id", "model.batch_size",
          "model.dtype", "instruction_generation.header", "instruction_generation.few_shot_k",
          "instruction_generation.stop_sequences", "instruction_filter.blacklist", "instruction_filter.min_words",
          "response_generation.worked_examples", "critic.labels", "critic.threshold", "critic.pair_rubric.template",
          "critic.instruction_rubric.examples", "qc.min_n", "qc.critic_min_auc", "unknown_key", "model.unknown"]
yaml_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), odd_text),
                           lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(odd_text, inner, max_size=3)),
                           max_leaves=6)


@FAST
@given(changes=st.lists(st.tuples(st.sampled_from(LEAVES), yaml_values), min_size=1, max_size=3))
def test_config_wrong_types(config_file, changes):
    data: dict[str, Any] = {}
    for dotted, value in changes:
        *parents, leaf = dotted.split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {}) if isinstance(node.get(p, {}), dict) else node
        node[leaf] = value
    text = yaml.safe_dump(data, allow_unicode=False)  # escapes odd characters, surrogates included
    result = check_config(config_file, text.encode("utf-8"))
    if isinstance(result, InputError) and result.field and "unknown" not in result.message:
        assert result.field.split(".")[0] in {d.split(".")[0] for d, _ in changes} | {"response_generation"}


@FEW
@given(levels=st.integers(2, 8), fanout=st.integers(2, 12),
       where=st.sampled_from(["top", "blacklist", "stop_sequences", "worked_examples"]))
def test_config_alias_bomb(config_file, levels, fanout, where):
    """Billion laughs, placed where the schema would accept the expanded value (a list of strings)."""
    lines = [f"x0: &x0 [{', '.join(['lol'] * fanout)}]"]
    for i in range(1, levels):
        lines.append(f"x{i}: &x{i} [{', '.join([f'*x{i - 1}'] * fanout)}]")
    text = "\n".join(lines) + "\n"
    if where != "top":  # anchors inside a list the schema takes
        big = "&s " + "ha" * 20_000
        text = {"blacklist": "instruction_filter:\n  blacklist: [" + big + ", " + ", ".join(["*s"] * fanout ** 3) + "]\n",
                "stop_sequences": "instruction_generation:\n  stop_sequences: [" + big + ", "
                                  + ", ".join(["*s"] * fanout ** 3) + "]\n",
                "worked_examples": "response_generation:\n  worked_examples:\n  - &w {instruction: " + big[3:]
                                   + ", response: r}\n" + "  - *w\n" * fanout ** 3}[where]
    result = check_config(config_file, text.encode())
    expanded = fanout ** levels if where == "top" else 40_000 * fanout ** 3
    if expanded > 1_000_000:
        assert isinstance(result, InputError)


# --- configs: the named cases ---------------------------------------------------------------------

@pytest.mark.parametrize("text", ["count: " + "[" * 10_000 + "]" * 10_000,
                                  "count: " + "{a: " * 10_000 + "1" + "}" * 10_000,
                                  "".join("  " * i + "a:\n" for i in range(3000)) + "  " * 3000 + "1",
                                  "".join("  " * i + "-\n" for i in range(3000)) + "  " * 3000 + "1"],
                         ids=["flow-seq", "flow-map", "block-map", "block-seq"])
def test_config_deep_yaml_is_an_input_error(config_file, text):
    assert isinstance(check_config(config_file, (text + "\n").encode()), InputError)


@pytest.mark.parametrize("text", ["x: &a [*a]\n", "instruction_filter: &a\n  blacklist: [*a]\n",
                                  "critic: &c\n  pair_rubric: *c\n"], ids=["seq", "map", "nested"])
def test_config_recursive_alias(config_file, text):
    err = check_config(config_file, text.encode())
    assert isinstance(err, InputError) and err.line is not None


@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system ['touch {marker}']",
                                 "!!python/object/new:os.system ['touch {marker}']",
                                 "!!python/name:os.system", "!!python/module:os", "!custom x", "!!omap [a: 1]"])
def test_config_python_tags_never_run(config_file, tag):
    marker = config_file.parent / "pwned"
    err = check_config(config_file, f"count: {tag.format(marker=marker)}\n".encode())
    assert isinstance(err, InputError) and err.line == 1 and not marker.exists()


@pytest.mark.parametrize("text,line,field", [("count: 5\nseed: 1\ncount: 6\n", 3, "count"),
                                             ("model:\n  id: fake:1\n  dtype: auto\n  id: fake:2\n", 4, "model.id"),
                                             ("critic:\n  labels: [A, B]\n  labels: [Yes, No]\n", 3, "critic.labels")])
def test_config_duplicate_key(config_file, text, line, field):
    err = check_config(config_file, text.encode())
    assert isinstance(err, InputError) and err.line == line and err.field == field and "twice" in err.message


def test_config_merge_keys_and_small_aliases_still_work(config_file):
    text = ("instruction_filter:\n  <<: {min_words: 2, max_words: 9}\n  min_words: 3\n"
            "instruction_generation:\n  stop_sequences: [&s END, *s, *s]\n")
    cfg = check_config(config_file, text.encode())
    assert isinstance(cfg, PilotConfig) and cfg.instruction_filter.min_words == 3
    assert cfg.instruction_filter.max_words == 9 and cfg.instruction_generation.stop_sequences == ["END"] * 3


@pytest.mark.parametrize("data", [b"count: 1\x00\n", b"seed: 1\ncount: \x85\x1b\n", b"\xff\xfecount: 1\n",
                                  b"count: \xe9\n", b"\xef\xbb\xbfcount: 7\n", b"", b"---\n...\n",
                                  'instruction_generation:\n  header: "\\ud800"\n'.encode(),
                                  'instruction_filter:\n  blacklist: ["\\u200b", "\\0"]\n'.encode()])
def test_config_unicode_edges(config_file, data):
    result = check_config(config_file, data)
    if data.startswith(b"\xef\xbb\xbf"):
        assert isinstance(result, PilotConfig) and result.count == 7


def test_config_huge_line(config_file):
    result = check_config(config_file, b"instruction_generation:\n  header: " + b"x" * 3_000_000 + b"\n")
    assert isinstance(result, PilotConfig | InputError)


@FEW
@given(text=yaml_like)
def test_scale_config_random_yaml_tokens(tmp_path, text):
    """load_scale_config reads the same files (plus a `scale:` section): same property."""
    path = tmp_path / "scale.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        load_scale_config(config=str(path), pilot=None, overrides={}, scale_over={})
    except InputError as e:
        _assert_input_error(e, path)


def test_shipped_default_config_still_loads():
    assert load_pilot_config(DEFAULT_PILOT_CONFIG).count > 0


@pytest.mark.parametrize("value,line", [("!!int", 2), ("!!int +", 2), ("!!int x", 2), ("!!float x", 2),
                                        ("!!bool x", 2), ("!!timestamp x", 2), ("!!timestamp 2001-02-30", 2),
                                        ("9" * 5000, 2)])
def test_config_bad_tagged_scalar_names_line(config_file, value, line):
    err = check_config(config_file, f"seed: 1\ncount: {value}\n".encode())
    assert isinstance(err, InputError) and err.line == line
