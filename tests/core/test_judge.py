"""Tests of stage1_core.train.judge: a judge that reads only position cannot produce a win (exactly 1/2,
and marked uninformative); a consistent judge can; order-inconsistent pairs are ties; the length
gap and the length-controlled win rate; and the eval's report marks an uninformative win rate."""

from __future__ import annotations

import math

import pytest

from stage1_core.train import eval_metrics, eval_report, judge

TEMPLATE = "Instruction: {instruction}\nResponse A: {response_a}\nResponse B: {response_b}\nAnswer:"


class PositionalJudge:
    """Gives the first-shown label `pull` of the probability, whatever the responses say."""

    def __init__(self, pull: float = 0.76) -> None:
        self.lp = {"A": math.log(pull), "B": math.log(1 - pull)}

    def next_token_logprobs(self, prompts, candidates):
        return [{c: self.lp[c.strip()] for c in candidates} for _ in prompts]


class ContentJudge:
    """Prefers whichever response contains `marker` (p = 0.9), in either order; 1/2 when both or neither."""

    def __init__(self, marker: str = "GOOD") -> None:
        self.marker = marker

    def next_token_logprobs(self, prompts, candidates):
        out = []
        for p in prompts:
            a = p.split("Response A: ")[1].split("\nResponse B: ")[0]
            b = p.split("\nResponse B: ")[1].split("\nAnswer:")[0]
            pa = 0.5 if (self.marker in a) == (self.marker in b) else 0.9 if self.marker in a else 0.1
            out.append({c: math.log(pa if c.strip() == "A" else 1 - pa) for c in candidates})
        return out


def _run(j, base, tuned, floor=0.5):
    rows = judge.verdicts(j, TEMPLATE, ("A", "B"), [f"task {i}" for i in range(len(base))], base, tuned)
    return rows, judge.summarize(rows, base, tuned, consistency_floor=floor, n_boot=200, seed=0)


BASE = [f"base answer {i} that rambles on and on" for i in range(20)]
TUNED = [f"GOOD {i}" for i in range(20)]


@pytest.mark.parametrize("pull", [0.51, 0.76, 0.99, 0.2])
def test_a_purely_positional_judge_gives_exactly_one_half_and_is_uninformative(pull: float) -> None:
    rows, s = _run(PositionalJudge(pull), BASE, TUNED)
    assert s["tuned_over_base"] == 0.5 and s["tuned_over_base_ci"] == [0.5, 0.5]
    assert s["wins"] == s["losses"] == 0 and s["ties"] == 20
    assert s["position_consistency"] == 0.0 and s["informative"] is False
    assert s["first_position_share"] == (1.0 if pull > 0.5 else 0.0)
    assert s["judge_mean_p_first"] == pytest.approx(pull)
    assert s["length_controlled"] == pytest.approx(0.5, abs=1e-9)
    assert all(r["consistent"] is False and r["score"] == 0.5 for r in rows)


def test_the_old_averaging_rule_would_have_handed_out_wins() -> None:
    """What the tie rule fixes: a position-bound judge whose pull differs a little between orders."""
    rows, _ = _run(PositionalJudge(0.76), BASE, TUNED)
    averaged = [(r["p_tuned_as_a"] + r["p_tuned_as_b"]) / 2 for r in rows]
    assert all(a == pytest.approx(0.5) for a in averaged)  # exact here; with real noise it is not, and then
    # the averaged rule thresholds at 1/2 and hands out wins; the tie rule does not look at the average at all


def test_a_consistent_judge_wins_and_is_informative() -> None:
    _, s = _run(ContentJudge(), BASE, TUNED)
    assert s["tuned_over_base"] == 1.0 and s["wins"] == 20 and s["position_consistency"] == 1.0
    assert s["informative"] is True and s["first_position_share"] == 0.5
    lo, hi = s["position_consistency_ci"]
    assert lo > 0.8 and hi == 1.0


def test_inconsistent_pairs_are_ties_and_equal_responses_are_not_judged() -> None:
    base = ["same", "GOOD b", "x"]
    tuned = ["same", "y", "GOOD t"]
    rows, s = _run(ContentJudge(), base, tuned)
    assert rows[0]["equal"] and rows[0]["p_tuned_as_a"] is None and rows[0]["score"] == 0.5
    assert [r["score"] for r in rows] == [0.5, 0.0, 1.0]
    assert s["equal_responses"] == 1 and s["wins"] == 1 and s["losses"] == 1 and s["ties"] == 0


class MixedJudge(ContentJudge):
    """The marker decides when exactly one response has it; otherwise the first-shown gets 0.7."""

    def next_token_logprobs(self, prompts, candidates):
        out = ContentJudge.next_token_logprobs(self, prompts, candidates)
        return [{c: math.log(0.7 if c.strip() == "A" else 0.3) for c in candidates}
                if math.exp(d["A"]) == pytest.approx(0.5) else d for d in out]


def test_consistency_floor_is_inclusive() -> None:
    # half the pairs consistent (the marker decides), half position-only (both or neither has it)
    base = ["GOOD a", "b", "GOOD c", "d"]
    tuned = ["GOOD e", "f", "g", "GOOD h"]
    _, s = _run(MixedJudge(), base, tuned, floor=0.5)
    assert s["position_consistency"] == 0.5 and s["informative"] is True
    assert (s["wins"], s["losses"], s["ties"]) == (1, 1, 2)
    _, s = _run(MixedJudge(), base, tuned, floor=0.51)
    assert s["informative"] is False


def test_length_gap_and_length_controlled_win_rate() -> None:
    # tuned wins exactly when it is longer: the raw win rate rewards length, the controlled one much less
    base = ["mid length answer"] * 20
    tuned = [("GOOD " + "long " * 10) if i % 4 else "GOOD" for i in range(20)]  # 15 longer, 5 shorter
    scores = [1.0 if i % 4 else 0.0 for i in range(20)]
    lb, lt = [float(len(x)) for x in base], [float(len(x)) for x in tuned]
    lc, slope = judge.length_controlled(scores, lb, lt)
    assert sum(scores) / 20 == 0.75 and slope > 1.0 and lc < 0.75 - 0.2
    assert judge.length_controlled([0.5] * 5, [1.0] * 5, [9.0] * 5) == pytest.approx((0.5, 0.0))
    assert judge.length_controlled([], [], []) is None
    lc_all, _ = judge.length_controlled([1.0] * 10, [1.0] * 10, [float(i) for i in range(10)])
    assert 0.9 < lc_all < 1.0  # finite: the ridge keeps a separable fit from diverging
    _, s = _run(ContentJudge(), BASE, TUNED)
    assert s["length_diff_chars"] == pytest.approx(sum(len(t) - len(b) for b, t in zip(BASE, TUNED)) / 20)
    assert s["length_diff_chars"] < 0 and s["tuned_mean_chars"] < s["base_mean_chars"]
    lo, hi = s["length_controlled_ci"]
    assert lo <= s["length_controlled"] <= hi


def _report(win: dict, status: str) -> dict:
    metrics = {m: 0.5 for m in eval_metrics.MODEL_METRICS} | {f"{m}_ci": [0.4, 0.6] for m in eval_metrics.MODEL_METRICS}
    return {"base": metrics, "tuned": metrics, "win_rate": win,
            "judge": {"model": "embedded:gemma-3-270m", "is_base_model": True, "weights_sha256": "ab" * 32,
                      "status": status, "reason": "position consistency 0.000 < floor 0.5: ...", "consistency_floor": 0.5},
            "verifiable_by_type": {"punctuation:no_comma": {"n": 3, "base_strict": 1 / 3, "base_strict_ci": [0.1, 0.8],
                                                            "tuned_strict": 1.0, "tuned_strict_ci": [0.4, 1.0],
                                                            "base_loose": 1 / 3, "base_loose_ci": [0.1, 0.8],
                                                            "tuned_loose": 1.0, "tuned_loose_ci": [0.4, 1.0]}},
            "settings": {"prompt": "Instruction: {instruction}\nResponse:", "max_new_tokens": 128,
                         "stop_sequences": ["\n\n"], "intervals": "Wilson",
                         "verifiable": {"max_new_tokens": 256, "multiline_prompts": 2,
                                        "multiline_stop_sequences": ["\nInstruction:"]}},
            "prompts": {"n": 3, "with_instructions": 3, "instructions": 3}, "reference": {"n": 1},
            "base_model": {"id": "embedded:gemma-3-270m"}}


def test_the_report_marks_an_uninformative_win_rate_everywhere() -> None:
    _, s = _run(PositionalJudge(), BASE, TUNED)
    s.pop("informative")
    r = _report(s, "uninformative")
    line = eval_report.win_rate_line(r)
    assert line.startswith("UNINFORMATIVE (judge position consistency 0.000 < floor 0.5)")
    md = eval_report.report_markdown(r)
    assert "Win rate, tuned over base: UNINFORMATIVE" in md and "Status: **uninformative**" in md
    assert "| punctuation:no_comma | 3 | 0.333 [0.100, 0.800] | 1.000" in md
    assert "| position consistency | 0.000" in md and "| length-controlled win rate | 0.500" in md
    assert "judge embedded:gemma-3-270m: uninformative" in eval_report.report_text(r)
    _, s = _run(ContentJudge(), BASE, TUNED)
    s.pop("informative")
    assert eval_report.win_rate_line(_report(s, "informative")).startswith("1.000 [1.000, 1.000], length-controlled")
