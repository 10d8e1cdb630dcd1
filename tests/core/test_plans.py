"""The typed plumbing of a run (stage1_core.phases.plans, issue 21): a phase's call carries the plan's
validated config sections themselves (count and temperature travel as fields of one typed object,
never re-parsed), refuses inputs that are not its phase's, cannot be changed once built, and keys
the same after a JSON round trip (how a result store or a deployment would see it)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from stage1_core.infra.config import load_pilot_config
from stage1_core.phases import pipeline, run
from stage1_core.phases.plans import (CALLS, FileRef, GenerateResponsesCall, ModelRecord, PhaseCall, PilotPlan,
                                      QCCall, RunIdentity, RunMeta, SeedsSummary)


def _plan(tmp_path: Path, **over: object) -> PilotPlan:
    cfg = load_pilot_config(None, {"model": {"id": "fake:1"}, **over})
    return PilotPlan(config=cfg, config_hash="ef" * 32, output=str(tmp_path), folder_state="new",
                     seeds=SeedsSummary(path="seeds.jsonl", format="stage1", count=10, usable=10, sha256="01" * 32),
                     model=ModelRecord(id="fake:1", weights_sha256="cd" * 32),
                     identity=RunIdentity(config_sha256="ef" * 32, seeds_sha256="01" * 32, model_weights_sha256="cd" * 32))


REF = FileRef(path="/x/kept.jsonl", rows=3, sha256="ab" * 32)


def test_count_and_temperature_travel_as_fields_of_the_plans_config(tmp_path):
    plan = _plan(tmp_path, count=37, response_generation={"temperature": 0.3})
    call = run.make_call(plan, "generate_responses", meta=RunMeta(run_id="r"), iteration=1, inputs={"kept": REF})
    assert isinstance(call, GenerateResponsesCall)
    assert call.params.count == 37
    assert call.params.response_generation is plan.config.response_generation  # the validated section itself
    assert call.params.response_generation.sampling().temperature == 0.3  # what the backend is handed
    assert Path(call.out_dir) == tmp_path / "iterations" / "01"


@pytest.mark.parametrize("phase", sorted(CALLS))
def test_each_phase_gets_its_own_call_type(tmp_path, phase):
    inputs = {"generate_instructions": {}, "filter_instructions": {"generated": REF},
              "generate_responses": {"kept": REF}, "filter_pairs": {"responses": REF},
              "qc": {"generated": [REF], "instruction_rejected": [REF], "kept": REF, "responses": REF,
                     "pairs_kept": REF, "pairs_rejected": REF}}[phase]
    call = run.make_call(_plan(tmp_path), phase, meta=RunMeta(), round=1, iteration=1, inputs=inputs)
    assert type(call) is CALLS[phase] and call.phase == phase


def test_inputs_of_another_phase_are_refused_when_the_call_is_built(tmp_path):
    with pytest.raises(ValidationError, match="kept"):
        run.make_call(_plan(tmp_path), "generate_responses", meta=RunMeta(), iteration=1, inputs={"responses": REF})
    with pytest.raises(ValueError, match="unknown phase"):
        run.make_call(_plan(tmp_path), "train", meta=RunMeta())


def test_a_call_cannot_be_changed_once_built(tmp_path):
    call = run.make_call(_plan(tmp_path), "filter_pairs", meta=RunMeta(), iteration=2, inputs={"responses": REF})
    with pytest.raises(ValidationError):
        call.out_dir = "/elsewhere"  # type: ignore[misc]
    assert call.params.measure_dev is True and call.label() == "filter_pairs-iter-02"


def test_a_call_keys_the_same_after_a_json_round_trip(tmp_path):
    plan = _plan(tmp_path)
    call = run.make_call(plan, "qc", meta=RunMeta(run_id="r"), iteration=1, critic_dev={"accuracy": 0.8, "n": 10},
                         inputs={"generated": [REF, REF], "instruction_rejected": [REF], "kept": REF, "responses": REF,
                                 "pairs_kept": REF, "pairs_rejected": REF})
    again = QCCall.model_validate_json(call.model_dump_json())
    assert again == call and pipeline.cache_key(again) == pipeline.cache_key(call)
    other = run.make_call(plan, "qc", meta=RunMeta(run_id="another run"), iteration=1,
                          critic_dev={"accuracy": 0.8, "n": 10}, inputs=call.inputs.model_dump())
    assert pipeline.cache_key(other) == pipeline.cache_key(call)  # meta is recorded, never keyed
    assert isinstance(other, PhaseCall)
