"""A 2-shard scale run (1 example per shard) on the real embedded gemma-3-270m base model through
the CLI, killed once after shard 1's files were written but before its manifest, then resumed:
shard 0 is not recomputed, shard 1 is recomputed identically (same hardware and software), and the
merged data has every row once, with no temp file left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.flows.conftest import REPO, read_jsonl

# About 2.5 minutes on 2 idle cores; the timeout leaves room for a machine shared with other work.
pytestmark = [pytest.mark.real_model, pytest.mark.timeout(2400)]

# Small enough for 2 cores: two short list prompts per round, short responses, no dev-set pass (the
# critic's dev accuracy is the pilot's test; here it would cost more than the shards).
SMALL = """\
instruction_generation:
  few_shot_k: 4
  prompts_per_round: 2
  max_new_tokens: 48
response_generation:
  max_new_tokens: 24
scale:
  max_rounds_per_shard: 2
  measure_critic_dev: false
"""
ARGS = ("--count", "2", "--shard-size", "1", "--seed", "42", "--config", "small.yaml", "--output", "o")


def cli(api_url, cwd, env=None):
    e = dict(os.environ, PREFECT_API_URL=api_url, PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run([sys.executable, "-m", "flows.scale", *ARGS], cwd=cwd, env=e, capture_output=True,
                          text=True, timeout=1200)


def test_two_shard_run_on_the_embedded_model_survives_a_kill(api_url, tmp_path):
    (tmp_path / "small.yaml").write_text(SMALL)
    out = tmp_path / "o"
    r = cli(api_url, tmp_path, {"STAGE1_FAULT": "shard_write:2"})
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    shard0 = json.loads((out / "shards" / "shard-00000.manifest.json").read_text())
    assert not (out / "shards" / "shard-00001.manifest.json").exists()
    killed = {n: (out / "shards" / f"shard-00001.{n}.jsonl").read_text() for n in ("rejected", "completions")}
    killed_rows = read_jsonl(out / "shards" / "shard-00001.jsonl")

    r = cli(api_url, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads((out / "session_manifest.json").read_text())
    assert [(s["shard"], s["computed_in_this_run"]) for s in manifest["shards"]] == [(0, False), (1, True)]
    assert manifest["shards"][0]["run_id"] == shard0["run_id"] != manifest["run_id"]
    assert manifest["model"]["kind"] == "embedded" and manifest["tokens"]["total"] > 0
    # Recomputed on the same hardware and software: the same shard, byte for byte but for the run id.
    for n, text in killed.items():
        assert (out / "shards" / f"shard-00001.{n}.jsonl").read_text() == text
    again = read_jsonl(out / "shards" / "shard-00001.jsonl")
    for a, b in zip(killed_rows, again):
        a["provenance"].pop("run_id"), b["provenance"].pop("run_id")
    assert again == killed_rows
    data = read_jsonl(out / "scale_data.jsonl")
    shard_ids = [x["id"] for i in (0, 1) for x in read_jsonl(out / "shards" / f"shard-0000{i}.jsonl")]
    merged_out = [x["id"] for x in read_jsonl(out / "rejected.jsonl") if x["phase"] == "merge"]
    assert sorted(x["id"] for x in data) == sorted(set(shard_ids) - set(merged_out)) and len(shard_ids) <= 2
    assert len(data) >= 1, "the run kept no pairs: nothing above was checked on real rows"
    for x in data:
        assert "Instruction:" not in x["response"] and x["provenance"]["model"]["id"] == "embedded:gemma-3-270m"
    summary = json.loads((out / "qc_summary.json").read_text())
    assert summary["critic_dev"] is None and summary["counts"]["shards"] == 2
    assert summary["metrics"]["critic_dev_accuracy"]["value"] is None
    assert "Gemma Terms of Use" in (out / "README.md").read_text()
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name or p.name.endswith(".work")]
