"""The pilot's options, each declared once: name, type, bounds, default, meaning, CLI flag and the
config key it overrides. Everything else derives from `PilotOptions`:

- the flow's parameters (`flow_signature`: `flows.pilot.pilot` takes its signature from here, so the
  Prefect parameter schema, the deployment form and the validation at the flow's edge are this
  declaration),
- the CLI flags (`add_arguments`),
- the config overlay of a run (`PilotOptions.config_overrides`) and the flag an error names
  (`CONFIG_FLAGS`),
- the option table of docs/config.md (`markdown_table`; a test keeps the page equal to it).

An option that overrides a config key (count, seed, ...) takes its type, bounds, default and meaning
from that key of `PilotConfig`, so the YAML's key and the flag cannot drift apart.

    python -m stage1_core.cli.options     # prints the table
"""

from __future__ import annotations

import argparse
import inspect
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import Field
from pydantic.fields import FieldInfo

from stage1_core.infra.config import ModelConfig, PilotConfig, StrictModel

RUN_KEY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
"""A run key is one folder name: letters, digits, '.', '_', '-' (the schema refuses anything else)."""
LOCAL_OUTPUT = "artifacts/pilot"


def _config_field(key: str) -> FieldInfo:
    model: Any = PilotConfig
    *parents, leaf = key.split(".")
    for part in parents:
        model = {"model": ModelConfig}[part]
    return model.model_fields[leaf]


def _from_config(key: str, flag: str, *, help: str, metavar: str | None = None) -> Any:
    """An option that overrides config key `key` (its type and bounds come from the key). Its default
    is None: the config's value stands (configs/pilot.yaml, or the run's --config file)."""
    default = _config_field(key).default
    shown = f" (default: the config's, {default})" if default not in (None, False) else ""
    return Field(default=None, description=help + shown,
                 json_schema_extra={"flag": flag, "config_key": key, "metavar": metavar})


def _opt(default: Any, flag: str | None, help: str, metavar: str | None = None, **bounds: Any) -> Any:
    return Field(default=default, description=help, json_schema_extra={"flag": flag, "metavar": metavar}, **bounds)


def _bounds(key: str) -> list[Any]:
    return list(_config_field(key).metadata)


class PilotOptions(StrictModel):
    """One pilot run's options (the flow's parameters; the CLI's flags)."""

    count: Annotated[int, *_bounds("count")] | None = _from_config(
        "count", "--count", metavar="N",
        help="candidate pairs: instructions that pass filtering and get a response")
    output: str | None = _opt(None, "--output", f"output folder (default {LOCAL_OUTPUT}; under a deployment "
                              "${STAGE1_OUTPUT_ROOT}/{deployment}/{flow run name or run_key})", metavar="PATH")
    seed: Annotated[int, *_bounds("seed")] | None = _from_config("seed", "--seed", metavar="N",
                                                           help="run seed: seed sampling, generation")
    seeds: str | None = _from_config("seeds_path", "--seeds", metavar="PATH",
                                     help="seed tasks, JSON Lines (ours or Self-Instruct format); default: the "
                                          "packaged 175 Self-Instruct tasks")
    config: str | None = _opt(None, "--config", "YAML config merged over configs/pilot.yaml (a run's config.yaml "
                              "reproduces it)", metavar="PATH")
    model: str | None = _from_config("model.id", "--model", metavar="ID",
                                     help="embedded:gemma-3-270m (default), a local HF folder, a .gguf file, a model "
                                          "id already in the local HF cache (never downloaded), or fake:<seed> for tests")
    max_iterations: Annotated[int, *_bounds("max_iterations")] | None = _from_config(
        "max_iterations", "--max-iterations", metavar="N",
        help="reruns the gate may ask for; 0 surfaces 'iterate' as exit 3")
    bos_policy: Literal["auto", "always", "never"] | None = _from_config(
        "model.bos_policy", "--bos-policy",
        help="prepend BOS? auto uses the per-family table; required for unknown families")
    allow_pickle: bool | None = _from_config(
        "model.allow_pickle", "--allow-pickle",
        help="allow pickle weights (.bin/.pt) for --model; refused by default (they can run code)")
    overwrite: bool = _opt(False, "--overwrite", "replace an output folder that belongs to another run (different "
                           "config, seeds or model)")
    scale_count: Annotated[int, Field(ge=0, le=10_000_000)] = _opt(
        0, "--scale-count", "when the final decision is scale, print the command that scales to N examples (under "
        "the stage1/pilot deployment the scale run is started for you)", metavar="N")
    require_approval: bool = _opt(False, "--require-approval", "ask before a scale verdict counts: on the terminal "
                                  "(exit 2 when stdin is not a terminal), or suspended for the Prefect UI under a "
                                  "deployment")
    approval_timeout_s: Annotated[int, Field(gt=0)] = _opt(
        86_400, "--approval-timeout", "no answer within this many seconds records 'rejected (timeout)'",
        metavar="SECONDS")
    run_key: Annotated[str, Field(pattern=RUN_KEY_PATTERN)] | None = _opt(
        None, None, "under a deployment without output: write to ${STAGE1_OUTPUT_ROOT}/{deployment}/{run_key}, so "
        "rerunning a crashed run with the same key resumes it")
    then: str | None = _opt(None, "--then", "sft or sft,eval: when the final decision is scale, train a LoRA adapter "
                            "on the kept pairs (into OUTPUT-sft) and evaluate it (into OUTPUT-eval); any other "
                            "decision stops the chain", metavar="STEPS")
    sft_config: str | None = _opt(None, "--sft-config", "with --then: YAML over configs/sft.yaml", metavar="PATH")
    eval_config: str | None = _opt(None, "--eval-config", "with --then: YAML over configs/eval.yaml", metavar="PATH")

    def config_overrides(self) -> dict[str, Any]:
        """The options that override config keys, as a nested overlay (None = not given)."""
        over: dict[str, Any] = {}
        for name, f in type(self).model_fields.items():
            key = (f.json_schema_extra or {}).get("config_key")
            value = getattr(self, name)
            if key is None or value is None:
                continue
            node = over
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        return over


CONFIG_FLAGS: dict[str, str] = {f.json_schema_extra["config_key"]: f.json_schema_extra["flag"]  # type: ignore[index]
                                for f in PilotOptions.model_fields.values()
                                if (f.json_schema_extra or {}).get("config_key")}
"""Config key -> the CLI flag that sets it (an override's error says "correct --count")."""


def _extra(f: FieldInfo) -> dict[str, Any]:
    return dict(f.json_schema_extra or {})  # type: ignore[arg-type]


def flow_signature(options: type[StrictModel]) -> inspect.Signature:
    """The flow's signature: one keyword parameter per option, its annotation carrying the bounds
    (Prefect validates a run's parameters against it and builds the deployment's schema from it)."""
    params = []
    for name, f in options.model_fields.items():
        ann = f.annotation
        if f.metadata:
            ann = Annotated[(ann, *f.metadata)]  # type: ignore[valid-type]
        params.append(inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=f.default, annotation=ann))
    return inspect.Signature(params, return_annotation=dict[str, Any])


def flow_docstring(summary: str, options: type[StrictModel]) -> str:
    """A docstring whose Args are the options' meanings (Prefect shows them in the deployment form)."""
    lines = [summary, "", "Args:"]
    lines += [f"    {name}: {f.description}" for name, f in options.model_fields.items()]
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser, options: type[StrictModel]) -> None:
    """One CLI flag per option that has one. A flag not given parses as None (the flow's default, or
    the config's value for a config key); a boolean is a switch."""
    for name, f in options.model_fields.items():
        extra = _extra(f)
        if not extra.get("flag"):
            continue
        default = f.default if f.default is not None else None
        help_text = f.description + (f" (default {default})" if default not in (None, False) else "")
        kw: dict[str, Any] = {"dest": name, "default": None, "help": help_text.replace("%", "%%")}
        base = _base_type(f.annotation)
        if base is bool:
            kw["action"] = "store_true"
        else:
            choices = _choices(f.annotation)
            if choices:
                kw["choices"] = choices
            else:
                kw["type"] = base
            if extra.get("metavar"):
                kw["metavar"] = extra["metavar"]
        parser.add_argument(extra["flag"], **kw)


def from_args(options: type[StrictModel], args: argparse.Namespace) -> dict[str, Any]:
    """The flow parameters the CLI's flags give: only those given (a switch not given is left out)."""
    out = {}
    for name in options.model_fields:
        value = getattr(args, name, None)
        if value is not None and value is not False:
            out[name] = value
    return out


def _base_type(ann: Any) -> Any:
    """The Python type a flag parses to: int for `Annotated[int, ...] | None`, str for a Literal."""
    origin = get_origin(ann)
    if origin is Annotated:
        return _base_type(get_args(ann)[0])
    if origin in (Union, UnionType):
        return _base_type(next(a for a in get_args(ann) if a is not type(None)))
    if origin is Literal:
        return type(get_args(ann)[0])
    return ann


def _choices(ann: Any) -> list[Any] | None:
    origin = get_origin(ann)
    if origin is Literal:
        return list(get_args(ann))
    if origin in (Union, UnionType, Annotated):
        for a in get_args(ann):
            found = _choices(a) if a is not type(None) else None
            if found:
                return found
    return None


def markdown_table(options: type[StrictModel]) -> str:
    """The options as docs/config.md shows them: flag, flow parameter, default, config key, meaning."""
    rows = ["| flag | flow parameter | default | config key | meaning |", "|---|---|---|---|---|"]
    for name, f in options.model_fields.items():
        extra = _extra(f)
        flag = f"`{extra['flag']}`" if extra.get("flag") else "— (deployments)"
        meaning = f.description or ""
        if extra.get("config_key"):
            cfg_default = _config_field(extra["config_key"]).default
            default = f"config's (`{cfg_default}`)"
            meaning = meaning.split(" (default: the config's")[0]
        else:
            default = f"`{f.default}`"
        key = f"`{extra['config_key']}`" if extra.get("config_key") else "—"
        rows.append(f"| {flag} | `{name}` | {default} | {key} | {meaning.replace('|', '/')} |")
    return "\n".join(rows) + "\n"
