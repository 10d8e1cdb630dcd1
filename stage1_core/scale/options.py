"""The scale run's options, each declared once (`stage1_core.infra.options`): `flows.scale.scale` takes
its signature from `ScaleOptions`, the CLI its flags, docs/scale.md its option table (a test keeps the
page equal). Options that override a config key take that key's bounds from the pilot schema or the
`scale:` section (`ScaleSettings`), and default to the config's value."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic.fields import FieldInfo

from stage1_core.infra.config import PilotConfig, StrictModel
from stage1_core.infra.options import RunKey, config_field, from_config, opt
from stage1_core.scale.settings import ScaleSettings


def _field(key: str) -> FieldInfo:
    """The pilot schema's field, or the `scale:` section's (ScaleSettings) for "scale.<key>"."""
    if key.startswith("scale."):
        return config_field(ScaleSettings, key.removeprefix("scale."))
    return config_field(PilotConfig, key)


def _cfg(key: str, flag: str, help: str, metavar: str | None = None) -> Any:
    return from_config(_field(key), key, flag, help=help, metavar=metavar)


def _b(key: str) -> list[Any]:
    return list(_field(key).metadata)


class ScaleOptions(StrictModel):
    """One scale run's options."""

    count: Annotated[int, *_b("count")] | None = opt(
        None, "--count", "examples to generate (required, unless --config names a scale run's config.yaml)",
        metavar="N")
    shard_size: Annotated[int, *_b("scale.shard_size")] | None = _cfg("scale.shard_size", "--shard-size",
                                                                      "kept pairs per shard", "N")
    output: str | None = opt(None, "--output", "output folder; rerunning with the same folder resumes (under a "
                             "deployment default ${STAGE1_OUTPUT_ROOT}/{deployment}/{flow run name or run_key})",
                             metavar="DIR", cli_required=True)
    seed: Annotated[int, *_b("seed")] | None = _cfg(
        "seed", "--seed", "run seed; shard i's seed derives from it and i (the pilot's with --from-pilot; under a "
        "deployment the scheduled start time in epoch seconds)", "N")
    config: str | None = opt(None, "--config", "YAML merged over configs/pilot.yaml, with an optional scale: "
                             "section (a run's config.yaml)", metavar="PATH")
    from_pilot: str | None = opt(None, "--from-pilot", "use the settings a finished pilot ended with; refused unless "
                                 "its gate said scale", metavar="DIR")
    force: bool = opt(False, "--force", "with --from-pilot: scale even though the gate did not say scale (recorded "
                      "as forced in the manifest)")
    model: str | None = _cfg("model.id", "--model", "as for the pilot: embedded:gemma-3-270m, a folder, a .gguf, "
                             "fake:<seed>", "ID")
    seeds: str | None = _cfg("seeds_path", "--seeds", "seed tasks (default: the packaged Self-Instruct seeds)", "PATH")
    strict_qc: bool = opt(False, "--strict-qc", "exit 4 when the merged data fails QC")
    overwrite: bool = opt(False, "--overwrite", "replace an output folder of another run identity")
    gpu_hour_usd: Annotated[float, *_b("gpu_hour_usd")] | None = _cfg(
        "gpu_hour_usd", "--gpu-hour-usd", "price of one GPU-hour for the cost estimate", "USD")
    shard_timeout_s: Annotated[float, *_b("scale.shard_timeout_s")] | None = _cfg(
        "scale.shard_timeout_s", "--shard-timeout-s", "under a deployment: how long to wait for one "
        "stage1/scale-shard run", "SECONDS")
    shard_retries: Annotated[int, *_b("scale.shard_retries")] | None = _cfg(
        "scale.shard_retries", "--shard-retries", "under a deployment: times a lost shard run (crashed, silent, "
        "failed by infrastructure) is started again; bad input and out-of-memory never are", "N")
    bos_policy: Literal["auto", "always", "never"] | None = _cfg("model.bos_policy", "--bos-policy",
                                                               "prepend BOS? (as the pilot)")
    allow_pickle: bool | None = _cfg("model.allow_pickle", "--allow-pickle",
                                     "allow pickle weights (.bin/.pt) for --model")
    run_key: RunKey | None = opt(None, None, "under a deployment without output: write to "
                                 "${STAGE1_OUTPUT_ROOT}/{deployment}/{run_key}, so rerunning a crashed run with the "
                                 "same key resumes its finished shards")
