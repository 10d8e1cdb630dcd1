"""Critic options against scripted and fake backends: few-shot rendering, Yes/No labels, order and
label-swap averaging, calibration, PMI, pair heuristics, per-kind thresholds, the AUC, critic_eval's
output schema and its input errors, and the AUC gate."""

from __future__ import annotations

import io
import json
import math
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from stage1_core.cli import critic_eval
from stage1_core.infra.config import CriticConfig, PMIConfig, QCThresholds, load_pilot_config
from stage1_core.phases.critic import ABCritic, instruction_reject_reason, pair_reject_reason, pipeline_score
from stage1_core.phases.critic_eval import auc, evaluate, load_labels
from stage1_core.infra.errors import InputError
from stage1_core.model.fake import FakeBackend
from stage1_core.phases.pipeline import CRITIC_DEV_SET
from stage1_core.phases.qc import compute_metrics, gate

DATA = Path(__file__).resolve().parents[2] / "stage1_core" / "data"


class Scripted:
    """next_token_logprobs / continuation_logprobs from functions of the prompt; records prompts."""

    fingerprint = {"id": "scripted", "weights_sha256": "0"}

    def __init__(self, fn=None, cont=None):
        self.fn, self.cont, self.seen, self.cont_seen = fn, cont, [], []

    def next_token_logprobs(self, prompts, candidates):
        self.seen += prompts
        return [self.fn(p) for p in prompts]

    def continuation_logprobs(self, prompts, continuations):
        self.cont_seen += list(zip(prompts, continuations))
        return [self.cont(p, c) for p, c in zip(prompts, continuations)]


ZERO_SHOT_AB = Path(__file__).resolve().parents[2] / "configs" / "critic" / "zero_shot_ab.yaml"


def cfg(**kw) -> CriticConfig:
    """The zero-shot A/B critic (A/B labels for both kinds), with overrides."""
    return load_pilot_config(ZERO_SHOT_AB).critic.model_copy(update=kw)


def yes_no_cfg(**kw) -> CriticConfig:
    base = load_pilot_config(overrides={"critic": {
        "labels": ["Yes", "No"],
        "instruction_rubric": {
            "template": "{option_a}\n\n{examples}Text: {instruction}\nAnswer:",
            "good_option": "Is it a task?", "bad_option": "Is it broken?",
            "example_template": "Text: {instruction}\nAnswer: {answer}\n\n",
            "examples": [{"instruction": "Name a river.", "label": "good"}, {"instruction": "Write a", "label": "bad"}]},
    }}).critic
    return base.model_copy(update=kw)


def lp(first: float, second: float, labels=("A", "B")) -> dict[str, float]:
    a, b = labels
    return {a: first, " " + a: -20.0, b: second, " " + b: -20.0}


# --- prompts and variants ------------------------------------------------------------------------

def test_few_shot_yes_no_prompts_follow_swap_and_order() -> None:
    b = Scripted(lambda p: lp(-1.0, -1.0, ("Yes", "No")))
    c = ABCritic(b, yes_no_cfg(label_swap=True, order_swap=True, calibrate=False))
    assert c.variants("instruction") == [(False, False), (False, True), (True, False), (True, True)]
    c.score("instruction", [("Do X.", None)])
    plain, rev, swapped, swapped_rev = b.seen
    assert plain == ("Is it a task?\n\nText: Name a river.\nAnswer: Yes\n\nText: Write a\nAnswer: No\n\n"
                     "Text: Do X.\nAnswer:")
    assert rev == "Is it a task?\n\nText: Write a\nAnswer: No\n\nText: Name a river.\nAnswer: Yes\n\nText: Do X.\nAnswer:"
    # swapped: the question asks the bad option, so "Yes" now means bad, also in the examples
    assert swapped == ("Is it broken?\n\nText: Name a river.\nAnswer: No\n\nText: Write a\nAnswer: Yes\n\n"
                       "Text: Do X.\nAnswer:")
    assert swapped_rev.startswith("Is it broken?\n\nText: Write a\nAnswer: Yes")


def test_order_swap_needs_two_examples() -> None:
    zero_shot = load_pilot_config(overrides={"critic": {"instruction_rubric": {"examples": []}}}).critic
    assert ABCritic(FakeBackend(1), zero_shot.model_copy(update={"order_swap": True})).variants("instruction") == \
        [(False, False), (True, False)]


def test_order_averaging_cancels_recency_bias() -> None:
    # A model that answers whatever the last example answered (by 2 nats), whatever the item.
    def fn(p):
        last = p.rsplit("Answer: ", 1)[-1][:3]
        return lp(-0.5, -2.5, ("Yes", "No")) if last.startswith("Yes") else lp(-2.5, -0.5, ("Yes", "No"))
    (c,) = ABCritic(Scripted(fn), yes_no_cfg(label_swap=False, order_swap=True, calibrate=False)).score(
        "instruction", [("Do X.", None)])
    assert c.margin == 0.0
    (c,) = ABCritic(Scripted(fn), yes_no_cfg(label_swap=False, order_swap=False, calibrate=False)).score(
        "instruction", [("Do X.", None)])
    assert c.margin == -2.0  # the last example (given order) is the bad one: "No"


def test_four_variant_average_and_calibration_arithmetic() -> None:
    # margins by meaning: plain 1.0, reversed 0.6, swapped 0.2, swapped+reversed -0.2 -> mean 0.4;
    # the content-free input gives 0.1 in every variant.
    table = {("Is it a task?", "Yes"): 1.0, ("Is it a task?", "No"): 0.6, ("Is it broken?", "Yes"): 0.2,
             ("Is it broken?", "No"): -0.2}

    def fn(p):
        q = p.split("\n", 1)[0]
        last = "Yes" if p.rsplit("Answer: ", 1)[-1].startswith("Yes") else "No"
        if "Text: N/A\n" in p:
            m = 0.1
        else:
            m = table[(q, last)] if q == "Is it a task?" else table[(q, "No" if last == "Yes" else "Yes")]
        good = -1.0
        bad = good - m
        return lp(good, bad, ("Yes", "No")) if q == "Is it a task?" else lp(bad, good, ("Yes", "No"))
    (c,) = ABCritic(Scripted(fn), yes_no_cfg(label_swap=True, order_swap=True, calibrate=True)).score(
        "instruction", [("Do X.", None)])
    assert c.calibration_offset == pytest.approx(0.1)
    assert c.margin == pytest.approx(0.3)
    assert c.logp_a == pytest.approx(-1.0) and c.logp_b == pytest.approx(-1.4)


def test_yes_no_labels_score_their_words() -> None:
    b = Scripted(lambda p: {"Yes": -3.0, " Yes": -0.5, "No": -1.5, " No": -4.0})
    (c,) = ABCritic(b, yes_no_cfg(label_swap=False, order_swap=False, calibrate=False)).score("instruction", [("x y z", None)])
    assert (c.logp_a, c.logp_b, c.margin) == (-0.5, -1.5, 1.0)


def test_label_bias_with_averaging_changes_no_decision_when_labels_swap() -> None:
    """Swapping which word means good (labels [A, B] -> [B, A]) changes no decision with averaging on."""
    b = FakeBackend("fake:5")
    items = [("Explain the water cycle.", "Water evaporates, condenses and falls as rain."),
             ("Explain the water cycle.", "lorem ipsum dolor"), ("Name a colour.", "Blue is a colour."),
             ("Name a colour.", "??? ???")]
    ab = ABCritic(b, cfg(labels=("A", "B"))).score("pair", items)
    ba = ABCritic(b, cfg(labels=("B", "A"))).score("pair", items)
    assert [c.is_good for c in ab] == [True, False, True, False]
    assert [c.is_good for c in ab] == [c.is_good for c in ba]
    assert [c.margin for c in ab] == pytest.approx([c.margin for c in ba])


def test_per_kind_threshold() -> None:
    b = Scripted(lambda p: lp(-1.0, -1.5))
    c = ABCritic(b, cfg(label_swap=False, order_swap=False, calibrate=False, threshold=0.0, instruction_threshold=None,
                        pair_threshold=0.6))
    (i,) = c.score("instruction", [("Do X now.", None)])
    (p,) = c.score("pair", [("Do X now.", "Done.")])
    assert i.margin == p.margin == 0.5 and i.is_good and not p.is_good
    assert c.threshold("pair") == 0.6 and c.threshold("instruction") == 0.0
    # a kind's own threshold may be negative: is_good = margin >= it, whatever the label
    neg = Scripted(lambda p: lp(-1.5, -1.25))
    c = ABCritic(neg, cfg(label_swap=False, order_swap=False, calibrate=False, instruction_threshold=None,
                          pair_threshold=-0.3))
    (p,) = c.score("pair", [("Do X now.", "Done.")])
    (i,) = c.score("instruction", [("Do X now.", None)])
    assert p.margin == pytest.approx(-0.25) and p.predicted_label == "B" and p.is_good
    assert i.margin == pytest.approx(-0.25) and not i.is_good


# --- PMI --------------------------------------------------------------------------------------------

def _cont(p, c):
    # conditional context (a real instruction) makes the response 3 nats likelier; 2 tokens per word
    return (-10.0 + (3.0 if "N/A" not in p else 0.0), 2 * len(c.split()))


def test_pmi_alone() -> None:
    b = Scripted(cont=_cont)
    (c,) = ABCritic(b, cfg(pair_scorer="pmi")).score("pair", [("Name a colour.", "Blue.")])
    assert c.pmi == pytest.approx(3.0) and c.margin == pytest.approx(3.0) and c.is_good
    assert (c.logp_a, c.logp_b, c.ab_mass, c.calibration_offset) == (-7.0, -10.0, 0.0, 0.0)
    assert b.seen == []  # no rubric prompts
    assert b.cont_seen == [("Instruction: Name a colour.\nResponse:", " Blue.\n\n"),
                           ("Instruction: N/A\nResponse:", " Blue.\n\n")]


def test_pmi_per_token_and_weighted_sum_with_rubric() -> None:
    b = Scripted(fn=lambda p: lp(-1.0, -1.5), cont=_cont)
    c_cfg = cfg(pair_scorer="rubric+pmi", label_swap=False, order_swap=False, calibrate=False,
                pmi=PMIConfig(template="Q: {instruction}\nA:", end="", per_token=True, weight=0.5))
    (c,) = ABCritic(b, c_cfg).score("pair", [("Name a colour.", "Blue or red.")])
    assert c.pmi == pytest.approx(3.0 / 6)  # 3 words -> 6 tokens
    assert c.margin == pytest.approx(0.5 + 0.5 * 0.5)
    assert b.cont_seen[0] == ("Q: Name a colour.\nA:", " Blue or red.")


def test_pmi_ignored_for_instructions() -> None:
    b = Scripted(fn=lambda p: lp(-1.0, -1.5), cont=_cont)
    (c,) = ABCritic(b, cfg(pair_scorer="pmi", label_swap=False, order_swap=False, calibrate=False)).score(
        "instruction", [("Do X now.", None)])
    assert c.pmi is None and c.margin == 0.5 and b.cont_seen == []


def test_fake_backend_continuation_logprobs() -> None:
    b = FakeBackend("fake:1")
    assert b.continuation_logprobs(["Name a colour."], [" colour blue lorem"]) == [(-2.0 - 3.0 - 6.0, 3)]
    assert b.continuation_logprobs(["x"], ["y"]) == b.continuation_logprobs(["x"], ["y"])
    with pytest.raises(ValueError):
        b.continuation_logprobs(["x", "y"], ["z"])


# --- heuristics, pipeline score, AUC ---------------------------------------------------------------

@pytest.mark.parametrize("response,reason", [
    ("", "empty_response"), ("   ", "empty_response"),
    ("Blue. Instruction: Name a fruit.", "leakage"), ("Ok\nResponse: more", "leakage"),
    ("Paris.\nParis.", "repetition"), ("The sky is blue. The sky is blue. The sky is blue.", "repetition"),
    ("Mars, Mars, Mars, Mars, Mars, Mars, Mars, Mars.", "repetition"),
    ("Explain it. Explain it. Explain it.", None),  # 2-word sentences are not counted
    ("Eat well. Sleep well. Eat well and sleep well.", None),
    ("Tips:\n1.\n2.", "list_residue"), ("1. Eat well\n2. Sleep eight hours", None),
    ("5 kilometres is about", "truncated"), ("Fix taps, take short showers, and", "truncated"),
    ("It is red,", "truncated"), ("A verb is a", "truncated"), ("Mars, Jupiter and Saturn.", None),
    ("The capital of France is Paris.", None), ("A banana", None), ("I like it a lot", None),
])
def test_pair_reject_reason(response: str, reason: str | None) -> None:
    assert pair_reject_reason(response) == reason


def test_pair_copies_instruction() -> None:
    ins = "Rewrite the sentence 'The cat chased the mouse' in the passive voice."
    assert pair_reject_reason("The cat chased the mouse.", instruction=ins) == "copies_instruction"
    assert pair_reject_reason("The mouse was chased by the cat.", instruction=ins) is None
    assert pair_reject_reason("The cat chased the mouse.") is None  # no instruction given: no check


@pytest.mark.parametrize("text,reason", [
    ("Write a short story about a", "truncated"), ("Explain the difference between", "truncated"),
    ("Explain photosynthesis. Response: Plants", "leakage"), ("Answer: Yes.", "leakage"),
    ("10. Describe rain.\n11. List three", "list_residue"), ("12. Give tips\n13.", "list_residue"),
    ("Write a poem about the sea. Write a poem about the sea.", "repetition"),
    ("Write a haiku about autumn leaves.", None), ("Name three planets in our solar system.", None),
    ("What is the opposite of the word 'generous'?", None),
])
def test_instruction_reject_reason(text: str, reason: str | None) -> None:
    assert instruction_reject_reason(text) == reason
    assert instruction_reject_reason(text, heuristics=False) is None


def test_pair_heuristics_off_keeps_only_the_empty_check() -> None:
    assert pair_reject_reason("Paris.\nParis.", heuristics=False) is None
    assert pair_reject_reason("", heuristics=False) == "empty_response"


def test_auc_hand_computed() -> None:
    # good: 0.9, 0.4, -inf; bad: 0.4, 0.1, -inf.
    # pairs (g, b): 0.9 beats all 3; 0.4 ties 0.4 (1/2), beats 0.1 and -inf; -inf loses twice, ties -inf (1/2)
    scores = [0.9, 0.4, -math.inf, 0.4, 0.1, -math.inf]
    labels = [True, True, True, False, False, False]
    assert auc(scores, labels) == pytest.approx((3 + 2.5 + 0.5) / 9)
    assert auc([1.0, 0.0], [True, False]) == 1.0 and auc([0.0, 1.0], [True, False]) == 0.0
    assert auc([1.0], [True]) is None


def test_pipeline_score_is_minus_inf_for_heuristic_rejects() -> None:
    (c,) = ABCritic(FakeBackend(1), cfg()).score("pair", [("Name a colour.", "Blue is a colour.")])
    assert pipeline_score(c) == c.margin and pipeline_score(None) == -math.inf


def test_evaluate_ranks_heuristic_rejects_last() -> None:
    # The scripted critic prefers the repetitive (bad) response; the heuristics reject it, so with them
    # the good item wins (AUC 1) and without them it loses (AUC 0).
    def fn(p):
        return lp(-0.5, -2.5) if "Paris.\nParis." in p.rsplit("Response:", 1)[-1] else lp(-1.0, -1.5)
    items = [{"kind": "pair", "instruction": "Capital of France?", "response": "Paris.", "label": "good"},
             {"kind": "pair", "instruction": "Capital of France?", "response": "Paris.\nParis.", "label": "bad"}]
    c = ABCritic(Scripted(fn), cfg(label_swap=False, order_swap=False, calibrate=False))
    with_h = evaluate(items, c)
    without = evaluate(items, c, heuristics=False)
    assert with_h["pair"]["auc"] == 1.0 and with_h["pair"]["heuristic_rejects"] == 1
    assert with_h["pair"]["accuracy"] == 1.0
    assert without["pair"]["auc"] == 0.0 and without["pair"]["heuristic_rejects"] == 0
    assert with_h["pair"]["mean_margin_good"] == 0.5 and with_h["pair"]["mean_margin_bad"] == 2.0
    assert with_h["instruction"] == {"n": 0, "accuracy": None, "auc": None, "mean_margin_good": None,
                                     "mean_margin_bad": None, "mean_ab_mass": None, "heuristic_rejects": 0}


# --- the shipped dev set ------------------------------------------------------------------------------

def test_shipped_dev_splits_are_balanced_and_disjoint() -> None:
    splits = {s: load_labels(DATA / f"critic_dev.{s}.jsonl") for s in ("tuning", "test")}
    assert CRITIC_DEV_SET == DATA / "critic_dev.test.jsonl"
    for items in splits.values():
        for kind in ("instruction", "pair"):
            for label in ("good", "bad"):
                assert sum(i["kind"] == kind and i["label"] == label for i in items) >= 15
    total = splits["tuning"] + splits["test"]
    for kind in ("instruction", "pair"):
        for label in ("good", "bad"):
            assert sum(i["kind"] == kind and i["label"] == label for i in total) >= 30
    key = lambda i: (i["kind"], i["instruction"], i["response"])  # noqa: E731
    assert not {key(i) for i in splits["tuning"]} & {key(i) for i in splits["test"]}
    shots = load_pilot_config().critic
    shot_texts = {e.instruction for e in shots.instruction_rubric.examples} | {e.response for e in shots.pair_rubric.examples}
    assert not shot_texts & {t for i in total for t in (i["instruction"], i["response"])}


# --- critic_eval CLI ------------------------------------------------------------------------------------

def _run_cli(args: list[str]) -> tuple[int, str]:
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = critic_eval.main(args)
    return rc, buf.getvalue()


def test_critic_eval_schema_with_fake_model() -> None:
    rc, out = _run_cli(["--labels", str(DATA / "critic_dev.tuning.jsonl"), "--model", "fake:1"])
    assert rc == 0
    obj = json.loads(out)  # exactly one JSON object on stdout
    assert out.count("\n") == 1 and list(obj) == ["model", "critic", "instruction", "pair"]
    assert obj["model"]["id"] == "fake:1" and obj["critic"]["critic_only"] is False
    for kind in ("instruction", "pair"):
        assert {"n", "accuracy", "auc", "mean_margin_good", "mean_margin_bad", "mean_ab_mass"} <= set(obj[kind])
        assert obj[kind]["n"] == 34 and 0.0 <= obj[kind]["auc"] <= 1.0
    rc, out2 = _run_cli(["--labels", str(DATA / "critic_dev.tuning.jsonl"), "--model", "fake:1", "--critic-only",
                         "--set", "critic.pair_scorer=pmi"])
    obj2 = json.loads(out2)
    assert rc == 0 and obj2["critic"]["critic_only"] is True and obj2["critic"]["pair_scorer"] == "pmi"
    assert obj2["pair"]["mean_ab_mass"] is None and obj2["pair"]["heuristic_rejects"] == 0


@pytest.mark.parametrize("line,field,message", [
    ('{"kind": "pair", "instruction": "x", "label": "good"}', "response", "a pair item needs a 'response'"),
    ('{"kind": "pairs", "instruction": "x", "response": "y", "label": "good"}', "kind", "invalid kind"),
    ('{"kind": "instruction", "instruction": "x", "label": "ok"}', "label", "invalid label"),
    ('{"kind": "instruction", "instruction": "x", "label": "good", "score": 1}', "score", "unknown key"),
    ('{"kind": "instruction", "instruction": 3, "label": "good"}', "instruction", "expected a string"),
    ('{"kind": "instruction", "instruction": "x", "response": "y", "label": "good"}', "response", "must not have"),
    ('{"kind": "instruction", "instruction": "x" "label": "good"}', None, "invalid JSON"),
])
def test_critic_eval_bad_input_names_file_line_field(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     line: str, field: str | None, message: str) -> None:
    f = tmp_path / "labels.jsonl"
    f.write_text('{"kind": "instruction", "instruction": "Name a colour.", "label": "good"}\n\n' + line + "\n")
    with pytest.raises(InputError) as e:
        load_labels(f)
    assert e.value.line == 3 and e.value.field == field and message in e.value.message
    rc, out = _run_cli(["--labels", str(f), "--model", "fake:1"])
    err = capsys.readouterr().err
    assert rc == 2 and out == "" and f"{f}:3" in err and message in err


def test_critic_eval_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        load_labels(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(InputError, match="empty"):
        load_labels(tmp_path / "empty.jsonl")


# --- config ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("over,field", [
    ({"critic": {"instruction_rubric": {"template": "Text: {instruction} {option_a}\nAnswer:"}}}, "critic.instruction_rubric"),
    ({"critic": {"pair_rubric": {"examples": [{"instruction": "x", "label": "good"}]}}}, "critic.pair_rubric"),
    ({"critic": {"labels": ["Yes", " No"]}}, "critic.labels"),
    ({"critic": {"pair_scorer": "bm25"}}, "critic.pair_scorer"),
    ({"critic": {"pmi": {"weight": -1}}}, "critic.pmi.weight"),
    ({"critic": {"pmi": {"template": "no placeholder"}}}, "critic.pmi.template"),
    ({"qc": {"critic_min_auc": 1.5}}, "qc.critic_min_auc"),
])
def test_critic_config_validation(over: dict, field: str) -> None:
    with pytest.raises(InputError) as e:
        load_pilot_config(overrides=over)
    assert e.value.field == field


# --- the AUC gate -----------------------------------------------------------------------------------------

def _metrics(th: QCThresholds, auc_by_kind: dict | None) -> dict:
    comps = [{"raw": "Tokyo.\n\n", "stop_reason": "blank_line"}] * 100
    kept = [{"response": "Tokyo.", "response_tokens": 5}] * 80
    return compute_metrics(instructions_generated=100, instructions_kept=80, instructions_distinct=90,
                           instructions_critic_rejected=10, instructions_near_duplicate=10,
                           response_completions=comps, kept_pairs=kept, pairs_generated=100, pairs_critic_rejected=20,
                           critic_dev_accuracy=0.8, thresholds=th, critic_dev_auc=auc_by_kind)


def test_auc_reported_only_by_default() -> None:
    th = QCThresholds()
    m = _metrics(th, {"instruction": 0.55, "pair": 0.6})
    assert m["critic_dev_auc_pair"] == {"value": 0.6, "k": None, "n": None, "ci95": None, "op": "report",
                                        "threshold": None, "passed": None}
    assert gate(m, th, pairs_generated=100, iteration=1, max_iterations=2).decision == "scale"


def test_auc_gate_halts_when_either_kind_is_below() -> None:
    th = QCThresholds(critic_min_auc=0.8)
    ok = _metrics(th, {"instruction": 0.8, "pair": 0.91})
    assert ok["critic_dev_auc_instruction"]["passed"] is True  # >= is inclusive
    assert gate(ok, th, pairs_generated=100, iteration=1, max_iterations=2).decision == "scale"
    low = _metrics(th, {"instruction": 0.95, "pair": 0.7999})
    d = gate(low, th, pairs_generated=100, iteration=1, max_iterations=2)
    assert d.decision == "halt" and d.failed == ["critic_dev_auc_pair"]
    assert d.reasons == ["critic_dev_auc_pair 0.7999 < 0.8 (halting)"]
    unmeasured = gate(_metrics(th, None), th, pairs_generated=100, iteration=1, max_iterations=2)
    assert unmeasured.decision == "halt" and unmeasured.failed == ["critic_dev_auc_instruction", "critic_dev_auc_pair"]


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[2] / "configs" / "critic").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_critic_option_overlays_load(path: Path) -> None:
    c = load_pilot_config(path).critic
    assert c.instruction_rubric.template.rstrip().endswith("Answer:")
    prompt = ABCritic(FakeBackend(1), c).prompts("pair", "Name a colour.", "Blue.")[0]
    assert prompt.endswith("Instruction: Name a colour.\nResponse: Blue.\nAnswer:") and "{" not in prompt


def test_rubric_settings_override_the_critic_settings() -> None:
    shipped = load_pilot_config().critic
    c = ABCritic(FakeBackend(1), shipped)
    assert c.labels("instruction") == ("A", "B") and len(c.variants("instruction")) == 4
    assert c.labels("pair") == ("Yes", "No") and c.variants("pair") == [(False, False)]
    seen = Scripted(lambda p: {"Yes": -1.0, " Yes": -5.0, "No": -2.0, " No": -5.0})
    (p,) = ABCritic(seen, shipped.model_copy(update={"calibrate": False})).score("pair", [("Name a colour.", "Blue.")])
    assert p.margin == 1.0 and len(seen.seen) == 1 and seen.seen[0].startswith("Does the response")
    inherit = shipped.pair_rubric.model_copy(update={"labels": None, "label_swap": None, "order_swap": None})
    c2 = ABCritic(FakeBackend(1), shipped.model_copy(update={"pair_rubric": inherit}))
    assert c2.labels("pair") == ("A", "B") and len(c2.variants("pair")) == 4


def test_labels_files_get_the_jsonl_readers_checks_in_labels_words(tmp_path: Path) -> None:
    """The labels file is read by the one JSONL reader: errors name a labels file (not a seed file), and
    a UTF-16 file or a JSON array is refused with its own fix."""
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"kind": "instruction", "instruction": "caf\xe9", "label": "good"}\n')
    with pytest.raises(InputError) as e:
        load_labels(bad)
    assert e.value.line == 1 and "labels file is not valid UTF-8" in e.value.message and "seed" not in e.value.message
    utf16 = tmp_path / "utf16.jsonl"
    utf16.write_bytes('{"kind": "instruction"}\n'.encode("utf-16"))
    with pytest.raises(InputError, match="UTF-16"):
        load_labels(utf16)
    array = tmp_path / "array.jsonl"
    array.write_text('[{"kind": "instruction", "instruction": "x", "label": "good"}]\n')
    with pytest.raises(InputError, match="JSON array"):
        load_labels(array)
