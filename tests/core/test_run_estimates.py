"""The CPU rates --dry-run estimates from are the ones bench/pilot_cpu.py measured (the newest
bench/results/pilot_cpu-*.json), not numbers nobody measured."""

from __future__ import annotations

import json
from pathlib import Path

from stage1_core.phases import run

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"


def test_dry_run_rates_are_the_newest_measured_ones() -> None:
    newest = sorted(RESULTS.glob("pilot_cpu-*.json"))[-1]
    measured = json.loads(newest.read_text())
    assert measured["cpu_count"] == 2 and measured["count"] == 100
    assert run.CPU_SAMPLED_TOK_S == measured["generation_tokens_per_second"], newest.name
    assert run.CPU_CRITIC_PROMPTS_S == measured["critic_prompts_per_second"], newest.name
