"""`--then sft,eval` on the pilot: a scale verdict runs flows.sft and flows.eval on the kept pairs
(fake-backend pilot; the chained SFT and eval use the random tiny Gemma 3 through their configs),
any other verdict stops the chain with the gate's reasons, and a bad chain is refused up front."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.deploy.conftest import SCALE_VERDICT
from tests.flows.conftest import REPO


def _configs(tmp_path):
    scale = tmp_path / "scale.yaml"
    scale.write_text(SCALE_VERDICT)
    sft_cfg = tmp_path / "sft.yaml"
    sft_cfg.write_text("model:\n  id: random:gemma3-tiny\nepochs: 1\nbatch_size: 4\n")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "p1", "instruction": "Name a fruit."}) + "\n")
    ref = tmp_path / "ref.jsonl"
    ref.write_text(json.dumps({"id": "r1", "instruction": "What color is grass?", "response": "Green."}) + "\n")
    eval_cfg = tmp_path / "eval.yaml"
    eval_cfg.write_text(f"max_new_tokens: 8\nprompts: {prompts}\nreference: {ref}\nbootstrap_samples: 100\n")
    return scale, sft_cfg, eval_cfg


def test_a_scale_verdict_chains_sft_and_eval(tmp_path):
    from flows.pilot import pilot

    scale, sft_cfg, eval_cfg = _configs(tmp_path)
    out = tmp_path / "pilot"
    result = pilot(count=3, output=str(out), seed=42, model="fake:1", config=str(scale), max_iterations=0,
                   then="sft,eval", sft_config=str(sft_cfg), eval_config=str(eval_cfg))
    assert result["decision"] == "scale"
    chain = result["chain"]
    assert chain["steps"] == ["sft", "eval"] and "stopped" not in chain
    sft_dir, eval_dir = tmp_path / "pilot-sft", tmp_path / "pilot-eval"
    assert chain["sft"]["output"] == str(sft_dir) and chain["eval"]["output"] == str(eval_dir)
    summary = json.loads((sft_dir / "training_summary.json").read_text())
    assert summary["dataset"]["run_dir"] == str(out) and summary["dataset"]["gate"]["decision"] == "scale"
    assert summary["dataset"]["pairs"] == result["kept"] and summary["base_model"]["id"] == "random:gemma3-tiny"
    report = json.loads((eval_dir / "eval_report.json").read_text())
    assert chain["eval"]["stop_rate"] == {"base": report["base"]["stop_rate"], "tuned": report["tuned"]["stop_rate"]}
    assert chain["eval"]["judge_status"] == report["judge"]["status"]  # the chain never states a bare win rate
    assert json.loads((out / "session_manifest.json").read_text())["chain"] == chain


def test_a_halt_stops_the_chain_with_the_gate_reasons(tmp_path):
    from flows.pilot import pilot

    _, sft_cfg, eval_cfg = _configs(tmp_path)
    out = tmp_path / "pilot"
    result = pilot(count=6, output=str(out), seed=7, model="fake:1", max_iterations=0, then="sft,eval",
                   sft_config=str(sft_cfg), eval_config=str(eval_cfg))
    assert result["decision"] != "scale"
    stopped = result["chain"]["stopped"]
    assert stopped.startswith(f"the gate said {result['decision']}") and stopped.endswith("sft, eval not run")
    assert result["reasons"][0][:30] in stopped
    assert not (tmp_path / "pilot-sft").exists() and not (tmp_path / "pilot-eval").exists()
    assert json.loads((out / "session_manifest.json").read_text())["chain"]["stopped"] == stopped


@pytest.mark.parametrize("then, field", [("eval", "then"), ("sft,sft", "then"), ("sft,eval,scale", "then")])
def test_a_chain_that_cannot_run_is_refused_before_anything_runs(tmp_path, then, field):
    r = subprocess.run([sys.executable, "-m", "flows.pilot", "--model", "fake:1", "--count", "3", "--output",
                        str(tmp_path / "p"), "--then", then], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and f"field:    {field}" in r.stderr and "sft,eval" in r.stderr
    assert not (tmp_path / "p").exists()


def test_a_bad_chained_sft_config_is_refused_before_the_pilot_runs(tmp_path):
    bad = tmp_path / "sft.yaml"
    bad.write_text("epochs: 0\n")
    r = subprocess.run([sys.executable, "-m", "flows.pilot", "--model", "fake:1", "--count", "3", "--output",
                        str(tmp_path / "p"), "--then", "sft", "--sft-config", str(bad)], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "epochs" in r.stderr and str(bad) in r.stderr
    assert not (tmp_path / "p").exists()
