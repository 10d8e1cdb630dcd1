"""The pilot's options, each declared once (`stage1_core.infra.options`): name, type, bounds, default,
meaning, CLI flag and the config key it overrides. From `PilotOptions` derive the flow's parameters
(`flows.pilot.pilot` takes its signature from here, so the Prefect parameter schema, the deployment
form and the validation at the flow's edge are this declaration), the CLI flags, the config overlay of
a run (`PilotOptions.config_overrides`), the flag an error names (`CONFIG_FLAGS`) and the option table
of docs/config.md (a test keeps the page equal to it).

An option that overrides a config key (count, seed, ...) takes its type, bounds, default and meaning
from that key of `PilotConfig`, so the YAML's key and the flag cannot drift apart.

    python -m stage1_core.cli.options     # prints the table
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field
from pydantic.fields import FieldInfo

from stage1_core.infra.config import PilotConfig, StrictModel
from stage1_core.infra.options import (RUN_KEY_PATTERN, RunKey, add_arguments, config_field, flow_docstring,
                                       flow_signature, from_args, markdown_table, opt)
from stage1_core.infra.options import from_config as _from_config_field

__all__ = ["CONFIG_FLAGS", "LOCAL_OUTPUT", "PilotOptions", "RUN_KEY_PATTERN", "add_arguments", "flow_docstring",
           "flow_signature", "from_args", "markdown_table"]

LOCAL_OUTPUT = "artifacts/pilot"


def _config_field(key: str) -> FieldInfo:
    return config_field(PilotConfig, key)


def _from_config(key: str, flag: str, *, help: str, metavar: str | None = None) -> Any:
    return _from_config_field(_config_field(key), key, flag, help=help, metavar=metavar)


def _bounds(key: str) -> list[Any]:
    return list(_config_field(key).metadata)


class PilotOptions(StrictModel):
    """One pilot run's options (the flow's parameters; the CLI's flags)."""

    count: Annotated[int, *_bounds("count")] | None = _from_config(
        "count", "--count", metavar="N",
        help="candidate pairs: instructions that pass filtering and get a response")
    output: str | None = opt(None, "--output", f"output folder (default {LOCAL_OUTPUT}; under a deployment "
                              "${STAGE1_OUTPUT_ROOT}/{deployment}/{flow run name or run_key})", metavar="PATH")
    seed: Annotated[int, *_bounds("seed")] | None = _from_config("seed", "--seed", metavar="N",
                                                           help="run seed: seed sampling, generation")
    seeds: str | None = _from_config("seeds_path", "--seeds", metavar="PATH",
                                     help="seed tasks, JSON Lines (ours or Self-Instruct format); default: the "
                                          "packaged 175 Self-Instruct tasks")
    config: str | None = opt(None, "--config", "YAML config merged over configs/pilot.yaml (a run's config.yaml "
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
    overwrite: bool = opt(False, "--overwrite", "replace an output folder that belongs to another run (different "
                           "config, seeds or model)")
    scale_count: Annotated[int, Field(ge=0, le=10_000_000)] = opt(
        0, "--scale-count", "when the final decision is scale, print the command that scales to N examples (under "
        "the stage1/pilot deployment the scale run is started for you)", metavar="N")
    require_approval: bool = opt(False, "--require-approval", "ask before a scale verdict counts: on the terminal "
                                  "(exit 2 when stdin is not a terminal), or suspended for the Prefect UI under a "
                                  "deployment")
    approval_timeout_s: Annotated[int, Field(gt=0)] = opt(
        86_400, "--approval-timeout", "no answer within this many seconds records 'rejected (timeout)'",
        metavar="SECONDS")
    run_key: RunKey | None = opt(
        None, None, "under a deployment without output: write to ${STAGE1_OUTPUT_ROOT}/{deployment}/{run_key}, so "
        "rerunning a crashed run with the same key resumes it")
    then: str | None = opt(None, "--then", "sft or sft,eval: when the final decision is scale, train a LoRA adapter "
                            "on the kept pairs (into OUTPUT-sft) and evaluate it (into OUTPUT-eval); any other "
                            "decision stops the chain", metavar="STEPS")
    sft_config: str | None = opt(None, "--sft-config", "with --then: YAML over configs/sft.yaml", metavar="PATH")
    eval_config: str | None = opt(None, "--eval-config", "with --then: YAML over configs/eval.yaml", metavar="PATH")

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
