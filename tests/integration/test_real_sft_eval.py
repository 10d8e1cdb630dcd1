"""SFT and eval through their Prefect flows on the real embedded gemma-3-270m, the response-only
label mask on the real tokenizer, and kill-and-resume equality of training (random tiny Gemma 3 on
the embedded tokenizer: the resume machinery is what is under test, and it takes seconds)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from stage1_core.train import eval_metrics, sft, trainer
from tests.flows.conftest import REPO, read_jsonl
from tests.sft_support import make_run_dir

pytestmark = pytest.mark.real_model

TINY_SFT = "epochs: 2\nbatch_size: 4\nsave_steps: 4\nlora:\n  r: 8\n  alpha: 16\n"


def test_labels_on_the_real_tokenizer_ignore_the_prompt_and_end_in_eos(real_backend):
    (ex,), skipped = sft.encode_pairs(real_backend, [{"id": "a", "instruction": "Name a fruit.",
                                                       "response": "An apple."}], max_seq_len=512)
    tok = real_backend.tokenizer
    prompt = real_backend.encode(["Instruction: Name a fruit.\nResponse:"])[0]
    assert skipped == [] and ex["input_ids"][0] == tok.bos_token_id
    assert ex["input_ids"][:len(prompt)] == prompt
    assert ex["labels"][:len(prompt)] == [-100] * len(prompt)
    target = ex["labels"][len(prompt):]
    assert target == ex["input_ids"][len(prompt):] and target[-1] == tok.eos_token_id
    assert tok.decode(target[:-1]) == " An apple."


def _artifact_keys(flow_run_id) -> set[str]:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))

    return {a.key for a in asyncio.run(read()) if a.key}


def test_sft_then_eval_on_the_embedded_model(tmp_path, real_backend):
    from flows.eval import eval_flow
    from flows.sft import sft_flow

    run = make_run_dir(tmp_path / "run")
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(TINY_SFT)
    state = sft_flow(data=str(run), output=str(tmp_path / "sft"), config=str(cfg), return_state=True)
    assert state.is_completed(), state.message
    out = tmp_path / "sft"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("adapter_config.json")) == ["adapter_config.json"]
    assert not (out / sft.CHECKPOINTS).exists()
    assert (out / sft.LOSS_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    s = json.loads((out / sft.SUMMARY).read_text())
    assert s["steps"] == 12 and s["dataset"]["train_pairs"] == 21 and s["dataset"]["eval_pairs"] == 3
    assert len(s["eval_loss_per_epoch"]) == 2 and s["loss_curve"][-1]["loss"] < s["loss_curve"][0]["loss"]
    assert s["base_model"]["fingerprint"]["weights_sha256"] == real_backend.fingerprint["weights_sha256"]
    assert s["dataset"]["sha256"] and s["tokens_per_s"] > 0 and s["git_sha"]
    assert {"stage1-sft-loss", "stage1-sft"} <= _artifact_keys(state.state_details.flow_run_id)

    from peft import PeftModel  # the adapter loads the plain peft way, onto the base architecture
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_config(real_backend.model.config)
    assert isinstance(PeftModel.from_pretrained(base, str(out)), PeftModel)

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [
        {"id": "p1", "instruction": "Name a color of the sky on a clear day. Use fewer than 3 words.",
         "instruction_id_list": ["length_constraints:number_words", "punctuation:no_comma"],
         "kwargs": [{"num_words": 3, "relation": "less than"}, {}]},
        {"id": "p2", "instruction": "What is two plus three?"},
        {"id": "p3", "instruction": "Name an animal that can fly.", "note": "extra keys are kept"}]) + "\n")
    ref = tmp_path / "ref.jsonl"
    ref.write_text(json.dumps({"id": "r1", "instruction": "What color is grass?", "response": "Grass is green."}) + "\n")
    ecfg = tmp_path / "eval.yaml"
    ecfg.write_text(f"max_new_tokens: 24\nverifiable:\n  max_new_tokens: 24\nreference: {ref}\nbootstrap_samples: 200\n")
    state = eval_flow(adapter=str(out), output=str(tmp_path / "eval"), prompts=str(prompts), config=str(ecfg),
                      return_state=True)
    assert state.is_completed(), state.message
    report = json.loads((tmp_path / "eval" / "eval_report.json").read_text())
    for model in ("base", "tuned"):
        m = report[model]
        for key in eval_metrics.MODEL_METRICS:
            assert isinstance(m[key], float), (model, key)
            lo, hi = m[f"{key}_ci"]
            assert lo <= m[key] <= hi, (model, key)
        assert m["n"] == 3 and m["verifiable_n"] == 1 and m["verifiable_instructions"] == 2
    w = report["win_rate"]
    assert 0.0 <= w["tuned_over_base"] <= 1.0 and len(w["tuned_over_base_ci"]) == 2
    # the 270M base judges itself: it reads position, so the win rate is a tie or marked uninformative
    j = report["judge"]
    assert j["is_base_model"] and j["weights_sha256"] == real_backend.fingerprint["weights_sha256"]
    assert j["status"] in ("informative", "uninformative") and 0.0 <= w["position_consistency"] <= 1.0
    assert j["status"] == "informative" or "UNINFORMATIVE" in (tmp_path / "eval" / "eval_report.md").read_text()
    assert set(report["verifiable_by_type"]) == {"length_constraints:number_words", "punctuation:no_comma"}
    assert report["settings"]["verifiable"]["max_new_tokens"] == 24
    for section in ("base", "tuned", "win_rate"):  # every value a plain number or null, intervals [lo, hi]
        for key, value in report[section].items():
            ok = value is None or isinstance(value, (int, float)) or (
                key.endswith("_ci") and len(value) == 2 and all(isinstance(x, float) for x in value))
            assert ok and not isinstance(value, bool), (section, key, value)
    assert report["settings"]["temperature"] == 0.0 and report["settings"]["zero_shot"] is True
    assert report["base_model"]["fingerprint"]["weights_sha256"] == s["base_model"]["fingerprint"]["weights_sha256"]
    rows = read_jsonl(tmp_path / "eval" / "responses.jsonl")
    assert [r["id"] for r in rows] == ["p1", "p2", "p3"] and len(rows[0]["base"]["strict"]) == 2
    assert "| stop_rate |" in (tmp_path / "eval" / "eval_report.md").read_text()
    assert {"stage1-eval", "stage1-eval-report"} <= _artifact_keys(state.state_details.flow_run_id)


def _sft(api_url: str, *args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PREFECT_API_URL=api_url, PYTHONPATH=str(REPO))
    env.pop("STAGE1_FAULT", None)
    if fault:
        env["STAGE1_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "flows.sft", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def test_killed_training_resumes_to_the_same_final_loss(tmp_path, api_url):
    run = make_run_dir(tmp_path / "run", model="random:gemma3-tiny", decision="halt")
    cfg = tmp_path / "sft.yaml"
    cfg.write_text("epochs: 3\nbatch_size: 4\nsave_steps: 3\nlora:\n  dropout: 0.1\n")

    refused = _sft(api_url, "--data", str(run), "--output", str(tmp_path / "refused"), "--config", str(cfg))
    assert refused.returncode == 2 and "'halt'" in refused.stderr and "--force" in refused.stderr
    assert not (tmp_path / "refused").exists()

    common = ["--data", str(run), "--config", str(cfg), "--force"]
    whole = _sft(api_url, *common, "--output", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    a = json.loads((tmp_path / "whole" / sft.SUMMARY).read_text())
    assert a["dataset"]["gate"] == {"decision": "halt", "forced": True, "reasons": ["instruction_acceptance 0.28 < 0.5"]}

    out = tmp_path / "killed"
    # killed while writing its second checkpoint (step 6): checkpoint-3 is whole, checkpoint-6 never appears
    killed = _sft(api_url, *common, "--output", str(out), fault="sft_save:2")
    assert killed.returncode == -signal.SIGKILL
    assert [p.name for p in trainer.complete_checkpoints(out / sft.CHECKPOINTS)] == ["checkpoint-3"]
    assert (out / sft.CHECKPOINTS / "checkpoint-3" / "trainer_state.json").is_file()
    assert [p.name for p in (out / sft.CHECKPOINTS).glob(".staging-*/checkpoint-*")] == ["checkpoint-6"]
    assert not (out / sft.SUMMARY).exists() and not (out / sft.ADAPTER_CONFIG).exists()
    resumed = _sft(api_url, *common, "--output", str(out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    b = json.loads((out / sft.SUMMARY).read_text())
    assert b["resumed_from_step"] == 3 and b["steps"] == a["steps"] == 18
    assert b["loss_curve"] == a["loss_curve"]
    assert b["train_loss"] == a["train_loss"] and b["eval_loss"] == a["eval_loss"]
    assert (out / "adapter_model.safetensors").read_bytes() == (tmp_path / "whole" / "adapter_model.safetensors").read_bytes()
    assert not list(out.glob(".staging-*")) and not (out / sft.CHECKPOINTS).exists()
