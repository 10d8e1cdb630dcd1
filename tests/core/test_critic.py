"""Critic arithmetic against a scripted backend: variants, swap averaging, calibration."""

import math
from pathlib import Path

import pytest

from stage1_core.infra.config import load_pilot_config
from stage1_core.phases.critic import ABCritic
from stage1_core.model.fake import FakeBackend


class Scripted:
    """next_token_logprobs from a function of the prompt; records prompts."""

    fingerprint = {"id": "scripted", "weights_sha256": "0"}

    def __init__(self, fn):
        self.fn, self.seen = fn, []

    def next_token_logprobs(self, prompts, candidates):
        self.seen += prompts
        return [self.fn(p) for p in prompts]


ZERO_SHOT_AB = Path(__file__).resolve().parents[2] / "configs" / "critic" / "zero_shot_ab.yaml"


def cfg(**kw):
    """The single-token zero-shot A/B critic of SPEC.md (configs/critic/zero_shot_ab.yaml: label swap,
    calibration, the global threshold), with overrides."""
    c = load_pilot_config(ZERO_SHOT_AB).critic
    return c.model_copy(update=kw)


def test_best_variant_and_margin_without_swap_or_calibration():
    b = Scripted(lambda p: {"A": -3.0, " A": -1.0, "B": -2.0, " B": -4.0})
    (c,) = ABCritic(b, cfg(label_swap=False, calibrate=False)).score("instruction", [("Do X.", None)])
    assert (c.logp_a, c.logp_b, c.margin) == (-1.0, -2.0, 1.0)
    assert c.predicted_label == "A" and c.is_good and c.confident
    assert c.ab_mass == pytest.approx(sum(math.exp(v) for v in (-3.0, -1.0, -2.0, -4.0)), abs=1e-6)


def test_threshold_and_confidence_boundaries():
    b = Scripted(lambda p: {"A": -1.0, " A": -9.0, "B": -1.5, " B": -9.0})
    (c,) = ABCritic(b, cfg(label_swap=False, calibrate=False, threshold=0.5, confidence_threshold=0.5)).score(
        "instruction", [("x", None)])
    assert c.margin == 0.5 and c.is_good and c.confident  # >= is inclusive
    (c,) = ABCritic(b, cfg(label_swap=False, calibrate=False, threshold=0.51)).score("instruction", [("x", None)])
    assert c.predicted_label == "A" and not c.is_good


def test_label_swap_cancels_pure_letter_bias():
    # A model that always prefers the letter A by 2 nats, whatever the content.
    b = Scripted(lambda p: {"A": -0.5, " A": -9.0, "B": -2.5, " B": -9.0})
    (c,) = ABCritic(b, cfg(label_swap=True, calibrate=False)).score("pair", [("I", "R")])
    assert c.margin == 0.0
    (c,) = ABCritic(b, cfg(label_swap=False, calibrate=False)).score("pair", [("I", "R")])
    assert c.margin == 2.0
    assert len(b.seen) == 3  # two prompts (both orders) for the swapped item, one without swap


def test_swap_prompt_orders_options():
    b = Scripted(lambda p: {"A": -1.0, " A": -9.0, "B": -1.0, " B": -9.0})
    ABCritic(b, cfg(label_swap=True, calibrate=False)).score("instruction", [("Do X.", None)])
    first, second = b.seen
    assert "A) Yes" in first and "B) No" in first
    assert "A) No" in second and "B) Yes" in second


def test_contextual_calibration_subtracts_content_free_margin():
    def fn(p):
        if "Text: N/A" in p:
            return {"A": -1.0, " A": -9.0, "B": -1.8, " B": -9.0}  # content-free margin 0.8
        return {"A": -1.0, " A": -9.0, "B": -1.5, " B": -9.0}  # raw margin 0.5
    (c,) = ABCritic(Scripted(fn), cfg(label_swap=False, calibrate=True)).score("instruction", [("Do X.", None)])
    assert c.calibration_offset == pytest.approx(0.8)
    assert c.margin == pytest.approx(-0.3) and c.predicted_label == "B" and not c.is_good


def test_fake_backend_critic_separates_good_from_bad_and_swap_changes_no_decision():
    b = FakeBackend("fake:3")
    items = [("Explain the water cycle.", "Water evaporates, condenses and falls as rain."),
             ("Explain the water cycle.", "lorem ipsum dolor")]
    c1 = ABCritic(b, cfg(label_swap=True, labels=("A", "B"))).score("pair", items)
    c2 = ABCritic(b, cfg(label_swap=True, labels=("B", "A"))).score("pair", items)
    assert [c.is_good for c in c1] == [True, False]
    assert [c.is_good for c in c1] == [c.is_good for c in c2]


def test_empty_items():
    assert ABCritic(FakeBackend("fake:1"), cfg()).score("pair", []) == []


@pytest.mark.real_model
def test_one_real_critic_pass(real_backend):
    """The A/B critic on the embedded model: finite log-probs, mass on A/B in (0, 1], margins as
    defined. (Its quality on this 270M model is near chance; docs/phases.md and issue "A critic you
    can measure" cover that.)"""
    items = [("What is the capital of France?", "The capital of France is Paris."),
             ("What is the capital of France?", "I like to eat pizza on Fridays.")]
    ab = ABCritic(real_backend, cfg(labels=("A", "B"))).score("pair", items)
    ba = ABCritic(real_backend, cfg(labels=("B", "A"))).score("pair", items)
    for c in ab + ba:
        assert math.isfinite(c.logp_a) and math.isfinite(c.logp_b) and 0 < c.ab_mass <= 1
        assert c.margin == pytest.approx(c.logp_a - c.logp_b - c.calibration_offset, abs=1e-5)
        assert c.predicted_label == ("A" if c.margin >= 0 else "B") and c.is_good == (c.margin >= 0)
    # Calibration is measured per label order: the two orders get their own offsets.
    assert ab[0].calibration_offset != 0.0 and ab[0].calibration_offset != ba[0].calibration_offset
