"""A finished run folder for SFT and eval tests, without running a pilot: config.yaml (the default
pilot config with the model given), session_manifest.json with the gate's decision, and the data
file holding tests/data/sft_pairs.jsonl (24 short pairs written for the tests)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from stage1_core.infra.config import DEFAULT_PILOT_CONFIG

PAIRS = Path(__file__).parent / "data" / "sft_pairs.jsonl"


def make_run_dir(path: Path, model: str = "embedded:gemma-3-270m", decision: str = "scale", kind: str = "pilot",
                 pairs: Path = PAIRS) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    cfg = yaml.safe_load(DEFAULT_PILOT_CONFIG.read_text())
    cfg["model"]["id"] = model
    (path / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    gate = {"decision": decision, "reasons": [] if decision == "scale" else ["instruction_acceptance 0.28 < 0.5"]}
    manifest = {"run_id": "test-run", "decision": gate} if kind == "pilot" else \
        {"run_id": "test-run", "qc": {"passed": decision == "scale", "decision": gate}}
    (path / "session_manifest.json").write_text(json.dumps(manifest))
    shutil.copy(pairs, path / ("pilot_data.jsonl" if kind == "pilot" else "scale_data.jsonl"))
    return path
