"""The pilot's options are declared once (stage1_core/phases/options.py, issue 21): the CLI flags, the
config overlay, the error's flag, docs/config.md's table and the YAML defaults all agree with it."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from stage1_core.infra.config import DEFAULT_PILOT_CONFIG, PilotConfig, load_pilot_config
from stage1_core.infra.errors import InputError
from stage1_core.phases import options
from stage1_core.phases.options import CONFIG_FLAGS, PilotOptions

DOCS = Path(__file__).resolve().parents[2] / "docs" / "config.md"


def test_a_config_backed_option_takes_the_config_keys_bounds() -> None:
    for name, key in (("count", "count"), ("seed", "seed"), ("max_iterations", "max_iterations")):
        assert PilotOptions.model_fields[name].json_schema_extra["config_key"] == key
        assert PilotOptions.model_fields[name].default is None  # the config's value stands
    with pytest.raises(ValidationError):
        PilotOptions(count=0)
    with pytest.raises(ValidationError):
        PilotOptions(count=1_000_001)
    with pytest.raises(ValidationError):
        PilotOptions(max_iterations=21)
    assert PilotOptions(count=1_000_000).count == 1_000_000


def test_options_become_a_nested_config_overlay_and_errors_name_the_flag() -> None:
    opts = PilotOptions(count=7, seeds="s.jsonl", model="fake:1", bos_policy="always", allow_pickle=True)
    assert opts.config_overrides() == {"count": 7, "seeds_path": "s.jsonl",
                                       "model": {"id": "fake:1", "bos_policy": "always", "allow_pickle": True}}
    assert PilotOptions(overwrite=True, scale_count=5).config_overrides() == {}
    assert CONFIG_FLAGS == {"count": "--count", "seed": "--seed", "seeds_path": "--seeds", "model.id": "--model",
                            "max_iterations": "--max-iterations", "model.bos_policy": "--bos-policy",
                            "model.allow_pickle": "--allow-pickle"}
    cfg = load_pilot_config(None, PilotOptions(count=9).config_overrides(), flags=CONFIG_FLAGS)
    assert cfg.count == 9
    with pytest.raises(InputError) as e:  # a value the option's type allows but a config check refuses
        load_pilot_config(None, {"model": {"id": ""}}, flags=CONFIG_FLAGS)
    assert e.value.file == "command line"


def test_every_option_with_a_flag_is_a_cli_flag_that_parses_to_its_type() -> None:
    ap = argparse.ArgumentParser()
    options.add_arguments(ap, PilotOptions)
    flags = {f.json_schema_extra["flag"] for f in PilotOptions.model_fields.values() if f.json_schema_extra["flag"]}
    assert flags == {a.option_strings[0] for a in ap._actions if a.option_strings and a.dest != "help"}
    args = ap.parse_args(["--count", "12", "--bos-policy", "never", "--allow-pickle", "--approval-timeout", "5"])
    given = options.from_args(PilotOptions, args)
    assert given == {"count": 12, "bos_policy": "never", "allow_pickle": True, "approval_timeout_s": 5}
    assert options.from_args(PilotOptions, ap.parse_args([])) == {}
    with pytest.raises(SystemExit):
        ap.parse_args(["--bos-policy", "sometimes"])


def test_the_flow_signature_is_the_declaration() -> None:
    sig = options.flow_signature(PilotOptions)
    assert list(sig.parameters) == list(PilotOptions.model_fields)
    assert {n: p.default for n, p in sig.parameters.items()} == {
        n: f.default for n, f in PilotOptions.model_fields.items()}
    doc = options.flow_docstring("Summary.", PilotOptions)
    assert all(f"    {n}: " in doc for n in PilotOptions.model_fields)


@pytest.mark.parametrize("flow", ["pilot", "scale", "sft", "eval"])
def test_docs_option_tables_are_generated_from_the_declarations(flow: str) -> None:
    from stage1_core.cli.options import DOCS as PAGES, OPTIONS

    text = (DOCS.parents[1] / PAGES[flow]).read_text()
    start = text.index("<!-- options table: generated -->\n") + len("<!-- options table: generated -->\n")
    end = text.index("<!-- end options table -->")
    assert text[start:end] == options.markdown_table(OPTIONS[flow]), \
        f"{PAGES[flow]}'s option table is stale: paste `python -m stage1_core.cli.options {flow}` between its markers"


def test_sft_and_eval_options_are_declared_once_too() -> None:
    from stage1_core.train.options import EvalOptions, SFTOptions
    from stage1_core.train.sft import SFTSettings

    assert SFTOptions.model_fields["data"].is_required() and EvalOptions.model_fields["adapter"].is_required()
    sig = options.flow_signature(SFTOptions)
    assert sig.parameters["data"].default is sig.parameters["data"].empty and sig.parameters["seed"].default is None
    assert f"the config's, {SFTSettings.model_fields['seed'].default}" in SFTOptions.model_fields["seed"].description
    with pytest.raises(ValidationError):
        SFTOptions(data="d", seed=-1)
    ap = argparse.ArgumentParser()
    options.add_arguments(ap, EvalOptions)
    with pytest.raises(SystemExit):  # --adapter and --output are required on the command line
        ap.parse_args(["--adapter", "a"])
    assert options.from_args(EvalOptions, ap.parse_args(["--adapter", "a", "--output", "o"])) == {"adapter": "a",
                                                                                                  "output": "o"}


YAML_ONLY = {"instruction_filter.blacklist", "critic.instruction_rubric.example_template",
             "critic.instruction_rubric.examples", "critic.pair_rubric.example_template", "critic.pair_rubric.examples",
             "critic.pair_rubric.labels", "critic.pair_rubric.label_swap", "critic.pair_rubric.order_swap"}
"""Keys of configs/pilot.yaml whose schema default means something else on purpose: content the shipped
rubrics and filter hold (a rubric without examples, an empty blacklist), and the pair rubric's
overrides (null: the critic's own labels and swaps)."""


def _yaml_vs_schema(model: type, data: dict, path: str = "") -> list[str]:
    from pydantic import BaseModel

    drift = []
    for key, value in data.items():
        f, dotted = model.model_fields[key], path + key
        nested = f.annotation if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel) else None
        if nested is not None and isinstance(value, dict):
            drift += _yaml_vs_schema(nested, value, dotted + ".")
        elif not f.is_required() and dotted not in YAML_ONLY:
            default = f.default_factory() if f.default_factory else f.default
            default = list(default) if isinstance(default, tuple) else default
            if value != default:
                drift.append(f"{dotted}: configs/pilot.yaml {value!r} vs schema {default!r}")
    return drift


def test_shipped_yaml_defaults_equal_the_schema_defaults() -> None:
    """configs/pilot.yaml repeats the schema's defaults, for readability: every key it sets that has a
    schema default must equal it (a config built in code, `CriticConfig(...)`, gets what a run gets),
    but the content keys the YAML alone holds (YAML_ONLY). Keys without a schema default (prompts,
    rubric templates) live only in the YAML."""
    shipped = yaml.safe_load(DEFAULT_PILOT_CONFIG.read_text())
    assert _yaml_vs_schema(PilotConfig, shipped) == []
    assert {"count", "model", "critic", "qc"} <= set(shipped)  # the walk saw the sections it checks


def test_the_yaml_drift_check_sees_a_changed_default() -> None:
    shipped = yaml.safe_load(DEFAULT_PILOT_CONFIG.read_text())
    shipped["critic"]["pmi"]["weight"] = 0.5
    shipped["critic"]["order_swap"] = not shipped["critic"]["order_swap"]
    assert _yaml_vs_schema(PilotConfig, shipped) == ["critic.order_swap: configs/pilot.yaml False vs schema True",
                                                     "critic.pmi.weight: configs/pilot.yaml 0.5 vs schema 0.01"]


