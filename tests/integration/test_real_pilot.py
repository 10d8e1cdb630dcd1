"""A 3-example pilot through the real flow on the real embedded gemma-3-270m base model, with its
Prefect artifacts read back through the client."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.flows.conftest import read_jsonl

pytestmark = pytest.mark.real_model

# Small enough for CI on 2 cores: short few-shot lists, short completions.
SMALL = """\
instruction_generation:
  few_shot_k: 5
  prompts_per_round: 4
  max_new_tokens: 80
  max_instruction_rounds: 3
response_generation:
  max_new_tokens: 48
"""


def _artifacts(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))

    return asyncio.run(read())


def test_three_example_pilot_on_the_embedded_model(tmp_path, real_backend):
    from flows.pilot import pilot

    cfg = tmp_path / "small.yaml"
    cfg.write_text(SMALL)
    out = tmp_path / "pilot"
    state = pilot(count=3, output=str(out), seed=42, config=str(cfg), max_iterations=0, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["exit_code"] in (0, 3, 4)

    summary = json.loads((out / "qc_summary.json").read_text())
    manifest = json.loads((out / "session_manifest.json").read_text())
    assert manifest["model"]["kind"] == "embedded" and len(manifest["model"]["weights_sha256"]) == 64
    assert manifest["tokens"]["total"] > 0
    responses = read_jsonl(out / "iterations" / "01" / "responses.jsonl")
    assert len(responses) == 3, "three instructions should survive filtering within three rounds"
    for r in responses:
        assert r["stop_reason"] in {"eos", "blank_line", "next_block", "token_limit"}
        assert "Instruction:" not in r["response"] and r["response"] == r["response"].strip()
        assert r["instruction_critique"]["ab_mass"] > 0
    assert summary["counts"]["pairs_generated"] == 3
    # n = 3 < min_n: the gate can never say scale on so few.
    assert summary["gate"]["decision"] in {"iterate", "halt"}
    assert summary["metrics"]["critic_dev_accuracy"]["value"] is not None

    arts = _artifacts(state.state_details.flow_run_id)
    by_type = {}
    for a in arts:
        by_type.setdefault(a.type, []).append(a)
    assert {"table", "markdown", "progress"} <= set(by_type), set(by_type)
    table = json.loads(by_type["table"][0].data) if isinstance(by_type["table"][0].data, str) else by_type["table"][0].data
    assert {row["metric"] for row in table} >= {"runaway_rate", "pair_acceptance"}
    md = {a.key: a.data for a in by_type["markdown"]}
    final = summary["gate"]["decision"]
    assert f"**Gate: {final}**" in md["stage1-preview"] and "Kept pairs" in md["stage1-preview"]
    assert "Rejected" in md["stage1-preview"] and f"final decision: {final}" in md["stage1-decision"]
    assert all(a.data == 100.0 for a in by_type["progress"])


# The loop test: the default pilot config at a count just above min_n, on a seed measured to scale.
CHAIN_COUNT, CHAIN_SEED = 24, 42
TINY_SFT = "epochs: 1\nbatch_size: 4\nlora:\n  r: 8\n  alpha: 16\n"


def test_the_default_config_closes_the_loop_pilot_sft_eval(tmp_path, real_backend):
    """The design's loop on the embedded model with the default pilot config: the gate says scale on
    its own (no --force), then the chained SFT trains an adapter and eval writes its report. Small
    SFT and eval settings keep it to a few minutes; the pilot settings are the defaults."""
    from flows.pilot import pilot

    (tmp_path / "sft.yaml").write_text(TINY_SFT)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"id": f"p{i}", "instruction": t}) for i, t in enumerate(
        ["Name a color of the sky on a clear day.", "What is two plus three?", "Name an animal that can fly."])) + "\n")
    (tmp_path / "eval.yaml").write_text(f"max_new_tokens: 24\nprompts: {prompts}\nbootstrap_samples: 100\n")
    out = tmp_path / "pilot"
    result = pilot(count=CHAIN_COUNT, output=str(out), seed=CHAIN_SEED, then="sft,eval",
                   sft_config=str(tmp_path / "sft.yaml"), eval_config=str(tmp_path / "eval.yaml"))
    summary = json.loads((out / "qc_summary.json").read_text())
    assert result["decision"] == "scale", summary["gate"]
    m = summary["metrics"]
    assert m["instruction_critic_acceptance"]["value"] >= 0.5 and m["pair_critic_acceptance"]["value"] >= 0.5
    manifest = json.loads((out / "session_manifest.json").read_text())
    assert len(manifest["iterations"]) <= 2
    chain = manifest["chain"]
    assert chain["steps"] == ["sft", "eval"] and "stopped" not in chain
    report = json.loads((tmp_path / "pilot-eval" / "eval_report.json").read_text())
    assert report["base"]["n"] == report["tuned"]["n"] == 3
    summary_sft = json.loads((tmp_path / "pilot-sft" / "training_summary.json").read_text())
    assert summary_sft["dataset"]["gate"]["decision"] == "scale" and not summary_sft["dataset"]["gate"].get("forced")
    assert summary_sft["dataset"]["train_pairs"] + summary_sft["dataset"]["eval_pairs"] == result["kept"]
