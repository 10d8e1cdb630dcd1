"""The typed plumbing of a pilot run: the plan `run.prepare_pilot` validates once, one call per phase
(its params and inputs typed per phase) and the manifest each phase returns.

    plan = run.prepare_pilot(opts)                                   # PilotPlan (InputError on bad input)
    call = run.make_call(plan, "generate_responses", meta=..., iteration=1, inputs={"kept": kept})
    manifest = pipeline.run_phase(call)                              # ResponsesManifest

Everything here is a frozen pydantic record (but `IterationRecord`, which the pilot flow fills in
after an `iterate`), built from parts that are already valid (the config sections of the plan, files
the phases wrote), so nothing is checked twice, and any field a phase reads is an attribute, not a key. The cache key hashes a call's `model_dump(mode="json")`
(`pipeline.cache_key`). Documents that the run writes as JSON files (a QC summary, the critic's
dev-set measurement) stay JSON objects (`JsonObject`) inside the manifests that carry them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, JsonValue

from stage1_core.infra import storage
from stage1_core.infra.config import (CriticConfig, InstructionFilterConfig, InstructionGenerationConfig, ModelConfig,
                                      PilotConfig, QCThresholds, ResponseGenerationConfig)
from stage1_core.infra.schemas import GenerationParams

JsonObject = dict[str, JsonValue]
"""A JSON document a phase writes and a manifest carries as it is (a QC summary, a dev-set measurement)."""
FolderState = Literal["new", "resume", "overwrite"]
PhaseName = Literal["generate_instructions", "filter_instructions", "generate_responses", "filter_pairs", "qc"]


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileRef(Record):
    """A file a phase wrote: its path, JSONL rows (None for other files) and sha256."""

    path: str
    rows: int | None
    sha256: str

    @classmethod
    def of(cls, path: str | Path, rows: int | None = None) -> FileRef:
        """The reference of a written file (`storage.file_manifest`)."""
        return cls.model_validate(storage.file_manifest(path, rows))


class RunIdentity(Record):
    """What makes two runs the same run: a folder of another identity is not resumed."""

    config_sha256: str
    seeds_sha256: str
    model_weights_sha256: str


class SeedsSummary(Record):
    """The seed file of a run (`SeedSet.summary`)."""

    path: str
    format: str
    count: int
    usable: int
    sha256: str


class ModelRecord(BaseModel):
    """The model's fingerprint (`stage1_core.model.model_fingerprint`): id and weights sha256 always,
    the rest (kind, path, revision, family, bos_policy, dtype, ...) as the model kind has them."""

    model_config = ConfigDict(extra="allow", frozen=True)

    id: str
    weights_sha256: str


class RunMeta(Record):
    """Recorded in a phase's outputs, never part of its cache key."""

    run_id: str | None = None
    git_sha: str | None = None
    config_hash: str | None = None


class PilotPlan(Record):
    """A validated pilot run: nothing is written and no model is loaded to make one."""

    config: PilotConfig
    config_hash: str
    output: str
    folder_state: FolderState
    seeds: SeedsSummary
    model: ModelRecord
    identity: RunIdentity
    config_source: str | None = None


class GenerationRecord(Record):
    """The sampling settings of both generation phases, as provenance and the qc key record them."""

    instruction: GenerationParams
    response: GenerationParams

    @classmethod
    def of(cls, ig: InstructionGenerationConfig, rg: ResponseGenerationConfig) -> GenerationRecord:
        return cls(instruction=ig.sampling(), response=rg.sampling())


# -- params and inputs, one pair per phase -----------------------------------------------------------
class GenerateInstructionsParams(Record):
    instruction_generation: InstructionGenerationConfig
    seeds_path: str | None
    seeds_sha256: str
    seed: int
    round: int
    instructions_since: int | None = None
    """Set from the second instruction settings on: names the rerun's rounds apart from the first ones."""


class GenerateInstructionsInputs(Record):
    kept_before: FileRef | None = None
    """The kept pool so far, when prompts mix in machine instructions (`run.instruction_inputs`)."""


class FilterInstructionsParams(Record):
    instruction_filter: InstructionFilterConfig
    critic: CriticConfig
    seeds_path: str | None
    seeds_sha256: str
    round: int
    instructions_since: int | None = None


class FilterInstructionsInputs(Record):
    generated: FileRef
    kept_before: FileRef | None = None


class GenerateResponsesParams(Record):
    response_generation: ResponseGenerationConfig
    count: int
    seed: int
    iteration: int


class GenerateResponsesInputs(Record):
    kept: FileRef


class FilterPairsParams(Record):
    critic: CriticConfig
    iteration: int
    measure_dev: bool = True
    """Measure the critic on the shipped dev set (a scale run measures it once, in shard 0)."""


class FilterPairsInputs(Record):
    responses: FileRef


class QCParams(Record):
    qc: QCThresholds
    count: int
    seed: int
    iteration: int
    max_iterations: int
    model_id: str
    model_sha: str
    generation: GenerationRecord
    critic_dev: JsonObject | None = None


class QCInputs(Record):
    generated: list[FileRef]
    instruction_rejected: list[FileRef]
    kept: FileRef
    responses: FileRef
    pairs_kept: FileRef
    pairs_rejected: FileRef


# -- calls -----------------------------------------------------------------------------------------
class PhaseCall(Record):
    """One phase's call: what it depends on (params, inputs, model) and where it writes.

    `model` is loaded lazily, only when the phase really runs; `meta` is recorded in outputs only.
    """

    phase: PhaseName
    out_dir: str
    params: Record
    inputs: Record
    model: ModelConfig
    model_sha: str
    meta: RunMeta = RunMeta()

    @property
    def round(self) -> int | None:
        return getattr(self.params, "round", None)

    @property
    def iteration(self) -> int | None:
        return getattr(self.params, "iteration", None)

    @property
    def instructions_since(self) -> int | None:
        return getattr(self.params, "instructions_since", None)

    def label(self) -> str:
        """The task run's name (`phase_label`)."""
        return phase_label(self.phase, self.round, self.iteration, self.instructions_since)


def phase_label(phase: str, round: int | None, iteration: int | None, instructions_since: int | None) -> str:
    """`phase-round-NN[-iter-NN]` (phases 1-2; `-iter-NN` names a rerun's instruction settings) or
    `phase-iter-NN` (phases 3-5): a phase task run's name and its key in a run's timings."""
    suffix = f"-round-{round:02d}" if round is not None else f"-iter-{iteration or 0:02d}"
    return phase + suffix + (f"-iter-{instructions_since:02d}" if instructions_since else "")


class GenerateInstructionsCall(PhaseCall):
    phase: Literal["generate_instructions"] = "generate_instructions"
    params: GenerateInstructionsParams
    inputs: GenerateInstructionsInputs = GenerateInstructionsInputs()


class FilterInstructionsCall(PhaseCall):
    phase: Literal["filter_instructions"] = "filter_instructions"
    params: FilterInstructionsParams
    inputs: FilterInstructionsInputs


class GenerateResponsesCall(PhaseCall):
    phase: Literal["generate_responses"] = "generate_responses"
    params: GenerateResponsesParams
    inputs: GenerateResponsesInputs


class FilterPairsCall(PhaseCall):
    phase: Literal["filter_pairs"] = "filter_pairs"
    params: FilterPairsParams
    inputs: FilterPairsInputs


class QCCall(PhaseCall):
    phase: Literal["qc"] = "qc"
    params: QCParams
    inputs: QCInputs


CALLS: dict[str, type[PhaseCall]] = {c.model_fields["phase"].default: c for c in (
    GenerateInstructionsCall, FilterInstructionsCall, GenerateResponsesCall, FilterPairsCall, QCCall)}
"""The call type of each phase, by name."""


# -- manifests -------------------------------------------------------------------------------------
class PhaseManifest(Record):
    """What a phase returns: its output files, the compute seconds, the run that computed it (a cache
    hit keeps the earlier run's id), and the round/iteration it belongs to."""

    phase: PhaseName
    outputs: dict[str, FileRef]
    seconds: float = 0.0
    run_id: str | None = None
    round: int | None = None
    iteration: int | None = None
    instructions_since: int | None = None

    def label(self) -> str:
        """The name of the call that made it (`phase_label`)."""
        return phase_label(self.phase, self.round, self.iteration, self.instructions_since)


class InstructionRoundManifest(PhaseManifest):
    tokens: int
    prompts: int
    generated: int


class InstructionFilterManifest(PhaseManifest):
    kept_total: int
    generated: int
    accepted: int
    heuristic_or_dup: int
    critic_rejected: int


class ResponsesManifest(PhaseManifest):
    tokens: int
    prompts: int


class PairFilterManifest(PhaseManifest):
    critic_dev: JsonObject | None = None


class Gate(Record):
    """An iteration's gate verdict (`qc.GateDecision`)."""

    decision: Literal["scale", "iterate", "halt"]
    reasons: list[str]
    failed: list[str]


class QCManifest(PhaseManifest):
    decision: Gate
    summary: JsonObject
    median_response_tokens: float | None = None


class IterationRecord(BaseModel):
    """One pass of phases 3-5 in the pilot flow, with the settings it used and (after `iterate`) the
    settings the adjustment table chose for the next one."""

    model_config = ConfigDict(extra="forbid")

    qc: QCManifest
    settings: ResponseGenerationConfig
    instruction_settings: InstructionGenerationConfig
    instructions_dir: str
    changes: list[str] = []
    next_settings: ResponseGenerationConfig | None = None
    next_instruction_settings: InstructionGenerationConfig | None = None
