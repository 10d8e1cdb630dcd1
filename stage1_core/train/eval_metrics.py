"""The eval's per-model metrics, each with its interval: stop, empty, runaway and token-limit rates
(Wilson), mean tokens and perplexity (bootstrap), and IFEval's four accuracies (`verifiable_metrics`,
per instruction type in `by_type`). Pure: completions and checker results in, numbers out.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Sequence

from stage1_core.infra import stats
from stage1_core.infra.schemas import Completion
from stage1_core.model import cut_at_stop
from stage1_core.phases import qc
from stage1_core.train import checkers, eval_data

STOPPED = ("eos", "blank_line")
VERIFIABLE = ("verifiable_accuracy", "verifiable_prompt_loose", "verifiable_instruction_strict",
              "verifiable_instruction_loose")
MODEL_METRICS = ("stop_rate", "empty_rate", "runaway_rate", "token_limit_rate", "mean_tokens", *VERIFIABLE,
                 "perplexity")


def response_of(c: Completion, stop_sequences: Sequence[str]) -> str:
    """The response text of a completion: cut at the first stop sequence, stripped."""
    return cut_at_stop(c.text, list(stop_sequences)).strip()


def _rate(k: int, n: int) -> tuple[float | None, list[float] | None]:
    ci = stats.wilson_ci(k, n)
    return (k / n if n else None), (list(ci) if ci else None)


def verifiable_metrics(rows: Sequence[dict[str, Any]], n_boot: int, seed: int) -> dict[str, Any]:
    """IFEval's four accuracies over the rows that carry instructions, with intervals: prompt-level
    (Wilson over prompts) and instruction-level (bootstrap over prompts of passed / instructions)."""
    checked = [r for r in rows if r["instruction_ids"]]
    out: dict[str, Any] = {"verifiable_n": len(checked),
                           "verifiable_instructions": sum(len(r["instruction_ids"]) for r in checked)}
    for mode, prompt_key, ins_key in (("strict", "verifiable_accuracy", "verifiable_instruction_strict"),
                                      ("loose", "verifiable_prompt_loose", "verifiable_instruction_loose")):
        out[prompt_key], out[f"{prompt_key}_ci"] = _rate(sum(all(r[mode]) for r in checked), len(checked))
        num = [float(sum(r[mode])) for r in checked]
        den = [float(len(r[mode])) for r in checked]
        out[ins_key] = sum(num) / sum(den) if checked else None
        ci = stats.bootstrap_ci_ratio(num, den, n_boot=n_boot, seed=seed) if checked else None
        out[f"{ins_key}_ci"] = list(ci) if ci else None
    return out


def by_type(rows: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per IFEval instruction id: n and each model's strict and loose accuracy with Wilson intervals."""
    out: dict[str, dict[str, Any]] = {}
    for iid in sorted({i for r in rows["base"] for i in r["instruction_ids"]}):
        entry: dict[str, Any] = {}
        for model, rs in rows.items():
            res = [(r["strict"][k], r["loose"][k]) for r in rs for k, i in enumerate(r["instruction_ids"]) if i == iid]
            entry["n"] = len(res)
            for j, mode in enumerate(("strict", "loose")):
                entry[f"{model}_{mode}"], entry[f"{model}_{mode}_ci"] = _rate(sum(x[j] for x in res), len(res))
        out[iid] = entry
    return out


def model_metrics(items: Sequence[eval_data.EvalPrompt], completions: Sequence[Completion],
                  stops: Sequence[Sequence[str]], nll: Sequence[tuple[float, int]], n_boot: int,
                  seed: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One model's metrics and per-prompt rows.

    Args:
        items: the eval prompts.
        completions: the model's completion of each prompt's zero-shot prompt.
        stops: per prompt, the stop sequences its completion ran under.
        nll: (sum of log-probabilities, tokens) of each reference response.
    Returns:
        (metrics with `<metric>_ci` beside each, rows per prompt).
    """
    rows, n = [], len(items)
    for it, c, stop in zip(items, completions, stops):
        resp = response_of(c, stop)
        res = checkers.follows(it.instruction_ids, it.kwargs, resp) if it.checked else {"strict": [], "loose": []}
        rows.append({"id": it.id, "response": resp, "raw": c.text, "stop_reason": c.stop_reason, "n_tokens": c.n_tokens,
                     "stopped": bool(resp) and c.stop_reason in STOPPED, "empty": not resp,
                     "runaway": qc.is_runaway(c.text, c.stop_reason), "token_limit": c.stop_reason == "token_limit",
                     "instruction_ids": list(it.instruction_ids), "strict": res["strict"], "loose": res["loose"]})
    out: dict[str, Any] = {"n": n}
    for name, key in (("stop_rate", "stopped"), ("empty_rate", "empty"), ("runaway_rate", "runaway"),
                      ("token_limit_rate", "token_limit")):
        out[name], out[f"{name}_ci"] = _rate(sum(r[key] for r in rows), n)
    tokens = [float(r["n_tokens"]) for r in rows]
    out["mean_tokens"] = statistics.fmean(tokens) if tokens else None
    ci = stats.bootstrap_ci(tokens, n_boot=n_boot, seed=seed)
    out["mean_tokens_ci"] = list(ci) if ci else None
    out.update(verifiable_metrics(rows, n_boot, seed))
    neg = [-lp for lp, _ in nll]
    toks = [float(t) for _, t in nll]
    out["perplexity"] = math.exp(sum(neg) / sum(toks)) if nll and sum(toks) > 0 else None
    ci = stats.bootstrap_ci_ratio(neg, toks, transform=math.exp, n_boot=n_boot, seed=seed) if nll else None
    out["perplexity_ci"] = list(ci) if ci else None
    out["perplexity_tokens"] = int(sum(toks))
    return out, rows
