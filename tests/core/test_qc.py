"""Golden tests of stage1_core.phases.qc: Wilson intervals, runaway/leakage detection, every operator at
its exact boundary on both sides, the gate matrix, and the adjustment table with its bounds."""

from __future__ import annotations

from typing import Any

import pytest

from stage1_core.infra.config import InstructionGenerationConfig, QCThresholds, ResponseGenerationConfig, load_pilot_config
from stage1_core.phases.qc import (
    METRIC_NAMES,
    NO_ADJUSTMENT,
    GateDecision,
    adjust,
    adjust_generation,
    adjust_instruction_generation,
    compute_metrics,
    gate,
    has_leakage,
    is_runaway,
    leading_instruction_loss,
    observed_delimiters,
    wilson_interval,
)

TH = QCThresholds()  # the documented defaults: 0.05, 0.10, 0, 40, critic acceptance 0.5/0.5, yield 0.25/0.4,
# near-duplicates 0.3, None, None, 20


@pytest.fixture
def rg() -> ResponseGenerationConfig:
    return load_pilot_config().response_generation


@pytest.fixture
def ig() -> InstructionGenerationConfig:
    return load_pilot_config().instruction_generation.model_copy(update={"temperature": 0.7})


def completions(n: int, *, runaway: int = 0, token_limit: int = 0) -> list[dict[str, Any]]:
    out = [{"raw": "Tokyo.\n\n", "stop_reason": "next_block"} for _ in range(runaway)]
    out += [{"raw": "A long answer that never ends", "stop_reason": "token_limit"} for _ in range(token_limit)]
    out += [{"raw": "Tokyo.\n\n", "stop_reason": "blank_line"} for _ in range(n - runaway - token_limit)]
    return out


def pairs(n: int, tokens: int = 20, leaks: int = 0) -> list[dict[str, Any]]:
    return [{"response": "Response: oops" if i < leaks else "The capital is Tokyo.", "response_tokens": tokens}
            for i in range(n)]


def metrics(**kw: Any) -> dict[str, dict[str, Any]]:
    """A healthy pilot (everything passes) with any argument overridden."""
    args: dict[str, Any] = dict(instructions_generated=100, instructions_kept=80, instructions_distinct=90,
                                instructions_critic_rejected=10, instructions_near_duplicate=10,
                                response_completions=completions(100), kept_pairs=pairs(80), pairs_generated=100,
                                pairs_critic_rejected=20, critic_dev_accuracy=0.8, thresholds=TH)
    args.update(kw)
    return compute_metrics(**args)


# --- primitives ---------------------------------------------------------------------------------

def test_wilson_hand_values() -> None:
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(1, 20) == pytest.approx((0.0089, 0.2361), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_is_runaway_and_leakage() -> None:
    assert is_runaway("Tokyo.", "next_block")
    assert is_runaway("Step one.\nStep two.\n  Step one.  \n", "eos")
    assert not is_runaway("Step one.\n\n\nStep two.\n", "token_limit")  # blank lines do not count
    assert not is_runaway("Tokyo.\n\n", "blank_line")
    assert has_leakage("Paris.\nInstruction: next") and has_leakage("Response: Paris")
    assert not has_leakage("The instruction was clear; my response is Paris.")


def test_observed_delimiters_most_frequent_first() -> None:
    raws = ["a\nInput: x", "b\nInput: y", "c\n### d", "Response: e", "plain"]
    assert observed_delimiters(raws) == ["\nInput:", "Response:", "\n###"]
    assert observed_delimiters(["x\nInstruction: y"]) == ["\nInstruction:", "Instruction:"]
    assert observed_delimiters([]) == []


# --- metrics and operator boundaries ------------------------------------------------------------

def test_metric_shape_and_values() -> None:
    m = metrics()
    assert list(m) == list(METRIC_NAMES)
    for d in m.values():
        assert set(d) == {"value", "k", "n", "ci95", "op", "threshold", "passed"}
    assert m["instruction_acceptance"] | {"ci95": None} == {
        "value": 0.8, "k": 80, "n": 100, "ci95": None, "op": ">=", "threshold": 0.25, "passed": True}
    assert m["instruction_acceptance"]["ci95"] == pytest.approx(list(wilson_interval(80, 100)))
    # the critics' acceptance: accepted / judged by that critic (80 kept of 90 judged; 80 of 100 pairs)
    assert m["instruction_critic_acceptance"] | {"ci95": None} == {
        "value": 80 / 90, "k": 80, "n": 90, "ci95": None, "op": ">=", "threshold": 0.5, "passed": True}
    assert (m["pair_critic_acceptance"]["k"], m["pair_critic_acceptance"]["n"]) == (80, 100)
    assert m["near_duplicate_share"] | {"ci95": None} == {
        "value": 0.1, "k": 10, "n": 100, "ci95": None, "op": "<", "threshold": 0.3, "passed": True}
    assert m["delimiter_leakage"] == {"value": 0, "k": 0, "n": 80, "ci95": None, "op": "<=", "threshold": 0,
                                      "passed": True}
    assert m["median_response_tokens"]["value"] == 20 and m["median_response_tokens"]["op"] == "<"
    assert m["critic_dev_accuracy"] == {"value": 0.8, "k": None, "n": None, "ci95": None, "op": "report",
                                        "threshold": None, "passed": None}
    assert m["diversity"]["value"] == 0.9 and m["diversity"]["op"] == "report" and m["diversity"]["passed"] is None


@pytest.mark.parametrize(("k", "n", "passed"), [(1, 20, False), (499, 10000, True), (0, 20, True), (2, 20, False)])
def test_runaway_strict_boundary(k: int, n: int, passed: bool) -> None:
    m = metrics(response_completions=completions(n, runaway=k))["runaway_rate"]
    assert m["value"] == k / n and m["passed"] is passed  # 0.05 exactly fails, 0.0499 passes


@pytest.mark.parametrize(("k", "n", "passed"), [(2, 20, False), (999, 10000, True)])
def test_token_limit_strict_boundary(k: int, n: int, passed: bool) -> None:
    assert metrics(response_completions=completions(n, token_limit=k))["token_limit_rate"]["passed"] is passed


@pytest.mark.parametrize(("k", "n", "passed"), [(50, 100, True), (4999, 10000, False), (5000, 10000, True)])
def test_critic_acceptance_inclusive_boundary(k: int, n: int, passed: bool) -> None:
    m = metrics(instructions_generated=n, instructions_kept=k, instructions_distinct=k,
                instructions_critic_rejected=n - k, instructions_near_duplicate=0)
    assert m["instruction_critic_acceptance"]["passed"] is passed
    m = metrics(kept_pairs=pairs(k), pairs_generated=n, pairs_critic_rejected=n - k, response_completions=completions(n))
    assert m["pair_critic_acceptance"]["passed"] is passed


@pytest.mark.parametrize(("k", "n", "passed"), [(25, 100, True), (2499, 10000, False)])
def test_yield_inclusive_boundary(k: int, n: int, passed: bool) -> None:
    m = metrics(instructions_generated=n, instructions_kept=k, instructions_distinct=k, instructions_critic_rejected=0,
                instructions_near_duplicate=0)
    assert m["instruction_acceptance"]["passed"] is passed
    m = metrics(kept_pairs=pairs(k), pairs_generated=n, pairs_critic_rejected=0,
                thresholds=TH.model_copy(update={"pair_acceptance_min": 0.25}))
    assert m["pair_acceptance"]["passed"] is passed


@pytest.mark.parametrize(("k", "n", "passed"), [(30, 100, False), (29, 100, True), (2999, 10000, True)])
def test_near_duplicate_strict_boundary(k: int, n: int, passed: bool) -> None:
    m = metrics(instructions_generated=n, instructions_kept=0, instructions_distinct=n - k,
                instructions_critic_rejected=0, instructions_near_duplicate=k)
    assert m["near_duplicate_share"]["value"] == k / n and m["near_duplicate_share"]["passed"] is passed


@pytest.mark.parametrize(("tokens", "median", "passed"), [([40], 40, False), ([39, 40], 39.5, True), ([39], 39, True)])
def test_median_strict_boundary(tokens: list[int], median: float, passed: bool) -> None:
    kept = [{"response": "ok", "response_tokens": t} for t in tokens]
    m = metrics(kept_pairs=kept, pairs_generated=len(kept))["median_response_tokens"]
    assert m["value"] == median and m["passed"] is passed


def test_leakage_boundary() -> None:
    assert metrics(kept_pairs=pairs(80, leaks=0))["delimiter_leakage"]["passed"] is True
    leaked = metrics(kept_pairs=pairs(80, leaks=1))["delimiter_leakage"]
    assert leaked["value"] == 1 and leaked["passed"] is False
    assert metrics(kept_pairs=pairs(80, leaks=1), thresholds=TH.model_copy(update={"leakage_max": 1})
                   )["delimiter_leakage"]["passed"] is True


def test_undefined_metrics_fail() -> None:
    m = metrics(response_completions=[], kept_pairs=[], pairs_generated=0, instructions_generated=0,
                instructions_kept=0, instructions_distinct=0, instructions_critic_rejected=0,
                instructions_near_duplicate=0, pairs_critic_rejected=0)
    for name in ("instruction_critic_acceptance", "pair_critic_acceptance"):  # nothing judged: fails, not passes
        assert m[name]["value"] is None and m[name]["n"] == 0 and m[name]["passed"] is False, name
    for name in ("runaway_rate", "token_limit_rate", "instruction_acceptance", "pair_acceptance",
                 "median_response_tokens", "near_duplicate_share"):
        assert m[name]["value"] is None and m[name]["passed"] is False, name
    assert m["diversity"]["value"] is None and m["diversity"]["passed"] is None
    with pytest.raises(ValueError):
        metrics(instructions_kept=101)


def test_critic_gate_option() -> None:
    gated = TH.model_copy(update={"critic_min_accuracy": 0.7})
    assert metrics(critic_dev_accuracy=0.7, thresholds=gated)["critic_dev_accuracy"]["passed"] is True
    assert metrics(critic_dev_accuracy=0.6999, thresholds=gated)["critic_dev_accuracy"]["passed"] is False
    assert metrics(critic_dev_accuracy=None, thresholds=gated)["critic_dev_accuracy"]["passed"] is False
    assert metrics(critic_dev_accuracy=0.1)["critic_dev_accuracy"]["passed"] is None


# --- the gate -----------------------------------------------------------------------------------

def decide(m: dict[str, dict[str, Any]], th: QCThresholds = TH, *, n: int = 100, iteration: int = 1,
           max_iterations: int = 2, **kw: Any) -> GateDecision:
    return gate(m, th, pairs_generated=n, iteration=iteration, max_iterations=max_iterations, **kw)


def test_gate_all_pass_scales() -> None:
    d = decide(metrics())
    assert d.decision == "scale" and d.failed == [] and d.reasons
    assert d.to_dict() == {"decision": "scale", "reasons": d.reasons, "failed": []}


def test_gate_critic_acceptance_fail_halts_naming_the_critic() -> None:
    m = metrics(instructions_kept=40, instructions_critic_rejected=60, instructions_near_duplicate=0,
                response_completions=completions(100, runaway=10))
    d = decide(m)
    assert d.decision == "halt"
    assert d.failed == ["instruction_critic_acceptance", "runaway_rate"]
    assert d.reasons[0] == ("instruction_critic_acceptance 0.4 < 0.5 (halting: quality bar; the instruction critic "
                            "accepted 40 of the 100 instructions it judged, and no generation setting raises that)")
    assert d.reasons[1] == "runaway_rate 0.1 ≥ 0.05 (fixable: iterate)"
    d = decide(metrics(kept_pairs=pairs(30), pairs_critic_rejected=70))
    assert d.decision == "halt" and d.failed == ["pair_critic_acceptance", "pair_acceptance"]
    assert "the pair critic accepted 30 of the 100 pairs" in d.reasons[0]


def test_gate_yield_and_repeats_iterate() -> None:
    """Repeats and a low yield are cost: a setting can fix them, so they iterate, even far below the bar."""
    m = metrics(instructions_generated=300, instructions_kept=50, instructions_distinct=110,
                instructions_critic_rejected=20, instructions_near_duplicate=190)
    d = decide(m)
    assert d.decision == "iterate" and d.failed == ["instruction_acceptance", "near_duplicate_share"]
    assert d.reasons == ["instruction_acceptance 0.167 < 0.25 (fixable: iterate)",
                         "near_duplicate_share 0.633 ≥ 0.3 (fixable: iterate)"]
    assert decide(m, iteration=3, max_iterations=2).decision == "halt"  # ... while iterations last


def test_gate_runaway_fail_iterates() -> None:
    d = decide(metrics(response_completions=completions(24, runaway=2)), n=24)
    assert d.decision == "iterate" and d.failed == ["runaway_rate"]
    assert d.reasons == ["runaway_rate 0.083 ≥ 0.05 (fixable: iterate)"]


def test_gate_reason_shows_digits_at_boundary() -> None:
    d = decide(metrics(instructions_generated=10000, instructions_kept=4999, instructions_distinct=10000,
                       instructions_critic_rejected=5001, instructions_near_duplicate=0))
    assert len(d.reasons) == 1 and d.reasons[0].startswith("instruction_critic_acceptance 0.4999 < 0.5 (halting")


def test_gate_below_min_n_iterates() -> None:
    m = metrics(response_completions=completions(19), kept_pairs=pairs(15), pairs_generated=19, pairs_critic_rejected=4)
    d = decide(m, n=19)
    assert d.decision == "iterate" and d.failed == []
    assert d.reasons[0].startswith("sample too small") and "19" in d.reasons[0] and "min_n = 20" in d.reasons[0]
    assert decide(m, n=20).decision == "scale"  # min_n itself is enough


def test_gate_exhausted_halts_and_allow_iterate() -> None:
    m = metrics(response_completions=completions(100, runaway=10))
    assert decide(m, iteration=2, max_iterations=2).decision == "iterate"  # 1 of 2 reruns used
    d = decide(m, iteration=3, max_iterations=2)  # the first pilot and both reruns are done
    assert d.decision == "halt" and d.failed == ["runaway_rate"]
    assert d.reasons[0] == "iterations exhausted (2 of 2 reruns used)"
    d = decide(m, iteration=1, max_iterations=0)
    assert d.decision == "halt" and d.reasons[0] == "iterations exhausted (0 of 0 reruns used)"
    assert d.reasons[1] == "runaway_rate 0.1 ≥ 0.05 (fixable: iterate)"
    d = decide(m, iteration=1, max_iterations=0, allow_iterate_when_exhausted=True)
    assert d.decision == "iterate" and d.failed == ["runaway_rate"]
    assert d.reasons[0] == "runaway_rate 0.1 ≥ 0.05 (fixable: iterate)"
    # a too-small sample is also subject to exhaustion; scale and halt are not
    small = decide(metrics(pairs_generated=10, kept_pairs=pairs(8), pairs_critic_rejected=2), n=10, iteration=1,
                   max_iterations=0)
    assert small.decision == "halt" and small.reasons[1].startswith("sample too small")
    assert decide(metrics(), iteration=5, max_iterations=0).decision == "scale"


def test_gate_critic_on_off() -> None:
    gated = TH.model_copy(update={"critic_min_accuracy": 0.75})
    low = metrics(critic_dev_accuracy=0.6, thresholds=gated)
    d = decide(low, gated)
    assert d.decision == "halt" and d.failed == ["critic_dev_accuracy"]
    assert d.reasons == ["critic_dev_accuracy 0.6 < 0.75 (halting)"]
    assert decide(metrics(critic_dev_accuracy=0.6), TH).decision == "scale"  # reported only


def test_gate_validates() -> None:
    m = metrics()
    del m["pair_critic_acceptance"]
    with pytest.raises(ValueError, match="pair_critic_acceptance"):
        decide(m)
    with pytest.raises(ValueError):
        decide(metrics(), iteration=0)


# --- the adjustment table -----------------------------------------------------------------------

def test_adjust_runaway_adds_delimiters_and_cools(rg: ResponseGenerationConfig) -> None:
    before = rg.model_dump()
    new, changes = adjust_generation(rg, ["runaway_rate"], ["\nInstruction:", "Response:", "\nInput:"])
    assert new.stop_sequences == ["\n\n", "\nInstruction:", "\nResponse:", "Response:", "\nInput:"]
    assert new.temperature == 0.6 and new.max_new_tokens == rg.max_new_tokens
    assert changes == ["stop_sequences += 'Response:', '\\nInput:'", "temperature 0.7 → 0.6"]
    assert rg.model_dump() == before  # original untouched
    leak, _ = adjust_generation(rg, ["delimiter_leakage"], ["\n###"])
    assert leak.stop_sequences[-1] == "\n###" and leak.temperature == 0.6


def test_adjust_temperature_bounds(rg: ResponseGenerationConfig) -> None:
    assert adjust_generation(rg.model_copy(update={"temperature": 0.35}), ["runaway_rate"], [])[0].temperature == 0.3
    at_floor, changes = adjust_generation(rg.model_copy(update={"temperature": 0.3}), ["runaway_rate"], [])
    assert at_floor.temperature == 0.3 and changes[0].startswith("no further adjustment possible")
    below = adjust_generation(rg.model_copy(update={"temperature": 0.2}), ["runaway_rate"], [])[0]
    assert below.temperature == 0.2  # never raised to the floor
    greedy = adjust_generation(rg.model_copy(update={"temperature": 0.0}), ["runaway_rate"], ["\nInput:"])[0]
    assert greedy.temperature == 0.0 and greedy.stop_sequences[-1] == "\nInput:"
    assert adjust_generation(rg.model_copy(update={"temperature": 1.0}), ["runaway_rate"], [])[0].temperature == 0.9


def test_adjust_token_limit_raises_to_cap(rg: ResponseGenerationConfig) -> None:
    new, changes = adjust_generation(rg, ["token_limit_rate"], [])
    assert new.max_new_tokens == 144 and changes == ["max_new_tokens 96 → 144 (token_limit_rate failed)"]
    assert adjust_generation(rg.model_copy(update={"max_new_tokens": 300}), ["token_limit_rate"], [])[0].max_new_tokens == 384
    at_cap, changes = adjust_generation(rg.model_copy(update={"max_new_tokens": 384}), ["token_limit_rate"], [])
    assert at_cap.max_new_tokens == 384 and changes[0].startswith("no further adjustment possible")


def test_adjust_median_lowers_to_floor(rg: ResponseGenerationConfig) -> None:
    new, changes = adjust_generation(rg, ["median_response_tokens"], [])
    assert new.max_new_tokens == 72 and changes == ["max_new_tokens 96 → 72 (median_response_tokens failed)"]
    assert adjust_generation(rg.model_copy(update={"max_new_tokens": 40}), ["median_response_tokens"], []
                             )[0].max_new_tokens == 32
    at_floor, changes = adjust_generation(rg.model_copy(update={"max_new_tokens": 32}), ["median_response_tokens"], [])
    assert at_floor.max_new_tokens == 32 and changes[0].startswith("no further adjustment possible")
    # both length rows fail: median wins
    assert adjust_generation(rg, ["token_limit_rate", "median_response_tokens"], [])[0].max_new_tokens == 72


def test_adjust_nothing_fixable(rg: ResponseGenerationConfig) -> None:
    new, changes = adjust_generation(rg, ["pair_acceptance"], ["\nInput:"])
    assert new == rg and new is not rg
    assert changes[0].startswith("no further adjustment possible") and len(changes) == 1
    # already-present delimiters add nothing
    new, changes = adjust_generation(rg.model_copy(update={"temperature": 0.3}), ["delimiter_leakage"],
                                     ["\nInstruction:", "\nResponse:"])
    assert new == rg.model_copy(update={"temperature": 0.3}) and changes[0].startswith("no further adjustment")



# --- the instruction rows -----------------------------------------------------------------------

REPEATS = {"instruction_filter:near_duplicate": 150, "instruction_filter:copies_seed": 20,
           "instruction_filter:critic": 30, "instruction_filter:blacklisted": 8, "pair_filter:critic": 40}


def test_leading_instruction_loss() -> None:
    assert leading_instruction_loss(REPEATS) == ("near_duplicate", 170)  # seed copies count as near-duplicates
    assert leading_instruction_loss({"instruction_filter:blacklisted": 9, "instruction_filter:near_duplicate": 3,
                                     "pair_filter:truncated": 50}) == ("blacklisted", 9)
    assert leading_instruction_loss({"instruction_filter:critic": 9, "instruction_filter:surplus_over_count": 5}) is None
    # a tie goes to near-duplicates (the loss a row can fix)
    assert leading_instruction_loss({"instruction_filter:truncated": 4, "instruction_filter:near_duplicate": 4}
                                    ) == ("near_duplicate", 4)


def test_adjust_instructions_repeats_raise_temperature(ig: InstructionGenerationConfig) -> None:
    before = ig.model_dump()
    new, changes = adjust_instruction_generation(ig, ["near_duplicate_share"], REPEATS)
    assert new.temperature == 0.9 and changes == ["instruction temperature 0.7 → 0.9 (near_duplicate_share failed: "
                                                   "near-duplicates)"]
    assert new.model_dump() == before | {"temperature": 0.9} and ig.model_dump() == before  # only that moved
    # a low yield whose largest loss is near-duplicates takes the same row
    assert adjust_instruction_generation(ig, ["instruction_acceptance"], REPEATS)[0].temperature == 0.9


def test_adjust_instructions_bounds(ig: InstructionGenerationConfig) -> None:
    capped = adjust_instruction_generation(ig.model_copy(update={"temperature": 0.9}), ["near_duplicate_share"], REPEATS)
    assert capped[0].temperature == 1.0  # temperature_cap
    at_cap, changes = adjust_instruction_generation(ig.model_copy(update={"temperature": 1.0}),
                                                    ["near_duplicate_share"], REPEATS)
    assert at_cap.temperature == 1.0 and changes == [f"{NO_ADJUSTMENT} (instruction temperature 1 at cap 1)"]
    above, _ = adjust_instruction_generation(ig.model_copy(update={"temperature": 1.5}), ["near_duplicate_share"], REPEATS)
    assert above.temperature == 1.5  # never lowered to the cap
    greedy, changes = adjust_instruction_generation(ig.model_copy(update={"temperature": 0.0}),
                                                    ["near_duplicate_share"], REPEATS)
    assert greedy.temperature == 0.0 and changes[0].startswith(NO_ADJUSTMENT)


def test_adjust_instructions_yield_lost_elsewhere_has_no_row(ig: InstructionGenerationConfig) -> None:
    new, changes = adjust_instruction_generation(ig, ["instruction_acceptance"],
                                                 {"instruction_filter:blacklisted": 40, "instruction_filter:near_duplicate": 5})
    assert new == ig and changes == [f"{NO_ADJUSTMENT} (instruction_acceptance: largest loss: blacklisted (40), which "
                                     "no instruction setting in the table changes)"]
    assert adjust_instruction_generation(ig, ["runaway_rate"], REPEATS) == (ig, [])  # not an instruction metric


def test_adjust_both_tables(ig: InstructionGenerationConfig, rg: ResponseGenerationConfig) -> None:
    new_ig, new_rg, changes = adjust(ig, rg, ["runaway_rate", "near_duplicate_share"], REPEATS, ["\nInput:"])
    assert new_ig.temperature == 0.9 and new_rg.temperature == 0.6 and new_rg.stop_sequences[-1] == "\nInput:"
    assert changes == ["instruction temperature 0.7 → 0.9 (near_duplicate_share failed: near-duplicates)",
                       "stop_sequences += '\\nInput:'", "temperature 0.7 → 0.6"]
    # one table at its bound, the other moves: the move is what is reported
    new_ig, new_rg, changes = adjust(ig.model_copy(update={"temperature": 1.0}), rg, ["near_duplicate_share",
                                                                                     "token_limit_rate"], REPEATS, [])
    assert new_rg.max_new_tokens == 144 and changes == ["max_new_tokens 96 → 144 (token_limit_rate failed)"]
    # nothing moves: one line, every reason
    new_ig, new_rg, changes = adjust(ig.model_copy(update={"temperature": 1.0}), rg, ["near_duplicate_share",
                                                                                     "pair_acceptance"], REPEATS, [])
    assert (new_ig.temperature, new_rg) == (1.0, rg)
    assert changes == [f"{NO_ADJUSTMENT} (instruction temperature 1 at cap 1; pair_acceptance: no response setting "
                       "in the table raises the pair yield)"]
    assert adjust(ig, rg, [], REPEATS, [])[2] == [f"{NO_ADJUSTMENT} (no fixable metric failed)"]  # sample too small
