"""Options declared once: a flow's options are one pydantic model (`StrictModel`) whose fields carry
their type, bounds, default and meaning, plus in `json_schema_extra` the CLI flag (`flag`, None for a
deployment-only option), `metavar`, `cli_required` (required on the command line, where the flow
derives a default under a deployment) and the config key an option overrides (`config_key`).
From that one declaration come:

- the flow's signature (`flow_signature`, keyword-only, since the body takes `**params`; Prefect builds its parameter schema, the deployment form
  and the flow-edge validation from it) and its docstring's Args (`flow_docstring`),
- the CLI flags (`add_arguments`) and the flow parameters a command line gives (`from_args`),
- the option table of the docs (`markdown_table`).

The pilot's options: `stage1_core.phases.options`; SFT's and eval's: `stage1_core.train.options`.
"""

from __future__ import annotations

import argparse
import inspect
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import Field
from pydantic.fields import FieldInfo

from stage1_core.infra.config import StrictModel

RUN_KEY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
"""A run key is one folder name: letters, digits, '.', '_', '-' (the schema refuses anything else)."""

RunKey = Annotated[str, Field(pattern=RUN_KEY_PATTERN)]


def opt(default: Any, flag: str | None, help: str, metavar: str | None = None, *, cli_required: bool = False,
        **bounds: Any) -> Any:
    """One option's field: its default, CLI flag (None: deployments only), meaning and bounds."""
    return Field(default=default, description=help, json_schema_extra={"flag": flag, "metavar": metavar,
                                                                       "cli_required": cli_required}, **bounds)


def config_field(model: Any, key: str) -> FieldInfo:
    """The schema field of a dotted config key under `model` ("model.id" -> ModelConfig's `id`),
    following the nested sections' types."""
    *parents, leaf = key.split(".")
    for part in parents:
        model = model.model_fields[part].annotation
    return model.model_fields[leaf]


def from_config(field: FieldInfo, key: str, flag: str, *, help: str, metavar: str | None = None) -> Any:
    """An option that overrides config key `key` (`field`, that key's schema field: the option takes
    its type and bounds from it). Its default is None: the config's value stands."""
    default = field.default
    shown = f" (default: the config's, {default})" if default not in (None, False) else ""
    return Field(default=None, description=help + shown,
                 json_schema_extra={"flag": flag, "config_key": key, "metavar": metavar, "config_default": default})


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
        default = inspect.Parameter.empty if f.is_required() else f.default
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=ann))
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
        default = None if f.is_required() else f.default
        help_text = f.description + (f" (default {default})" if default not in (None, False) else "")
        kw: dict[str, Any] = {"dest": name, "default": None, "help": help_text.replace("%", "%%")}
        if f.is_required() or extra.get("cli_required"):
            kw["required"] = True
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
    """The options as the docs show them: flag, flow parameter, default, config key, meaning."""
    rows = ["| flag | flow parameter | default | config key | meaning |", "|---|---|---|---|---|"]
    for name, f in options.model_fields.items():
        extra = _extra(f)
        flag = f"`{extra['flag']}`" if extra.get("flag") else "— (deployments)"
        meaning = f.description or ""
        if extra.get("config_key"):
            cfg_default = extra.get("config_default")
            default = f"config's (`{cfg_default}`)"
            meaning = meaning.split(" (default: the config's")[0]
        else:
            default = "required" if f.is_required() else f"`{f.default}`"
        key = f"`{extra['config_key']}`" if extra.get("config_key") else "—"
        rows.append(f"| {flag} | `{name}` | {default} | {key} | {meaning.replace('|', '/')} |")
    return "\n".join(rows) + "\n"
