"""The single-token A/B critic: one forward pass, compare log p(next token = A) vs B.

Each label's log-probability is the best of its variants ("A" and " A"). With `label_swap`, every
item is also scored with the options' order swapped (so the letter that means "good" changes) and
the two good-minus-bad margins are averaged: a pure preference for one letter cancels. With
`calibrate`, the margin the same rubric gives a content-free input (`content_free_input`, "N/A")
is subtracted (contextual calibration). No sampling anywhere.

Reported fields use the canonical meaning A = good: `logp_a` is the (averaged) log-probability of
the good answer, `logp_b` of the bad one, `margin = logp_a - logp_b - calibration_offset`.
"""

from __future__ import annotations

import math
from typing import Literal

from stage1_core import prompts
from stage1_core.backend import Backend, ProgressFn
from stage1_core.config import CriticConfig, Rubric
from stage1_core.schemas import Critique

Kind = Literal["instruction", "pair"]


class ABCritic:
    """Scores instructions or (instruction, response) pairs with a rubric.

    Args:
        backend: any Backend (real or fake).
        cfg: the critic config (rubrics, labels, thresholds, calibration, label swap).
    """

    def __init__(self, backend: Backend, cfg: CriticConfig) -> None:
        self.backend = backend
        self.cfg = cfg
        self._offsets: dict[str, float] = {}

    def _rubric(self, kind: Kind) -> Rubric:
        return self.cfg.instruction_rubric if kind == "instruction" else self.cfg.pair_rubric

    def _prompts(self, kind: Kind, instruction: str, response: str | None) -> list[str]:
        swaps = (False, True) if self.cfg.label_swap else (False,)
        return [
            prompts.build_critic_prompt(self._rubric(kind), swap=s, instruction=instruction,
                                        response=response if kind == "pair" else None, labels=self.cfg.labels)
            for s in swaps
        ]

    def _raw(self, kind: Kind, items: list[tuple[str, str | None]], progress: ProgressFn | None) -> list[tuple[float, float, float]]:
        """(logp_good, logp_bad, ab_mass) per item, averaged over the swap variants."""
        first, second = self.cfg.labels
        variants = [first, " " + first, second, " " + second]
        per_item = len(self._prompts(kind, "x", "x"))
        flat = [p for ins, resp in items for p in self._prompts(kind, ins, resp)]
        out: list[tuple[float, float, float]] = []
        bs = self.cfg.batch_size * per_item
        scores: list[dict[str, float]] = []
        for start in range(0, len(flat), bs):
            scores.extend(self.backend.next_token_logprobs(flat[start:start + bs], variants))
            if progress is not None:
                progress(len(flat[start:start + bs]) // per_item)
        for i in range(len(items)):
            goods, bads, masses = [], [], []
            for j in range(per_item):
                s = scores[i * per_item + j]
                lp_first = max(s[first], s[" " + first])
                lp_second = max(s[second], s[" " + second])
                swapped = j == 1
                goods.append(lp_second if swapped else lp_first)
                bads.append(lp_first if swapped else lp_second)
                masses.append(min(1.0, sum(math.exp(v) for v in s.values())))
            out.append((sum(goods) / per_item, sum(bads) / per_item, sum(masses) / per_item))
        return out

    def calibration_offset(self, kind: Kind) -> float:
        """Margin of the content-free input (0.0 when calibration is off). Cached per kind."""
        if not self.cfg.calibrate:
            return 0.0
        if kind not in self._offsets:
            cf = self.cfg.content_free_input
            good, bad, _ = self._raw(kind, [(cf, cf if kind == "pair" else None)], None)[0]
            self._offsets[kind] = good - bad
        return self._offsets[kind]

    def score(self, kind: Kind, items: list[tuple[str, str | None]], progress: ProgressFn | None = None) -> list[Critique]:
        """Critique each (instruction, response) item; response is None for kind="instruction".

        Returns:
            One Critique per item, in order.
        """
        if not items:
            return []
        offset = self.calibration_offset(kind)
        result = []
        for good, bad, mass in self._raw(kind, items, progress):
            margin = good - bad - offset
            label: Literal["A", "B"] = "A" if margin >= 0 else "B"
            result.append(Critique(
                predicted_label=label, logp_a=round(good, 6), logp_b=round(bad, 6), margin=round(margin, 6),
                is_good=label == "A" and margin >= self.cfg.threshold,
                confident=abs(margin) >= self.cfg.confidence_threshold,
                ab_mass=round(mass, 6), calibration_offset=round(offset, 6),
            ))
        return result
