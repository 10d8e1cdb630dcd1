"""QC of a pilot: metrics with Wilson intervals, the pure gate decision, the adjustment tables.

    metrics = compute_metrics(instructions_generated=..., instructions_kept=..., instructions_distinct=...,
                              instructions_critic_rejected=..., instructions_near_duplicate=...,
                              response_completions=[{"raw": ..., "stop_reason": ...}, ...],
                              kept_pairs=[{"response": ..., "response_tokens": ...}, ...],
                              pairs_generated=..., pairs_critic_rejected=..., critic_dev_accuracy=None,
                              thresholds=cfg.qc)
    decision = gate(metrics, cfg.qc, pairs_generated=..., iteration=1, max_iterations=cfg.max_iterations)
    if decision.decision == "iterate":
        ig, i_changes = adjust_instruction_generation(cfg.instruction_generation, decision.failed, rejected_by_reason)
        rg, r_changes = adjust_generation(cfg.response_generation, decision.failed, observed_delimiters(raws))

Every metric is a dict {"value", "k", "n", "ci95", "op", "threshold", "passed"}. Operators are
binding and compared exactly (a rate k/n as the fraction k/n, a threshold as the decimal written in
the config): `<` strict (runaway_rate, token_limit_rate, median_response_tokens, near_duplicate_share),
`>=` inclusive (instruction_critic_acceptance, pair_critic_acceptance, instruction_acceptance,
pair_acceptance, critic_dev_accuracy and critic_dev_auc_* when gated), `<=` for the leakage count.
A metric that is undefined (a rate over n == 0, a median of nothing, a gated critic accuracy that
was not measured) has value None and fails. Reported-only metrics have op "report" and passed None.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Literal

from stage1_core.infra.config import InstructionGenerationConfig, QCThresholds, ResponseGenerationConfig

Decision = Literal["scale", "iterate", "halt"]
Op = Literal["<", ">=", "<=", "report"]

# Fixable misses are cost (repeats, yield) or response form: a setting can change them, so they iterate.
FIXABLE: tuple[str, ...] = ("runaway_rate", "token_limit_rate", "delimiter_leakage", "median_response_tokens",
                            "instruction_acceptance", "pair_acceptance", "near_duplicate_share")
# The quality bar (the critics' acceptance) and the critic's own dev-set checks: no setting fixes them.
HALTING: tuple[str, ...] = ("instruction_critic_acceptance", "pair_critic_acceptance", "critic_dev_accuracy",
                             "critic_dev_auc_instruction", "critic_dev_auc_pair")
INSTRUCTION_METRICS: tuple[str, ...] = ("instruction_acceptance", "near_duplicate_share")
CRITIC_AUC_METRICS: tuple[str, ...] = ("critic_dev_auc_instruction", "critic_dev_auc_pair")
METRIC_NAMES: tuple[str, ...] = ("runaway_rate", "token_limit_rate", "delimiter_leakage", "median_response_tokens",
                                 "instruction_critic_acceptance", "pair_critic_acceptance", "instruction_acceptance",
                                 "pair_acceptance", "near_duplicate_share", "critic_dev_accuracy",
                                 "critic_dev_auc_instruction", "critic_dev_auc_pair", "diversity")
# Rejection reasons (phase instruction_filter) that count as near-duplicates: of a kept instruction or of a seed.
NEAR_DUPLICATE_REASONS: tuple[str, ...] = ("near_duplicate", "copies_seed")


def rejections(by_reason: dict[str, int], phase: str, *reasons: str) -> int:
    """How many rejections of `phase` have one of `reasons`, from a {"phase:reason": count} table
    (`pipeline.count_reasons`, qc_summary's rejected_by_reason)."""
    return sum(by_reason.get(f"{phase}:{r}", 0) for r in reasons)
LEAK_MARKERS: tuple[str, ...] = ("Instruction:", "Response:")
DELIMITER_CANDIDATES: tuple[str, ...] = ("\nInstruction:", "\nResponse:", "Instruction:", "Response:", "\nInput:",
                                         "\nOutput:", "\n###", "\nQuestion:", "\nAnswer:")
TEMPERATURE_STEP = 0.1
TEMPERATURE_FLOOR = 0.3
TOKENS_UP = 1.5
TOKENS_DOWN = 0.75
INSTRUCTION_TEMPERATURE_STEP = 0.2  # measured: bench/instruction_diversity.py, docs/metrics.md
NO_ADJUSTMENT = "no further adjustment possible"
RANDOM_WEIGHTS_REASON = "random-weight model (benchmark only)"
_FAILED_OP = {"<": "≥", ">=": "<", "<=": ">"}


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k/n.

    Args:
        k: successes, 0 <= k <= n.
        n: trials, >= 0.
        z: normal quantile (default: 95 %).
    Returns:
        (low, high) clamped to [0, 1]; (0.0, 1.0) when n == 0.
    Raises:
        ValueError: n < 0 or k outside [0, n].
    """
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"wilson_interval needs 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def is_runaway(raw: str, stop_reason: str) -> bool:
    """A completion ran away: it began a new block, or its raw text repeats a non-empty line.

    Args:
        raw: the raw completion text.
        stop_reason: its stop reason (eos | blank_line | next_block | token_limit).
    Returns:
        True when stop_reason == "next_block" or two stripped non-empty lines are identical.
    """
    if stop_reason == "next_block":
        return True
    counts = Counter(line.strip() for line in raw.splitlines() if line.strip())
    return any(c >= 2 for c in counts.values())


def has_leakage(response: str) -> bool:
    """The cleaned response still contains a block delimiter ("Instruction:" or "Response:")."""
    return any(marker in response for marker in LEAK_MARKERS)


def _exact(x: float | int | Fraction) -> Fraction:
    """Exact value of a number; floats as the shortest decimal that round-trips (0.05 -> 1/20)."""
    if isinstance(x, float):
        return Fraction(repr(x))
    return Fraction(x)


def _passes(value: float | int | Fraction, op: Op, threshold: float | int) -> bool:
    lhs, rhs = _exact(value), _exact(threshold)
    if op == "<":
        return lhs < rhs
    if op == ">=":
        return lhs >= rhs
    if op == "<=":
        return lhs <= rhs
    raise ValueError(f"operator {op!r} is not a comparison")


def _metric(value: float | int | None, op: Op, threshold: float | int | None, *, k: int | None = None,
            n: int | None = None, ci95: tuple[float, float] | None = None, passed: bool | None = None) -> dict[str, Any]:
    return {"value": value, "k": k, "n": n, "ci95": list(ci95) if ci95 is not None else None,
            "op": op, "threshold": threshold, "passed": passed}


def _rate(name: str, k: int, n: int, op: Op, threshold: float | None) -> dict[str, Any]:
    """A rate metric; undefined (n == 0) is value None and fails when gated."""
    if k < 0 or n < 0 or k > n:
        raise ValueError(f"{name}: need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return _metric(None, op, threshold, k=k, n=n, ci95=(0.0, 1.0), passed=None if op == "report" else False)
    passed = None if op == "report" or threshold is None else _passes(Fraction(k, n), op, threshold)
    return _metric(k / n, op, threshold, k=k, n=n, ci95=wilson_interval(k, n), passed=passed)


def critic_dev_auc(critic_dev: dict[str, Any] | None) -> dict[str, float | None]:
    """The dev-set AUC per kind ({"instruction": x, "pair": y}, None where unmeasured) from a
    `critic_dev` record (the pilot's qc_summary / a shard manifest)."""
    return {k: ((critic_dev or {}).get(k) or {}).get("auc") for k in ("instruction", "pair")}


def compute_metrics(*, instructions_generated: int, instructions_kept: int, instructions_distinct: int,
                    instructions_critic_rejected: int, instructions_near_duplicate: int,
                    response_completions: list[dict[str, Any]], kept_pairs: list[dict[str, Any]], pairs_generated: int,
                    pairs_critic_rejected: int, critic_dev_accuracy: float | None, thresholds: QCThresholds,
                    critic_dev_auc: dict[str, float | None] | None = None) -> dict[str, dict[str, Any]]:
    """All QC metrics of one pilot (keys: METRIC_NAMES).

    The critics' acceptance (accepted / judged by that critic) is the quality bar and halts; yield
    (`instruction_acceptance`, `pair_acceptance`: kept / generated) and `near_duplicate_share`
    (near-duplicates / generated) are cost, and iterate.

    Args:
        instructions_generated: instructions parsed from the model's lists.
        instructions_kept: instructions left after heuristics, dedup and the critic (all judged good).
        instructions_distinct: instructions left after dedup (for diversity).
        instructions_critic_rejected: instructions the instruction critic judged bad.
        instructions_near_duplicate: instructions dropped as near-duplicates (NEAR_DUPLICATE_REASONS).
        response_completions: one {"raw": str, "stop_reason": str} per response completion.
        kept_pairs: one {"response": cleaned str, "response_tokens": int} per kept pair (all judged good).
        pairs_generated: pairs generated (each response completion is one).
        pairs_critic_rejected: pairs the pair critic judged bad.
        critic_dev_accuracy: the critic's accuracy on the shipped dev set, or None if not measured.
        thresholds: the QC thresholds.
        critic_dev_auc: the critic's dev-set AUC per kind ({"instruction": x, "pair": y}), or None.
    Returns:
        {name: {"value", "k", "n", "ci95", "op", "threshold", "passed"}}. Rates carry k, n and the
        Wilson ci95 [lo, hi]; delimiter_leakage's value is a count (k = count, n = kept responses);
        median_response_tokens has n = kept pairs; critic_dev_accuracy has k/n None. Values that
        are not rates carry ci95 None.
    Raises:
        ValueError: a numerator is negative or exceeds its denominator.
    """
    n_comp = len(response_completions)
    runaway = sum(1 for c in response_completions if is_runaway(c["raw"], c["stop_reason"]))
    token_limit = sum(1 for c in response_completions if c["stop_reason"] == "token_limit")
    leaks = sum(1 for p in kept_pairs if has_leakage(p["response"]))
    tokens = [p["response_tokens"] for p in kept_pairs]
    median = statistics.median(tokens) if tokens else None

    metrics: dict[str, dict[str, Any]] = {
        "runaway_rate": _rate("runaway_rate", runaway, n_comp, "<", thresholds.runaway_rate_max),
        "token_limit_rate": _rate("token_limit_rate", token_limit, n_comp, "<", thresholds.token_limit_rate_max),
        "delimiter_leakage": _metric(leaks, "<=", thresholds.leakage_max, k=leaks, n=len(kept_pairs),
                                     passed=_passes(leaks, "<=", thresholds.leakage_max)),
        "median_response_tokens": _metric(median, "<", thresholds.median_response_tokens_max, n=len(tokens),
                                          passed=median is not None
                                          and _passes(median, "<", thresholds.median_response_tokens_max)),
        "instruction_critic_acceptance": _rate("instruction_critic_acceptance", instructions_kept,
                                               instructions_kept + instructions_critic_rejected, ">=",
                                               thresholds.instruction_critic_acceptance_min),
        "pair_critic_acceptance": _rate("pair_critic_acceptance", len(kept_pairs), len(kept_pairs) + pairs_critic_rejected,
                                        ">=", thresholds.pair_critic_acceptance_min),
        "instruction_acceptance": _rate("instruction_acceptance", instructions_kept, instructions_generated, ">=",
                                        thresholds.instruction_acceptance_min),
        "pair_acceptance": _rate("pair_acceptance", len(kept_pairs), pairs_generated, ">=",
                                 thresholds.pair_acceptance_min),
        "near_duplicate_share": _rate("near_duplicate_share", instructions_near_duplicate, instructions_generated, "<",
                                      thresholds.near_duplicate_share_max),
    }
    gate_critic = thresholds.critic_min_accuracy is not None
    if gate_critic:
        critic_passed: bool | None = critic_dev_accuracy is not None and _passes(
            critic_dev_accuracy, ">=", thresholds.critic_min_accuracy)
    else:
        critic_passed = None
    metrics["critic_dev_accuracy"] = _metric(critic_dev_accuracy, ">=" if gate_critic else "report",
                                             thresholds.critic_min_accuracy, passed=critic_passed)
    gate_auc = thresholds.critic_min_auc is not None
    for name in CRITIC_AUC_METRICS:
        value = (critic_dev_auc or {}).get(name.rsplit("_", 1)[1])
        passed = (value is not None and _passes(value, ">=", thresholds.critic_min_auc)) if gate_auc else None
        metrics[name] = _metric(value, ">=" if gate_auc else "report", thresholds.critic_min_auc, passed=passed)
    metrics["diversity"] = _rate("diversity", instructions_distinct, instructions_generated, "report", None)
    return metrics


@dataclass
class GateDecision:
    """The gate's verdict: decision, human-readable reasons, and the names of failed metrics."""

    decision: Decision
    reasons: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: {"decision", "reasons", "failed"}."""
        return {"decision": self.decision, "reasons": list(self.reasons), "failed": list(self.failed)}


def _fmt(x: float | int, other: float | int | None = None) -> str:
    """Short number: 3 decimals, more when rounding would make it look equal to `other`."""
    if isinstance(x, int) and not isinstance(x, bool):
        return str(x)
    s = f"{x:.3f}".rstrip("0").rstrip(".")
    if other is not None and float(s) == float(other) and x != other:
        s = repr(float(x))
    return s


def _reason(name: str, m: dict[str, Any], kind: str) -> str:
    if m["value"] is None:
        what = f"undefined (n = {m['n']})" if m.get("n") is not None else "not measured"
        return f"{name} {what} ({kind})"
    return f"{name} {_fmt(m['value'], m['threshold'])} {_FAILED_OP[m['op']]} {_fmt(m['threshold'])} ({kind})"


def _halting_kind(name: str, m: dict[str, Any]) -> str:
    """"halting", and for a critic's acceptance what it means: the quality bar, which no setting moves."""
    if name in ("instruction_critic_acceptance", "pair_critic_acceptance") and m["value"] is not None:
        what = "instructions" if name.startswith("instruction") else "pairs"
        return (f"halting: quality bar; the {name.split('_')[0]} critic accepted {m['k']} of the {m['n']} {what} it "
                "judged, and no generation setting raises that")
    return "halting"


def gate(metrics: dict[str, dict[str, Any]], thresholds: QCThresholds, *, pairs_generated: int, iteration: int,
         max_iterations: int, allow_iterate_when_exhausted: bool = False, model_id: str | None = None) -> GateDecision:
    """The pure gate: scale, iterate (fixable misses or too small a sample) or halt.

    Order: any failed halting metric (the quality bar: instruction_critic_acceptance,
    pair_critic_acceptance; critic_dev_accuracy when thresholds.critic_min_accuracy is set,
    critic_dev_auc_instruction / critic_dev_auc_pair when thresholds.critic_min_auc is set) -> halt;
    else pairs_generated < thresholds.min_n -> iterate ("sample too small ..."); else any failed
    fixable metric (response form, yield, near-duplicates) -> iterate; else scale. An
    iterate with no reruns left (iteration > max_iterations) becomes halt, its first reason
    "iterations exhausted (N of M reruns used)", unless allow_iterate_when_exhausted. A run of a
    random-weight model (`model_id` "random:...") always halts, its first reason
    RANDOM_WEIGHTS_REASON: such data is for benchmarks only.

    Args:
        metrics: compute_metrics output (its "passed" fields are what the gate reads).
        thresholds: the QC thresholds (min_n, whether the critic is gated).
        pairs_generated: pairs generated in this pilot iteration.
        iteration: 1-based count of pilot iterations done so far (1 = the first pilot).
        max_iterations: reruns allowed after the first pilot.
        allow_iterate_when_exhausted: return iterate instead of halt when no reruns are left.
        model_id: the run's model.id (ModelConfig.id), if known.
    Returns:
        GateDecision; `failed` lists halting failures first, then fixable ones.
    Raises:
        ValueError: a metric is missing, iteration < 1, or max_iterations < 0.
    """
    gated_halting = [m for m in HALTING if (m != "critic_dev_accuracy" or thresholds.critic_min_accuracy is not None)
                     and (m not in CRITIC_AUC_METRICS or thresholds.critic_min_auc is not None)]
    missing = [m for m in (*FIXABLE, *gated_halting) if m not in metrics]
    if missing:
        raise ValueError(f"gate: metrics lack {', '.join(missing)} (pass the output of compute_metrics)")
    if iteration < 1 or max_iterations < 0:
        raise ValueError(f"gate: need iteration >= 1 and max_iterations >= 0, got {iteration} and {max_iterations}")
    if model_id is not None and model_id.strip().startswith("random:"):
        decided = gate(metrics, thresholds, pairs_generated=pairs_generated, iteration=iteration,
                       max_iterations=max_iterations, allow_iterate_when_exhausted=allow_iterate_when_exhausted)
        reasons = [r for r in decided.reasons if decided.decision != "scale"]
        return GateDecision("halt", [f"{RANDOM_WEIGHTS_REASON}: {model_id.strip()}"] + reasons, decided.failed)

    halting_failed = [m for m in gated_halting if metrics[m]["passed"] is False]
    fixable_failed = [m for m in FIXABLE if metrics[m]["passed"] is False]
    fixable_reasons = [_reason(m, metrics[m], "fixable: iterate") for m in fixable_failed]
    if halting_failed:
        reasons = [_reason(m, metrics[m], _halting_kind(m, metrics[m])) for m in halting_failed] + fixable_reasons
        return GateDecision("halt", reasons, halting_failed + fixable_failed)

    if pairs_generated < thresholds.min_n:
        reasons = [f"sample too small: n = {pairs_generated} pairs generated < min_n = {thresholds.min_n}"]
        reasons += fixable_reasons
    elif fixable_failed:
        reasons = fixable_reasons
    else:
        return GateDecision("scale", [f"all gated metrics passed (n = {pairs_generated} pairs ≥ min_n = "
                                      f"{thresholds.min_n})"], [])

    if iteration > max_iterations:
        exhausted = f"iterations exhausted ({iteration - 1} of {max_iterations} reruns used)"
        if allow_iterate_when_exhausted:
            return GateDecision("iterate", reasons + [f"{exhausted}: iterate returned for the caller to act on"],
                                fixable_failed)
        return GateDecision("halt", [exhausted] + reasons, fixable_failed)
    return GateDecision("iterate", reasons, fixable_failed)


def observed_delimiters(raws: list[str]) -> list[str]:
    """Which DELIMITER_CANDIDATES occur in the raw completions, most frequent first.

    Frequency is the number of completions containing the delimiter; ties keep the candidate order.

    Args:
        raws: raw completion texts.
    Returns:
        The delimiters seen at least once.
    """
    counts = {d: sum(1 for r in raws if d in r) for d in DELIMITER_CANDIDATES}
    seen = [d for d in DELIMITER_CANDIDATES if counts[d] > 0]
    return sorted(seen, key=lambda d: -counts[d])  # stable: ties stay in candidate order


def adjust_generation(rg: ResponseGenerationConfig, failed: list[str],
                      observed_delimiters: list[str]) -> tuple[ResponseGenerationConfig, list[str]]:
    """The adjustment table: new response-generation settings for the next pilot iteration.

    | failed                                  | change                                                   |
    |-----------------------------------------|----------------------------------------------------------|
    | runaway_rate or delimiter_leakage       | add observed delimiters to stop_sequences; temperature   |
    |                                         | -0.1 (floor 0.3, never raised; 0 = greedy is left alone)  |
    | token_limit_rate                        | max_new_tokens x1.5, capped at max_new_tokens_cap        |
    | median_response_tokens                  | max_new_tokens x0.75, floored at min_new_tokens_floor    |

    When token_limit_rate and median_response_tokens both fail, the median row wins: long
    responses that also hit the limit are rambling, not truncated answers, and raising the limit
    would make the length miss worse. Bounds never move a value the wrong way (a temperature
    already below the floor, or max_new_tokens already below the floor, stays put).

    Args:
        rg: the current settings (not mutated).
        failed: names of failed metrics (GateDecision.failed); non-fixable names are ignored.
        observed_delimiters: delimiters seen in raw completions (see `observed_delimiters`).
    Returns:
        (a new config, change descriptions). When nothing can change: an equal copy and
        ["no further adjustment possible (...)"].
    """
    update: dict[str, Any] = {}
    changes: list[str] = []
    at_bounds: list[str] = []
    if "runaway_rate" in failed or "delimiter_leakage" in failed:
        new_stops = [d for d in dict.fromkeys(observed_delimiters) if d and d not in rg.stop_sequences]
        if new_stops:
            update["stop_sequences"] = [*rg.stop_sequences, *new_stops]
            changes.append(f"stop_sequences += {', '.join(repr(d) for d in new_stops)}")
        else:
            at_bounds.append("no new delimiters observed")
        t = rg.temperature
        if t > 0:
            new_t = min(t, max(TEMPERATURE_FLOOR, round(t - TEMPERATURE_STEP, 2)))
            if new_t != t:
                update["temperature"] = new_t
                changes.append(f"temperature {t:g} → {new_t:g}")
            else:
                at_bounds.append(f"temperature {t:g} at floor {TEMPERATURE_FLOOR:g}")
        else:
            at_bounds.append("temperature 0 (greedy) left as is")
    cur = rg.max_new_tokens
    if "median_response_tokens" in failed:
        new = min(cur, max(rg.min_new_tokens_floor, int(cur * TOKENS_DOWN)))
        if new != cur:
            update["max_new_tokens"] = new
            changes.append(f"max_new_tokens {cur} → {new} (median_response_tokens failed)")
        else:
            at_bounds.append(f"max_new_tokens {cur} at floor {rg.min_new_tokens_floor}")
    elif "token_limit_rate" in failed:
        new = max(cur, min(rg.max_new_tokens_cap, int(cur * TOKENS_UP)))
        if new != cur:
            update["max_new_tokens"] = new
            changes.append(f"max_new_tokens {cur} → {new} (token_limit_rate failed)")
        else:
            at_bounds.append(f"max_new_tokens {cur} at cap {rg.max_new_tokens_cap}")
    if "pair_acceptance" in failed and not update:
        at_bounds.append("pair_acceptance: no response setting in the table raises the pair yield")
    if not update:
        detail = "; ".join(at_bounds) if at_bounds else "no fixable metric failed"
        return rg.model_copy(deep=True), [f"{NO_ADJUSTMENT} ({detail})"]
    return rg.model_copy(update=update, deep=True), changes


def leading_instruction_loss(rejected_by_reason: dict[str, int]) -> tuple[str, int] | None:
    """The instruction filter's largest loss other than the critic, as (reason, count), near-duplicates
    (NEAR_DUPLICATE_REASONS) counted together as "near_duplicate"; None when nothing but the critic
    rejected. `rejected_by_reason` is qc_summary's {"phase:reason": count}."""
    losses: Counter[str] = Counter()
    for key, n in rejected_by_reason.items():
        phase, _, reason = key.partition(":")
        if phase != "instruction_filter" or reason in ("critic", "surplus_over_count"):
            continue
        losses["near_duplicate" if reason in NEAR_DUPLICATE_REASONS else reason] += n
    if not losses:
        return None
    reason, n = max(losses.items(), key=lambda kv: (kv[1], kv[0] == "near_duplicate"))
    return reason, n


def adjust_instruction_generation(ig: InstructionGenerationConfig, failed: list[str],
                                  rejected_by_reason: dict[str, int]) -> tuple[InstructionGenerationConfig, list[str]]:
    """The instruction rows of the adjustment table: new instruction-generation settings.

    | failed                                         | change                                          |
    |------------------------------------------------|-------------------------------------------------|
    | near_duplicate_share                           | temperature +0.2, capped at temperature_cap     |
    | instruction_acceptance, near-duplicates the    | the same                                        |
    | largest loss besides the critic                |                                                 |

    Measured (bench/instruction_diversity.py, docs/metrics.md): on the embedded 270M model, raising
    the list temperature is what removes repeats; mixing kept machine instructions into the few-shot
    (`machine_examples: 2`) did not (near-duplicates 0.66 vs 0.61 at 0.7), so it is no row. A yield
    lost mostly to something else (blacklisted words, truncated or leaked items, other heuristics)
    has no row: the run halts, naming the loss. Greedy lists (temperature 0) are left alone, like responses.

    Args:
        ig: the current settings (not mutated).
        failed: names of failed metrics (GateDecision.failed); names of other rows are ignored.
        rejected_by_reason: qc_summary's rejected_by_reason ({"phase:reason": count}).
    Returns:
        (a new config, change descriptions). When nothing can change: an equal copy and
        ["no further adjustment possible (...)"]; when no instruction metric failed: an equal copy and [].
    """
    mine = [m for m in failed if m in INSTRUCTION_METRICS]
    if not mine:
        return ig.model_copy(deep=True), []
    leading = leading_instruction_loss(rejected_by_reason)
    repeats = "near_duplicate_share" in mine or (leading is not None and leading[0] == "near_duplicate")
    if not repeats:
        what = f"largest loss: {leading[0]} ({leading[1]})" if leading else "every loss is the critic's"
        return ig.model_copy(deep=True), [f"{NO_ADJUSTMENT} (instruction_acceptance: {what}, which no instruction "
                                          "setting in the table changes)"]
    t = ig.temperature
    if t <= 0:
        return ig.model_copy(deep=True), [f"{NO_ADJUSTMENT} (instruction temperature 0 (greedy) left as is)"]
    new_t = max(t, min(ig.temperature_cap, round(t + INSTRUCTION_TEMPERATURE_STEP, 2)))
    if new_t == t:
        return ig.model_copy(deep=True), [f"{NO_ADJUSTMENT} (instruction temperature {t:g} at cap "
                                          f"{ig.temperature_cap:g})"]
    why = ", ".join(mine)
    return ig.model_copy(update={"temperature": new_t}, deep=True), [
        f"instruction temperature {t:g} → {new_t:g} ({why} failed: near-duplicates)"]


def adjust(ig: InstructionGenerationConfig, rg: ResponseGenerationConfig, failed: list[str],
           rejected_by_reason: dict[str, int], observed: list[str]
           ) -> tuple[InstructionGenerationConfig, ResponseGenerationConfig, list[str]]:
    """Both adjustment tables after an `iterate`: instruction rows (`adjust_instruction_generation`)
    and response rows (`adjust_generation`).

    Returns:
        (instruction settings, response settings, changes). A changed instruction setting means the
        next iteration reruns phases 1-5; a changed response setting alone, phases 3-5. When nothing
        changes, the changes are one "no further adjustment possible (...)" line naming, per failed
        metric, why (at a bound, or no row for it).
    """
    new_ig, i_changes = adjust_instruction_generation(ig, failed, rejected_by_reason)
    response_failed = [m for m in failed if m not in INSTRUCTION_METRICS]
    if response_failed:
        new_rg, r_changes = adjust_generation(rg, response_failed, observed)
    else:
        new_rg, r_changes = rg.model_copy(deep=True), []
    changed = [c for c in (*i_changes, *r_changes) if not c.startswith(NO_ADJUSTMENT)]
    if new_ig != ig or new_rg != rg:
        return new_ig, new_rg, changed
    details = [c[len(NO_ADJUSTMENT):].strip(" ()") for c in (*i_changes, *r_changes) if c.startswith(NO_ADJUSTMENT)]
    return new_ig, new_rg, [f"{NO_ADJUSTMENT} ({'; '.join(d for d in details if d) or 'no fixable metric failed'})"]
