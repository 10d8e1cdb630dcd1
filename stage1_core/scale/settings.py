"""The typed plumbing of a scale run: its `scale:` settings, its config (the pilot schema plus that
section), the pilot it scales from, its shards and the plan `plan.prepare_scale` validates once.

A scale plan is a pilot plan (`stage1_core.phases.plans.PilotPlan`) with more in it, so the pilot's
folder rules, model loading and phase calls take it as they are.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field

from stage1_core.infra.config import PilotConfig, StrictModel
from stage1_core.phases.plans import FileRef, JsonObject, PilotPlan, Record, RunIdentity


class ScaleSettings(StrictModel):
    """The `scale:` section of a scale run's config.yaml (everything else is the pilot schema)."""

    shard_size: int = Field(default=500, gt=0, le=1_000_000, description="kept pairs per shard")
    max_rounds_per_shard: int = Field(default=100, gt=0, description="instruction rounds a shard may use")
    shard_timeout_s: float = Field(default=14400.0, gt=0, description="wait for one stage1/scale-shard run")
    max_parallel_shards: int = Field(default=8, gt=0, description="shard runs in flight under a deployment")
    shard_retries: int = Field(default=2, ge=0, le=10, description="under a deployment: times a lost shard run "
                               "(crashed, silent, failed by infrastructure) is started again (stage1_core.scale.retry)")
    minhash_num_perm: int = Field(default=256, ge=16, le=1024)
    minhash_threshold: float = Field(default=0.2, gt=0.0, lt=1.0, description="Jaccard threshold of the LSH candidates")
    tokens_per_gpu_second: float = Field(default=1000.0, gt=0, description="dry-run throughput without a pilot measurement")
    measure_critic_dev: bool = Field(default=True, description="measure the critic on the shipped dev set in shard 0 "
                                     "(with --from-pilot the pilot's measurement is reused instead)")


class ScaleRunConfig(PilotConfig):
    """A scale run's config.yaml: the pilot schema plus its `scale:` section."""

    scale: ScaleSettings = Field(default_factory=ScaleSettings)


class ShardSpec(Record):
    """Shard `index`: its seed (`plan.shard_seed`) and the kept pairs it must produce."""

    index: int
    seed: int
    size: int


class PilotMeasured(Record):
    """What the pilot measured, for the dry-run estimate (None where its manifest lacks it)."""

    pairs_kept: int | None = None
    tokens_total: int | None = None
    gpu_seconds: float | None = None
    device: str | None = None


class PilotSource(Record):
    """The finished pilot a scale run took its settings from (`--from-pilot`)."""

    path: str
    decision: JsonObject
    """The pilot's final gate: {decision, reasons, failed, ...}."""
    forced: bool
    run_id: str | None = None
    config_hash: str | None = None
    critic_dev: JsonObject | None = None
    measured: PilotMeasured = PilotMeasured()


class ScalePlan(PilotPlan):
    """A validated scale run: nothing is written and no model is loaded to make one."""

    kind: Literal["scale"] = "scale"
    config: ScaleRunConfig
    strict_qc: bool = False
    pilot: PilotSource | None = None
    forced: bool = False
    shards: list[ShardSpec]


class TokenCounts(Record):
    instructions: int
    responses: int
    total: int


class ShardCounts(Record):
    """What a shard generated, kept and rejected (every item is counted once)."""

    instructions_generated: int
    instructions_kept: int
    pairs_generated: int
    rounds: int
    batches: int
    pairs_kept: int
    rejected: int


class ShardManifest(Record):
    """`shards/shard-NNNNN.manifest.json`, written after the shard's three files: the shard counts as
    done only while it names this run's identity, index, seed and size and every file in `files`
    still has its recorded sha256 and rows (`shards.valid_manifest`). Keys a later version adds are
    ignored, so a complete shard stays complete across an upgrade."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    shard: int
    shard_seed: int
    size: int
    identity: RunIdentity
    run_id: str
    created: str
    rows: int
    seconds: float
    device: str
    gpu_seconds: float
    examples_per_s: float | None = None
    tokens: TokenCounts
    counts: ShardCounts
    rejected_by_reason: dict[str, int]
    critic_dev: JsonObject | None = None
    attempts: list[JsonObject] = []
    """Every attempt at this shard in its run, the last being the one that wrote it (`shards.this_attempt`)."""
    files: dict[str, FileRef] = {}
    """data, rejected, completions: their names next to the manifest, rows and sha256."""
