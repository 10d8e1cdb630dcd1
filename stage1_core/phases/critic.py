"""The critic: single-token rubric scoring (A/B or Yes/No, zero- or few-shot), debiasing, and PMI.

Rubric scoring: a rubric prompt ends in "Answer:"; one forward pass; each label's log-probability
is the best of its variants ("A" and " A"). Debiasing, all optional (`CriticConfig`):
- `label_swap`: also score with the two meanings swapped (the first label means bad), averaging the
  good-minus-bad margins by meaning, so a pure preference for one label cancels;
- `order_swap`: also score with the few-shot examples in reverse order (recency bias cancels);
- `calibrate`: subtract the margin the same prompts give a content-free input (`content_free_input`).
With both swaps every item is scored under four prompts. A rubric may set its own `labels`,
`label_swap`, `order_swap` (the shipped pair rubric is Yes/No, one prompt). No sampling anywhere.

PMI (pairs, `pair_scorer: pmi | rubric+pmi`): log p(response + end | PMI context with the
instruction) - log p(response + end | the same context with the content-free input).

Cheap checks run before the critic (`instruction_reject_reason`, `pair_reject_reason`); with
`filters.heuristic_reject_reason` for instructions, their rejects get the pipeline score -inf
(`pipeline_score`), which is what critic_eval ranks.

Reported fields use the canonical meaning A = good: `logp_a` is the (averaged) log-probability of
the good answer, `logp_b` of the bad one, `margin = logp_a - logp_b - calibration_offset`
(+ `pmi.weight * pmi` with rubric+pmi; `margin = pmi` with pmi alone, where logp_a/logp_b are the
conditional/unconditional log-probabilities and ab_mass is 0).

Run `python -m stage1_core.cli.critic_eval --labels FILE` to measure a configuration.
"""

from __future__ import annotations

import inspect
import math
import re
from collections import Counter
from typing import Literal

from stage1_core.phases import prompts
from stage1_core.model import Backend, ProgressFn
from stage1_core.infra.config import CriticConfig, Rubric
from stage1_core.infra.schemas import Critique

Kind = Literal["instruction", "pair"]
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")


_DANGLING = frozenset(
    "a an the and or but nor of to in on at for with about from by into onto than as if because while "
    "is are was were be been being am will would can could should may might must shall do does did has have had "
    "that which who whom whose what your my our their his her its this these those some every each "
    "very more most such between through over under after before during without within like across against "
    "toward towards upon per via not no how why when where whether".split())
_EMPTY_ITEM = re.compile(r"^\s*\d+\s*[.)]\s*$")
_NUMBERED = re.compile(r"^\s*\d+\s*[.)]\s")


def _norm(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


def truncated(text: str) -> bool:
    """The text stops mid-sentence: it ends in a function word (article, preposition, conjunction,
    auxiliary, determiner) or in a comma, colon or hyphen, as a completion cut at its token limit does."""
    t = text.rstrip()
    if not t:
        return False
    if t[-1] in ",:;-(":
        return True
    words = t.split()
    return t[-1].isalnum() and words[-1].lower() in _DANGLING


def repetitive(text: str) -> bool:
    """A non-empty line or a sentence of 3+ words repeats, a word 4-gram occurs 3+ times, or one word is
    over half of 8+ words."""
    lines = Counter(line.strip() for line in text.splitlines() if line.strip())
    sentences = Counter(_norm(x) for x in re.split(r"[.!?\n]+", text) if len(_WORD.findall(x.lower())) >= 3)
    words = _WORD.findall(text.lower())
    grams = Counter(tuple(words[i:i + 4]) for i in range(len(words) - 3))
    top = Counter(words).most_common(1)
    return any(c >= 2 for c in lines.values()) or any(c >= 2 for c in sentences.values()) \
        or any(c >= 3 for c in grams.values()) \
        or (len(words) >= 8 and bool(top) and top[0][1] * 2 > len(words))


def list_residue(text: str, numbered_lines: int = 2) -> bool:
    """An empty list item ("2." alone on a line), or `numbered_lines`+ lines that start with a number."""
    lines = text.splitlines()
    return any(_EMPTY_ITEM.match(line) for line in lines) or sum(bool(_NUMBERED.match(line)) for line in lines) >= numbered_lines


_INSTR_LEAKS = ("Instruction:", "Response:", "Answer:")
_PAIR_LEAKS = ("Instruction:", "Response:")  # qc.LEAK_MARKERS (not imported: QC edits must not invalidate the critic phases)


def instruction_reject_reason(text: str, heuristics: bool = True) -> str | None:
    """The critic's cheap check an instruction fails, or None (applied after filters' heuristics).

    With `heuristics` (CriticConfig.instruction_heuristics): `leakage` (holds "Instruction:",
    "Response:" or "Answer:"), `list_residue` (an empty list item, or 2+ numbered lines),
    `repetition` (see `repetitive`), `truncated` (see `truncated`).
    """
    if not heuristics:
        return None
    if any(m in text for m in _INSTR_LEAKS):
        return "leakage"
    if list_residue(text):
        return "list_residue"
    if repetitive(text):
        return "repetition"
    if truncated(text):
        return "truncated"
    return None


def pair_reject_reason(response: str, heuristics: bool = True, instruction: str | None = None) -> str | None:
    """The cheap check a pair fails before the critic, or None.

    `empty_response` (always); with `heuristics` (CriticConfig.pair_heuristics): `leakage` (a block
    delimiter survived cleaning, qc.has_leakage), `list_residue` (an empty list item such as "2."
    alone on a line), `repetition` (see `repetitive`), `copies_instruction` (the response's words
    are all a run of the instruction's), `truncated` (see `truncated`).

    Args:
        response: the cleaned response.
        heuristics: apply the checks after the empty check.
        instruction: the pair's instruction (for `copies_instruction`; skipped when None).
    Returns:
        The reason string, or None when the pair goes on to the critic.
    """
    if not response.strip():
        return "empty_response"
    if not heuristics:
        return None
    if any(m in response for m in _PAIR_LEAKS):
        return "leakage"
    if list_residue(response, numbered_lines=1 << 30):
        return "list_residue"
    if repetitive(response):
        return "repetition"
    if instruction is not None:
        r, i = _norm(response), _norm(instruction)
        if r and f" {r} " in f" {i} ":
            return "copies_instruction"
    if truncated(response):
        return "truncated"
    return None


def rubric_variants(cfg: CriticConfig, kind: Kind) -> list[tuple[bool, bool]]:
    """(swap, reverse) of each prompt an item of `kind` is scored under: the rubric's label_swap /
    order_swap, else the critic's (order swap only with 2+ examples). Its length is the rubric prompts
    per item (the dry-run estimate and bench/pilot_cpu.py count with it).

    Args:
        cfg: the critic config.
        kind: "instruction" or "pair".
    Returns:
        One (label swapped, examples reversed) per prompt.
    """
    rub = cfg.instruction_rubric if kind == "instruction" else cfg.pair_rubric
    label_swap = cfg.label_swap if rub.label_swap is None else rub.label_swap
    order_swap = cfg.order_swap if rub.order_swap is None else rub.order_swap
    swaps = (False, True) if label_swap else (False,)
    orders = (False, True) if order_swap and len(rub.examples) > 1 else (False,)
    return [(s, r) for s in swaps for r in orders]


class ABCritic:
    """Scores instructions or (instruction, response) pairs.

    Args:
        backend: any Backend (real or fake).
        cfg: the critic config (rubrics, labels, thresholds, calibration, swaps, PMI).
    """

    def __init__(self, backend: Backend, cfg: CriticConfig) -> None:
        self.backend = backend
        self.cfg = cfg
        self._offsets: dict[str, float] = {}
        self._batched: bool | None = None  # whether backend.next_token_logprobs takes batch_size/progress

    def _rubric(self, kind: Kind) -> Rubric:
        return self.cfg.instruction_rubric if kind == "instruction" else self.cfg.pair_rubric

    def labels(self, kind: Kind) -> tuple[str, str]:
        """The kind's answer words: its rubric's `labels`, else `critic.labels`."""
        own = self._rubric(kind).labels
        return self.cfg.labels if own is None else own

    def variants(self, kind: Kind) -> list[tuple[bool, bool]]:
        """(swap, reverse) of each prompt an item is scored under (`rubric_variants`)."""
        return rubric_variants(self.cfg, kind)

    def prompts(self, kind: Kind, instruction: str, response: str | None) -> list[str]:
        """The rubric prompts of one item, in `variants(kind)` order."""
        return [prompts.build_critic_prompt(self._rubric(kind), swap=s, reverse=r, instruction=instruction,
                                            response=response if kind == "pair" else None, labels=self.labels(kind))
                for s, r in self.variants(kind)]

    def _raw(self, kind: Kind, items: list[tuple[str, str | None]], progress: ProgressFn | None) -> list[tuple[float, float, float]]:
        """(logp_good, logp_bad, label mass) per item, averaged over the prompt variants."""
        first, second = self.labels(kind)
        cands = [first, " " + first, second, " " + second]
        variants = self.variants(kind)
        per_item = len(variants)
        flat = [p for ins, resp in items for p in self.prompts(kind, ins, resp)]
        scores = self._next_token_logprobs(flat, cands, per_item, progress)
        out: list[tuple[float, float, float]] = []
        for i in range(len(items)):
            goods, bads, masses = [], [], []
            for j, (swapped, _) in enumerate(variants):
                s = scores[i * per_item + j]
                lp_first = max(s[first], s[" " + first])
                lp_second = max(s[second], s[" " + second])
                goods.append(lp_second if swapped else lp_first)
                bads.append(lp_first if swapped else lp_second)
                masses.append(min(1.0, sum(math.exp(v) for v in s.values())))
            out.append((sum(goods) / per_item, sum(bads) / per_item, sum(masses) / per_item))
        return out

    def _next_token_logprobs(self, flat: list[str], cands: list[str], per_item: int,
                             progress: ProgressFn | None) -> list[dict[str, float]]:
        """Score all prompts in one backend call, `critic.batch_size` prompts per forward pass ("auto":
        the backend's default, 256 on a GPU, 16 on the CPU), reporting progress in whole items.
        Backends whose next_token_logprobs takes no `batch_size` keyword (test fakes) get the prompts
        in chunks of that size instead."""
        size = self.cfg.batch_size
        done = [0, 0]  # prompts finished, items reported

        def advance(n_prompts: int) -> None:
            done[0] += n_prompts
            items = min(done[0] // per_item, len(flat) // per_item)
            if progress is not None and items > done[1]:
                progress(items - done[1])
            done[1] = max(done[1], items)

        if self._batched is None:
            try:
                params = inspect.signature(self.backend.next_token_logprobs).parameters
            except (TypeError, ValueError):
                params = {}  # type: ignore[assignment]
            self._batched = "batch_size" in params and "progress" in params
        if self._batched:
            scores = self.backend.next_token_logprobs(  # type: ignore[call-arg]
                flat, cands, batch_size=None if size == "auto" else size, progress=advance)
        else:
            step = 16 if size == "auto" else size
            scores = []
            for start in range(0, len(flat), step):
                scores.extend(self.backend.next_token_logprobs(flat[start:start + step], cands))
                advance(len(flat[start:start + step]))
        if progress is not None and done[1] < len(flat) // per_item:
            progress(len(flat) // per_item - done[1])
        return scores

    def calibration_offset(self, kind: Kind) -> float:
        """Rubric margin of the content-free input (0.0 when calibration is off or the kind uses PMI
        alone). Cached per kind."""
        if not self.cfg.calibrate or not self._uses_rubric(kind):
            return 0.0
        if kind not in self._offsets:
            cf = self.cfg.content_free_input
            good, bad, _ = self._raw(kind, [(cf, cf if kind == "pair" else None)], None)[0]
            self._offsets[kind] = good - bad
        return self._offsets[kind]

    def threshold(self, kind: Kind) -> float:
        """The margin an item needs to be kept: the kind's own threshold (is_good = margin >= it, so it
        may be negative), else `threshold` (is_good = label A and margin >= it)."""
        own = self.cfg.instruction_threshold if kind == "instruction" else self.cfg.pair_threshold
        return self.cfg.threshold if own is None else own

    def _uses_rubric(self, kind: Kind) -> bool:
        return kind == "instruction" or self.cfg.pair_scorer != "pmi"

    def pmi(self, items: list[tuple[str, str]]) -> list[tuple[float, float, float]]:
        """(pmi, log p(response | instruction), log p(response | content-free)) per pair.

        The continuation is " " + response + pmi.end; with pmi.per_token all three are divided by
        its token count.
        """
        pc = self.cfg.pmi
        null = prompts.build_pmi_prompt(pc.template, self.cfg.content_free_input)
        conts = [" " + resp + pc.end for _, resp in items]
        ctx = [prompts.build_pmi_prompt(pc.template, ins) for ins, _ in items]
        scored = self.backend.continuation_logprobs(ctx + [null] * len(items), conts + conts)
        out = []
        for k in range(len(items)):
            (cond, n), (uncond, _) = scored[k], scored[len(items) + k]
            div = n if pc.per_token and n else 1
            out.append(((cond - uncond) / div, cond / div, uncond / div))
        return out

    def score(self, kind: Kind, items: list[tuple[str, str | None]], progress: ProgressFn | None = None) -> list[Critique]:
        """Critique each (instruction, response) item; response is None for kind="instruction".

        Returns:
            One Critique per item, in order.
        """
        if not items:
            return []
        use_pmi = kind == "pair" and self.cfg.pair_scorer != "rubric"
        use_rubric = self._uses_rubric(kind)
        offset = self.calibration_offset(kind)
        n = len(items)
        raw = self._raw(kind, items, progress) if use_rubric else [(0.0, 0.0, 0.0)] * n
        pmis = self.pmi([(i, r or "") for i, r in items]) if use_pmi else [None] * n
        if not use_rubric and progress is not None:
            progress(n)
        result = []
        threshold = self.threshold(kind)
        own_threshold = (self.cfg.instruction_threshold if kind == "instruction" else self.cfg.pair_threshold) is not None
        for (good, bad, mass), pm in zip(raw, pmis):
            if use_rubric:
                margin = good - bad - offset + (self.cfg.pmi.weight * pm[0] if pm is not None else 0.0)
            else:
                assert pm is not None
                margin, good, bad = pm
            label: Literal["A", "B"] = "A" if margin >= 0 else "B"
            result.append(Critique(
                predicted_label=label, logp_a=round(good, 6), logp_b=round(bad, 6), margin=round(margin, 6),
                is_good=margin >= threshold if own_threshold else (label == "A" and margin >= threshold),
                confident=abs(margin) >= self.cfg.confidence_threshold,
                ab_mass=round(mass, 6), calibration_offset=round(offset, 6),
                pmi=round(pm[0], 6) if pm is not None else None,
            ))
        return result


def pipeline_score(crit: Critique | None) -> float:
    """The score the pipeline filters on: the critic's margin, or -inf for a heuristic reject (None)."""
    return -math.inf if crit is None else crit.margin
