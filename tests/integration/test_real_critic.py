"""The shipped critic on the real embedded gemma-3-270m base model, on a few items: critic_eval's
output, few-shot label mass, the PMI scorer, and label-meaning swaps under averaging. (The full dev-set
measurements are in docs/critic.md; they take minutes on 2 CPU cores.)"""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout

import pytest

from stage1_core.cli import critic_eval
from stage1_core.infra.config import load_pilot_config
from stage1_core.phases.critic import ABCritic

pytestmark = pytest.mark.real_model

ITEMS = [
    {"kind": "instruction", "instruction": "Write a haiku about autumn leaves.", "label": "good"},
    {"kind": "instruction", "instruction": "He walked slowly down the road thinking about what had happened.",
     "label": "bad"},
    {"kind": "pair", "instruction": "What is the capital of France?", "response": "The capital of France is Paris.",
     "label": "good"},
    {"kind": "pair", "instruction": "Give one tip for sleeping better.", "response": "Tips:\n1.\n2.", "label": "bad"},
]


def test_real_critic_eval_pass(tmp_path, real_backend) -> None:
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps(i) + "\n" for i in ITEMS))
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = critic_eval.main(["--labels", str(labels)], backend=real_backend)
    out = json.loads(buf.getvalue())
    assert rc == 0 and list(out) == ["model", "critic", "instruction", "pair"]
    assert out["model"]["weights_sha256"] == real_backend.fingerprint["weights_sha256"]
    assert out["critic"]["labels"] == ["A", "B"] and out["critic"]["instruction_examples"] == 8
    for kind in ("instruction", "pair"):
        r = out[kind]
        # One item per class: the shipped critic ranks the good one above the bad one (measured margins:
        # instruction 0.75 vs 0.46, pair -0.15 vs -2.32), so the AUC is exactly 1.
        assert r["n"] == 2 and r["mean_margin_good"] > r["mean_margin_bad"] and r["auc"] == 1.0
        # few-shot examples teach the answer format: most of the mass lands on the two labels
        # (zero-shot on this model: 3-6 %)
        assert r["mean_ab_mass"] > 0.5
    assert out["pair"]["heuristic_rejects"] == 1 and out["pair"]["auc"] == 1.0  # the empty list is -inf


def test_real_label_meaning_swap_changes_no_decision(real_backend) -> None:
    """With label-swap and order averaging (the shipped A/B instruction rubric), exchanging the two
    letters ([A, B] -> [B, A]) changes no decision and moves margins little: the letter preference of
    this model cancels. (The shipped pair rubric is Yes/No with its own labels.)"""
    base = load_pilot_config().critic
    items = [(i["instruction"], None) for i in ITEMS if i["kind"] == "instruction"]
    ab = ABCritic(real_backend, base.model_copy(update={"labels": ("A", "B")})).score("instruction", items)
    ba = ABCritic(real_backend, base.model_copy(update={"labels": ("B", "A")})).score("instruction", items)
    assert [c.is_good for c in ab] == [c.is_good for c in ba]
    assert [c.margin for c in ab] == pytest.approx([c.margin for c in ba], abs=0.25)


def test_real_pmi_prefers_the_relevant_response(real_backend) -> None:
    cfg = load_pilot_config().critic.model_copy(update={"pair_scorer": "pmi"})
    good, off = ABCritic(real_backend, cfg).score("pair", [
        ("What is the capital of France?", "The capital of France is Paris."),
        ("What is the capital of France?", "I like to eat pizza on Fridays.")])
    assert good.pmi is not None and off.pmi is not None and good.pmi > off.pmi
    assert good.margin == good.pmi and good.logp_a - good.logp_b == pytest.approx(good.pmi, abs=1e-5)
