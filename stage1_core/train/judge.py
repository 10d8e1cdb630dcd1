"""The pairwise judge of the eval: which of two responses is better, read so position cannot win.

Each pair of (base, tuned) responses is shown to a judge model twice, tuned as A and tuned as B; one
forward pass per order reads the next-token log-probabilities of the two labels (best of each
label's variants, with and without a leading space). Per order the verdict is the response the judge
gives more than 1/2 (`tuned`, `base`, or `tie` at exactly 1/2). As in MT-Bench, a pair whose two
orders disagree is a tie: the item scores 1 when both orders prefer tuned, 0 when both prefer base,
1/2 otherwise (and for identical responses, which are not shown to the judge). So a judge that only
reads position, whatever its pull, gives every item 1/2 and a win rate of exactly 1/2.

`summarize` adds the position consistency (share of judged pairs whose two orders agree, Wilson
interval), the share of per-order verdicts that picked the first-shown response, the length gap,
and a length-controlled win rate (`length_controlled`). Below `consistency_floor` the win rate is
marked `uninformative`: the judge agreed with itself across orders too rarely for its verdicts to be
about the responses.

Usage::

    rows = verdicts(judge_backend, template, ("A", "B"), instructions, base_texts, tuned_texts)
    summary = summarize(rows, base_texts, tuned_texts, consistency_floor=0.5, n_boot=2000, seed=0)
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Callable, Sequence

import numpy as np

from stage1_core.infra import stats

LC_RIDGE = 0.1
"""L2 penalty on the two coefficients of the length-controlled fit: keeps them finite when every
item is a win (or every one a loss); against a log-likelihood summed over ~100 items it moves an
unseparated fit by well under 0.01."""


def judge_prompt(template: str, instruction: str, first: str, second: str) -> str:
    """The judge's prompt: `template` with the instruction and the two responses (an empty one as
    "(no response)")."""
    return template.replace("{instruction}", instruction).replace("{response_a}", first or "(no response)") \
        .replace("{response_b}", second or "(no response)")


def _verdict(p_tuned: float) -> str:
    return "tuned" if p_tuned > 0.5 else "base" if p_tuned < 0.5 else "tie"


def verdicts(judge: Any, template: str, labels: tuple[str, str], instructions: Sequence[str],
             base: Sequence[str], tuned: Sequence[str],
             progress: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """Per item, the judge's reading of both orders.

    Args:
        judge: a backend with next_token_logprobs(prompts, candidates).
        template: the judge prompt (placeholders {instruction}, {response_a}, {response_b}).
        labels: the two option labels, A first.
        instructions, base, tuned: per item.
        progress: called with the number of items judged (once, at the end).
    Returns:
        Per item: p_tuned_as_a, p_tuned_as_b (the probability the judge gives the tuned response in
        each order; None for equal responses), verdict_tuned_as_a / _as_b, consistent, equal, score.
    """
    a, b = labels
    cands = [a, " " + a, b, " " + b]
    todo = [i for i in range(len(instructions)) if base[i] != tuned[i]]
    flat = []
    for i in todo:
        flat.append(judge_prompt(template, instructions[i], tuned[i], base[i]))  # tuned is A
        flat.append(judge_prompt(template, instructions[i], base[i], tuned[i]))  # tuned is B
    scores = judge.next_token_logprobs(flat, cands) if flat else []
    if progress is not None:
        progress(len(instructions))
    out: list[dict[str, Any]] = [{"p_tuned_as_a": None, "p_tuned_as_b": None, "verdict_tuned_as_a": None,
                                  "verdict_tuned_as_b": None, "consistent": None, "equal": True, "score": 0.5}
                                 for _ in instructions]
    for j, i in enumerate(todo):
        p = []
        for k, tuned_label in ((0, a), (1, b)):
            s = scores[2 * j + k]
            la, lb = max(s[a], s[" " + a]), max(s[b], s[" " + b])
            m = max(la, lb)
            pa = math.exp(la - m) / (math.exp(la - m) + math.exp(lb - m))
            p.append(pa if tuned_label == a else 1.0 - pa)
        va, vb = _verdict(p[0]), _verdict(p[1])
        score = 1.0 if va == vb == "tuned" else 0.0 if va == vb == "base" else 0.5
        out[i] = {"p_tuned_as_a": p[0], "p_tuned_as_b": p[1], "verdict_tuned_as_a": va, "verdict_tuned_as_b": vb,
                  "consistent": va == vb, "equal": False, "score": score}
    return out


def _fit_logistic(x: np.ndarray, y: np.ndarray, ridge: float = LC_RIDGE) -> tuple[float, float]:
    """(intercept, slope) maximizing sum y log s + (1 - y) log (1 - s), s = sigmoid(a + b x), minus
    ridge / 2 (a² + b²); y may be fractional (1/2 for a tie). Newton's method."""
    X = np.stack([np.ones_like(x), x], axis=1)
    w = np.zeros(2)
    for _ in range(100):
        s = 1.0 / (1.0 + np.exp(-(X @ w)))
        grad = X.T @ (y - s) - ridge * w
        hess = (X * (s * (1 - s))[:, None]).T @ X + ridge * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w = w + step
        if float(np.max(np.abs(step))) < 1e-10:
            break
    return float(w[0]), float(w[1])


def length_controlled(scores: Sequence[float], len_base: Sequence[float], len_tuned: Sequence[float]
                      ) -> tuple[float, float] | None:
    """AlpacaEval 2's length control without its per-instruction term: fit
    logit P(tuned wins) = a + b · tanh(Δ / sd(Δ)), Δ = len(tuned) - len(base) in characters, to the
    item scores (1, 1/2, 0); the length-controlled win rate is sigmoid(a), the predicted win rate
    at equal length.

    Returns:
        (length-controlled win rate, slope b: the judge's log-odds for the longer answer); None for
        no items.
    """
    if not scores:
        return None
    d = np.asarray(len_tuned, dtype=float) - np.asarray(len_base, dtype=float)
    sd = float(d.std())
    x = np.tanh(d / sd) if sd > 0 else np.zeros_like(d)
    a, b = _fit_logistic(x, np.asarray(scores, dtype=float))
    return 1.0 / (1.0 + math.exp(-a)), b


def _lc_ci(scores: Sequence[float], lb: Sequence[float], lt: Sequence[float], n_boot: int, seed: int
           ) -> list[float] | None:
    n = len(scores)
    if not n:
        return None
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    y, b, t = (np.asarray(v, dtype=float) for v in (scores, lb, lt))
    vals = [length_controlled(list(y[r]), list(b[r]), list(t[r]))[0] for r in idx]  # type: ignore[index]
    lo, hi = np.quantile(vals, [0.025, 0.975])
    return [float(lo), float(hi)]


def summarize(rows: Sequence[dict[str, Any]], base: Sequence[str], tuned: Sequence[str], *,
              consistency_floor: float, n_boot: int, seed: int) -> dict[str, Any]:
    """The win-rate section of the report: numbers, or intervals [lo, hi], or null.

    Returns:
        tuned_over_base (+ _ci), n, equal_responses, wins, losses, ties, position_consistency (+ _ci),
        first_position_share, judge_mean_p_first, base_mean_chars, tuned_mean_chars,
        length_diff_chars (+ _ci), length_controlled (+ _ci), length_slope, consistency_floor, and
        `informative` (a bool: position_consistency >= consistency_floor; the caller moves it out).
    """
    scores = [r["score"] for r in rows]
    judged = [r for r in rows if not r["equal"]]
    n_cons = sum(1 for r in judged if r["consistent"])
    cons, cons_ci = (n_cons / len(judged), list(stats.wilson_ci(n_cons, len(judged)) or ())) if judged else (None, None)
    picks = [v == first for r in judged  # per order: did the verdict go to the response shown first?
             for v, first in ((r["verdict_tuned_as_a"], "tuned"), (r["verdict_tuned_as_b"], "base")) if v != "tie"]
    ci = stats.bootstrap_ci(scores, n_boot=n_boot, seed=seed)
    lb, lt = [float(len(x)) for x in base], [float(len(x)) for x in tuned]
    diff = [t - b for b, t in zip(lb, lt)]
    dci = stats.bootstrap_ci(diff, n_boot=n_boot, seed=seed)
    lc = length_controlled(scores, lb, lt)
    informative = cons is not None and cons >= consistency_floor
    return {
        "tuned_over_base": statistics.fmean(scores) if scores else None, "tuned_over_base_ci": list(ci) if ci else None,
        "n": len(scores), "equal_responses": len(rows) - len(judged),
        "wins": sum(1 for s in scores if s == 1.0), "losses": sum(1 for s in scores if s == 0.0),
        "ties": sum(1 for r in judged if r["score"] == 0.5),
        "position_consistency": cons, "position_consistency_ci": cons_ci or None,
        "first_position_share": statistics.fmean(1.0 if p else 0.0 for p in picks) if picks else None,
        "judge_mean_p_first": (statistics.fmean([(r["p_tuned_as_a"] + 1 - r["p_tuned_as_b"]) / 2 for r in judged])
                               if judged else None),
        "base_mean_chars": statistics.fmean(lb) if lb else None, "tuned_mean_chars": statistics.fmean(lt) if lt else None,
        "length_diff_chars": statistics.fmean(diff) if diff else None, "length_diff_chars_ci": list(dci) if dci else None,
        "length_controlled": lc[0] if lc else None,
        "length_controlled_ci": _lc_ci(scores, lb, lt, n_boot, seed),
        "length_slope": lc[1] if lc else None,
        "consistency_floor": consistency_floor,
    } | {"informative": informative}
