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


def test_shipped_yaml_defaults_equal_the_schema_defaults() -> None:
    """configs/pilot.yaml repeats the schema's defaults for the run options, the model, the sampling
    settings and the QC thresholds, for readability; they must not drift. (Prompts, rubrics and the
    blacklist are content the YAML alone holds.)"""
    shipped = yaml.safe_load(DEFAULT_PILOT_CONFIG.read_text())
    schema = PilotConfig.model_fields
    for key in ("count", "seed", "seeds_path", "max_iterations", "gpu_hour_usd"):
        assert shipped[key] == schema[key].default, key
    sampling = ("max_new_tokens", "temperature", "top_p", "top_k", "stop_sequences")
    for section, keys in (("model", None), ("qc", None), ("instruction_generation", sampling),
                          ("response_generation", sampling)):
        model = schema[section].annotation
        for key, value in shipped[section].items():
            if keys is not None and key not in keys:
                continue
            f = model.model_fields[key]
            default = f.default_factory() if f.default_factory else f.default
            assert value == default, f"{section}.{key}: configs/pilot.yaml {value!r} vs schema {default!r}"
