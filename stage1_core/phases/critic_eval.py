"""Measure the critic on a labelled file: accuracy, AUC and margins per kind (`load_labels`, `evaluate`;
QC measures the shipped dev split with them). The command line and the labels file's format:
`stage1_core.cli.critic_eval`.

Scores: the pipeline's final score (`critic.pipeline_score`): the critic's margin, or -inf when the
heuristics the pipeline applies before the critic reject the item (`reject_reason`: for
instructions `filters.heuristic_reject_reason` with the config's instruction_filter and seeds, then
`critic.instruction_reject_reason`; `critic.pair_reject_reason` for pairs). The ROUGE-L dedup of
phase 2 depends on the pool, not the item, and is not applied. `--critic-only` ranks the raw margins instead. AUC is the
Mann-Whitney probability that a good item outscores a bad one (ties count one half).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from stage1_core.phases import filters
from stage1_core.infra.config import CriticConfig, InstructionFilterConfig, PilotConfig, load_pilot_config
from stage1_core.phases.critic import ABCritic, Kind, instruction_reject_reason, pair_reject_reason
from stage1_core.infra.errors import InputError
from stage1_core.infra.jsonl import JsonlKind, json_type, read_jsonl
from stage1_core.phases.seeds import load_seeds

KINDS: tuple[Kind, ...] = ("instruction", "pair")
_KEYS = ("kind", "instruction", "response", "label", "note", "split")
_EXAMPLE = '{"kind": "pair", "instruction": "Name a colour.", "response": "Blue.", "label": "good"}'
LABELS_FILE = JsonlKind(item="labels", example=_EXAMPLE, dir_fix="pass the .jsonl file to --labels",
                        missing_fix="check the --labels path (the shipped sets are stage1_core/data/critic_dev.*.jsonl)",
                        empty_fix="add labelled items")
"""How errors name a labels file (read by stage1_core.infra.jsonl, the reader of every JSON Lines input)."""


def load_labels(path: str | Path) -> list[dict[str, Any]]:
    """Read and validate a labelled critic file.

    Returns:
        The items as dicts {"kind", "instruction", "response" (None for instructions), "label", "line"}.
    Raises:
        InputError: the JSONL reader's errors (missing file, UTF-16, bad UTF-8, an over-long line,
            invalid JSON, a repeated key, a line that is not an object, no items at all), or an
            unknown, missing or wrong-typed field, a bad kind or label.
    """
    name = str(path)
    return [_item(obj, name, line_no) for line_no, obj in read_jsonl(path, LABELS_FILE)]


def _item(obj: dict[str, Any], file: str, line_no: int) -> dict[str, Any]:
    for key in obj:
        if key not in _KEYS:
            raise InputError(f"unknown key {key!r}", file=file, line=line_no, field=key,
                             expected=f"only the keys {', '.join(_KEYS)}", fix="remove or rename the key")

    def bad(field: str, msg: str, expected: str, fix: str) -> InputError:
        return InputError(msg, file=file, line=line_no, field=field, expected=expected, fix=fix)

    for key in ("kind", "instruction", "label"):
        if key not in obj:
            raise bad(key, f"missing required field {key!r}", f"a line like {_EXAMPLE}", f"add {key!r}")
        if not isinstance(obj[key], str):
            raise bad(key, f"field {key!r} is a JSON {json_type(obj[key])}, expected a string", "a string",
                      "quote the value")
    if obj["kind"] not in KINDS:
        raise bad("kind", f"invalid kind {obj['kind']!r}", "instruction or pair", "use one of the two kinds")
    if obj["label"] not in ("good", "bad"):
        raise bad("label", f"invalid label {obj['label']!r}", "good or bad", "use one of the two labels")
    if not obj["instruction"].strip() and obj["kind"] == "pair":
        raise bad("instruction", "a pair's instruction is empty", "a non-empty instruction", "fill in the instruction")
    response = obj.get("response")
    if obj["kind"] == "pair":
        if response is None:
            raise bad("response", "a pair item needs a 'response'", "a string (may be empty)", "add the response")
        if not isinstance(response, str):
            raise bad("response", f"field 'response' is a JSON {json_type(response)}, expected a string", "a string",
                      "quote the value")
    elif response is not None:
        raise bad("response", "an instruction item must not have a 'response'", "no response key (or kind pair)",
                  "remove the response or set kind to pair")
    for key in ("note", "split"):
        if key in obj and not isinstance(obj[key], str):
            raise bad(key, f"field {key!r} is a JSON {json_type(obj[key])}, expected a string", "a string", "quote it")
    return {"kind": obj["kind"], "instruction": obj["instruction"], "response": response, "label": obj["label"],
            "line": line_no}


def auc(scores: Sequence[float], positive: Sequence[bool]) -> float | None:
    """Mann-Whitney AUC: P(score of a positive > score of a negative), ties count 1/2.

    Scores may be -inf (heuristic rejects; two -inf tie). None when either class is empty.
    """
    pos = [s for s, y in zip(scores, positive) if y]
    neg = [s for s, y in zip(scores, positive) if not y]
    if not pos or not neg:
        return None
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def _mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 4) if xs else None


def evaluate(items: list[dict[str, Any]], critic: ABCritic, *, heuristics: bool = True,
             instruction_filter: InstructionFilterConfig | None = None, seed_texts: set[str] | None = None,
             both: bool = False) -> dict[str, Any]:
    """Score labelled items and summarise per kind.

    Args:
        items: load_labels output (or dicts with kind, instruction, response, label).
        critic: the critic to measure.
        heuristics: rank the pipeline's final score (heuristic rejects -inf); False: the raw margin.
        instruction_filter: the instruction heuristics' config (default: configs/pilot.yaml's).
        seed_texts: seed instructions for the copies_seed check (default: the packaged seeds).
        both: also add "critic_only_auc" and "critic_only_accuracy" (the raw critic) to each kind.
    Returns:
        {kind: {"n", "accuracy", "auc", "mean_margin_good", "mean_margin_bad", "mean_ab_mass",
        "heuristic_rejects"}} for both kinds; values None when a kind has no items (auc: one class).
        Margins and mass are the critic's own (heuristic rejects included); accuracy and auc follow
        `heuristics`. Each item is scored once.
    """
    if heuristics or both:
        instruction_filter = instruction_filter or load_pilot_config().instruction_filter
        seed_texts = seed_texts if seed_texts is not None else {s.instruction for s in load_seeds(None).seeds}
    out: dict[str, Any] = {}
    for kind in KINDS:
        sub = [i for i in items if i["kind"] == kind]
        crits = critic.score(kind, [(i["instruction"], i["response"] if kind == "pair" else None) for i in sub])
        rejected = []
        for i in sub:
            if not (heuristics or both):
                rejected.append(False)
            else:
                rejected.append(reject_reason(kind, i["instruction"], i["response"], critic.cfg, instruction_filter, seed_texts)
                                is not None)
        good = [i["label"] == "good" for i in sub]

        def summary(rej: list[bool]) -> tuple[float | None, float | None]:
            scores = [-math.inf if r else c.margin for c, r in zip(crits, rej)]
            kept = [c.is_good and not r for c, r in zip(crits, rej)]
            a = auc(scores, good)
            acc = sum(k == g for k, g in zip(kept, good)) / len(sub) if sub else None
            return (round(acc, 4) if acc is not None else None), (round(a, 4) if a is not None else None)

        acc, a = summary(rejected if heuristics else [False] * len(sub))
        out[kind] = {
            "n": len(sub), "accuracy": acc, "auc": a,
            "mean_margin_good": _mean([c.margin for c, g in zip(crits, good) if g]),
            "mean_margin_bad": _mean([c.margin for c, g in zip(crits, good) if not g]),
            "mean_ab_mass": _mean([c.ab_mass for c in crits]) if critic._uses_rubric(kind) else None,
            "heuristic_rejects": sum(rejected),
        }
        if both:
            out[kind]["critic_only_accuracy"], out[kind]["critic_only_auc"] = summary([False] * len(sub))
    return out


def reject_reason(kind: Kind, instruction: str, response: str | None, cfg: CriticConfig,
                  instruction_filter: InstructionFilterConfig | None, seed_texts: set[str] | None) -> str | None:
    """Why the pipeline drops an item before the critic, or None: for instructions the filter
    heuristics (`filters.heuristic_reject_reason`) then the critic's checks
    (`critic.instruction_reject_reason`); for pairs `critic.pair_reject_reason`."""
    if kind == "pair":
        return pair_reject_reason(response or "", cfg.pair_heuristics, instruction)
    reason = None
    if instruction_filter is not None:
        reason = filters.heuristic_reject_reason(instruction, instruction_filter, seed_texts or set())
    return reason or instruction_reject_reason(instruction, cfg.instruction_heuristics)


def critic_settings(cfg: PilotConfig) -> dict[str, Any]:
    """The critic settings that change scores, for the report (rubric texts as short hashes); per kind
    the labels and averaging actually used (a rubric's own settings override the critic's)."""
    import hashlib

    c = cfg.critic.model_dump(mode="json")
    critic = ABCritic(None, cfg.critic)  # type: ignore[arg-type]  # settings only, no scoring
    per_kind = {}
    for kind in KINDS:
        rub = c[f"{kind}_rubric"]
        per_kind[kind] = {"labels": list(critic.labels(kind)), "prompts_per_item": len(critic.variants(kind)),
                          "label_swap": any(s for s, _ in critic.variants(kind)),
                          "order_swap": any(r for _, r in critic.variants(kind)), "examples": len(rub["examples"]),
                          "threshold": critic.threshold(kind),
                          "rubric_sha": hashlib.sha256(json.dumps(rub, sort_keys=True).encode()).hexdigest()[:12]}
    return {"labels": c["labels"], "label_swap": c["label_swap"], "order_swap": c["order_swap"],
            "calibrate": c["calibrate"], "pair_scorer": c["pair_scorer"], "pmi": c["pmi"],
            "pair_heuristics": c["pair_heuristics"], "instruction_heuristics": c["instruction_heuristics"],
            "content_free_input": c["content_free_input"],
            "instruction_examples": len(c["instruction_rubric"]["examples"]), "pair_examples": len(c["pair_rubric"]["examples"]),
            "per_kind": per_kind}
