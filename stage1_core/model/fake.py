"""A deterministic, fast fake model backend for orchestration tests: `--model fake:<seed>`.

Options follow the seed, comma-separated: `fake:7,runaway=0.2,limit=0.1,bad=0.2`; `guard=1` makes
loading fail its sentinels (ModelGuardError), as a model read wrongly would.
- List prompts (ending in "N.") continue the numbered list with made-up instructions ("Explain
  frozen harbors."; with `varied=0` the older, repetitive "Explain volcanoes step by step."): a few
  near-duplicates, some too short, some blacklisted, then a blank line. With `repeat=R`, each item is
  one fixed task with probability R at temperature <= 0.7, falling linearly to 0 at 0.9 (a small
  model repeating itself until the temperature rises).
- Response prompts (ending in "Response:") answer in a few words, then a blank line; with
  probability `runaway` (scaled by temperature: full at T >= 0.7, zero at T <= 0.4) they start a
  new "\\nInstruction:" block instead, and with probability `limit` they ramble to the token limit.
  Response length shrinks with max_new_tokens, so changing it changes the output.
- Critic prompts: "A" is preferred unless the judged text contains a marker of badness
  ("lorem", "???", or fewer than 3 words), or, with `critic_bad=P`, falls in the share P of texts
  a hash of the text marks bad (a critic that rejects most items); plus a constant letter bias toward A. Which label means
  good: the one listed as "X) Yes"; in a question rubric without listed options, the first label,
  unless the prompt's first line asks whether the item is wrong, broken or bad.
- Continuation scores (`continuation_logprobs`, the PMI scorer): each continuation word costs 3 nats,
  2 if it also appears in the prompt, 6 if it holds a marker of badness.
Tokens are whitespace-separated words. Same inputs, same outputs, always: a prompt's randomness
comes from (fake seed, run seed, item id, prompt, sampling params), never from its batch position,
as the Backend contract asks (`stage1_core.model.backend`).
`STAGE1_FAKE_DELAY=<seconds>` sleeps per generated prompt (interrupt tests).
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import time
from collections.abc import Sequence
from typing import Any

from stage1_core.infra import faults
from stage1_core.model.backend import ProgressFn, item_ids
from stage1_core.infra.errors import ModelGuardError
from stage1_core.model.generation import classify_stop, find_stop
from stage1_core.infra.schemas import Completion, GenerationParams

VERBS = ["Explain", "Describe", "Summarize", "List", "Compare", "Write", "Suggest", "Classify", "Translate", "Outline"]
TOPICS = ["photosynthesis", "the water cycle", "a healthy breakfast", "compound interest", "the French Revolution",
          "machine learning", "a job interview", "volcanoes", "recycling plastic", "time management",
          "the rules of chess", "a rainy day", "solar panels", "the immune system", "public speaking"]
QUALIFIERS = ["in two sentences.", "for a ten-year-old.", "with three examples.", "in simple words.",
              "as a short poem.", "using a table of pros and cons.", "step by step."]
BAD_MARKERS = ("lorem", "???")
REPEATED_TASK = "Explain why the sky is blue to a curious child."
# varied tasks ("Explain frozen harbors."): 20 x 30 topics x 10 verbs, few near-duplicates (ROUGE-L >= 0.7 needs all three)
ADJECTIVES = ["ancient", "modern", "tiny", "giant", "rural", "urban", "frozen", "tropical", "noisy", "quiet", "digital",
              "wooden", "floating", "hidden", "seasonal", "coastal", "medieval", "electric", "solar", "local"]
NOUNS = ["bridges", "gardens", "markets", "rivers", "trains", "libraries", "forests", "bakeries", "robots", "islands",
         "castles", "deserts", "harbors", "festivals", "museums", "volcanoes", "orchards", "glaciers", "factories", "theaters",
         "canals", "caves", "bicycles", "satellites", "vineyards", "lighthouses", "beehives", "mines", "reefs", "windmills"]
FILLER = ["because", "often", "people", "usually", "about", "many", "simple", "ideas", "daily", "work", "small", "clear"]


def _pick(words: Sequence[Any], *parts: Any) -> Any:
    """An element chosen by a hash of `parts` (draws nothing from the item's random stream)."""
    return words[int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:4], "big") % len(words)]


def parse_fake_id(model_id: str) -> tuple[int, dict[str, float]]:
    """`fake:7,runaway=0.2` -> (7, {"runaway": 0.2}). Raises ValueError on a malformed id."""
    if not model_id.startswith("fake:"):
        raise ValueError(f"not a fake model id: {model_id!r}")
    head, *opts = model_id[len("fake:"):].split(",")
    seed = int(head)
    options: dict[str, float] = {"runaway": 0.0, "limit": 0.0, "bad": 0.1, "guard": 0.0, "repeat": 0.0, "varied": 1.0,
                                 "critic_bad": 0.0}
    for opt in opts:
        k, _, v = opt.partition("=")
        if k not in options:
            raise ValueError(f"unknown fake option {k!r}; known: {', '.join(options)}")
        options[k] = float(v)
    return seed, options


def _rng(*parts: Any) -> random.Random:
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


class FakeBackend:
    """Implements stage1_core.model.backend.Backend without a model."""

    def __init__(self, model_id: str | int) -> None:
        """Raises:
            ModelGuardError: the `guard` option is set (its sentinels "fail").
        """
        model_id = f"fake:{model_id}" if isinstance(model_id, int) else model_id
        self.seed, self.options = parse_fake_id(model_id)
        if self.options["guard"]:
            raise ModelGuardError(f"sentinel(s) failed for {model_id} (bos_policy=never): the fake model was asked "
                                  "to fail its guards (option guard=1)")
        self.model_id = model_id
        self.fingerprint: dict[str, Any] = {
            "id": model_id, "kind": "fake", "family": "fake", "bos_policy": "never", "dtype": "none",
            "device": "cpu", "revision": None, "load_seconds": 0.0,
            "weights_sha256": hashlib.sha256(f"{model_id}:v1".encode()).hexdigest(),
        }

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    # -- generation -------------------------------------------------------------------------
    def _continue_list(self, prompt: str, start: int, params: GenerationParams, rng: random.Random) -> str:
        out = ""
        n_items = rng.randint(3, 7)
        repeat = self.options["repeat"] * min(1.0, max(0.0, (0.9 - params.temperature) / 0.2))
        for i in range(n_items):
            roll = rng.random()
            if repeat and rng.random() < repeat:  # a small model at a low temperature: the same task again and again
                item = REPEATED_TASK
            elif roll < self.options["bad"] / 2:
                item = "Hi."
            elif roll < self.options["bad"]:
                item = f"Draw a map of {rng.choice(TOPICS)}."
            else:
                verb, topic, qualifier = rng.choice(VERBS), rng.choice(TOPICS), rng.choice(QUALIFIERS)
                item = f"{verb} {_pick(ADJECTIVES, prompt, start, i, 'a')} {_pick(NOUNS, prompt, start, i, 'n')}." \
                    if self.options["varied"] else f"{verb} {topic} {qualifier}"
            out += (" " if i == 0 else f"\n{start + i}. ") + item
        return out + "\n\nThese tasks cover many topics."

    def _respond(self, prompt: str, params: GenerationParams, rng: random.Random) -> str:
        instruction = prompt.rsplit("Instruction:", 1)[-1].split("\n", 1)[0].strip()
        n_words = max(3, min(12, params.max_new_tokens // 8))
        words = [w.strip(".,") for w in instruction.split()[1:]] or ["something"]
        if self.options["varied"]:
            words += FILLER
        body = " ".join(rng.choice(words) for _ in range(n_words)).capitalize() + "."
        scale = min(1.0, max(0.0, (params.temperature - 0.4) / 0.3))
        roll = rng.random()
        if roll < self.options["runaway"] * scale:
            return f" {body}\nInstruction: Write another task.\nResponse: Sure."
        if roll < self.options["runaway"] * scale + self.options["limit"]:
            return " " + " ".join(f"word{j}" for j in range(params.max_new_tokens + 5))
        return f" {body}\n\nInstruction: Name a colour.\nResponse: Blue."

    def generate(self, prompts: list[str], params: GenerationParams, seed: int, progress: ProgressFn | None = None,
                 ids: Sequence[str] | None = None) -> list[Completion]:
        keys = item_ids(prompts, ids)
        out: list[Completion] = []
        delay = float(os.environ.get("STAGE1_FAKE_DELAY", "0"))  # seconds per prompt, for interrupt tests
        for idx, (prompt, item) in enumerate(zip(prompts, keys)):
            if delay:
                time.sleep(delay)
            rng = _rng(self.seed, seed, item, prompt, params.temperature, params.top_p)
            m = re.search(r"\n(\d+)\.$", prompt)
            if m:
                text = self._continue_list(prompt, int(m.group(1)), params, rng)
            elif prompt.endswith("Response:"):
                text = self._respond(prompt, params, rng)
            else:
                text = " " + " ".join(f"w{rng.randint(0, 99)}" for _ in range(params.max_new_tokens))
            found = find_stop(text, params.stop_sequences)
            if found is not None:
                end = found[0] + len(found[1])
                text = text[:end]
            words = text.split(" ")
            if len(text.split()) > params.max_new_tokens:
                text = " ".join(words[: params.max_new_tokens + 1])
            reason = classify_stop(text, params.stop_sequences, hit_eos=False)
            out.append(Completion(text=text, stop_reason=reason, n_tokens=min(params.max_new_tokens, len(text.split()))))
            if (idx + 1) % 8 == 0 or idx + 1 == len(prompts):
                if progress is not None:
                    progress(8 if (idx + 1) % 8 == 0 else (idx + 1) % 8)
                faults.maybe_fault("generate")
        return out

    # -- critic -----------------------------------------------------------------------------
    def next_token_logprobs(self, prompts: list[str], candidates: list[str]) -> list[dict[str, float]]:
        out = []
        for prompt in prompts:
            judged = prompt.rsplit("Answer:", 1)[0]
            # the judged text follows the last "Response:" (pairs) or "Text:" (instructions), whichever
            # comes last (few-shot examples before it may hold either)
            cut = max(judged.rfind("Response:") + len("Response:") if "Response:" in judged else -1,
                      judged.rfind("Text:") + len("Text:") if "Text:" in judged else -1)
            judged = judged[cut:] if cut >= 0 else judged
            bad = any(m in judged.lower() for m in BAD_MARKERS) or len(judged.split()) < 3 \
                or (self.options["critic_bad"] > 0 and _pick(range(1000), judged.strip()) < 1000 * self.options["critic_bad"])
            # Which letter means "good" in this prompt: the option listed first mentions "Yes".
            first = candidates[0].strip()
            if re.search(rf"(^|\n){re.escape(first)}\) ", prompt):  # options listed as "A) Yes, ..."
                first_is_good = bool(re.search(rf"\n{re.escape(first)}\) Yes", prompt))
            else:  # a question rubric ("Is it good? Answer Yes or No."): the first line asks good or bad
                first_is_good = not re.search(r"\b(wrong|broken|bad)\b", prompt.split("\n", 1)[0])
            good_first = first_is_good != bad
            lp_first, lp_second = (-0.4, -2.4) if good_first else (-2.4, -0.4)
            if judged.strip() == "N/A":  # the content-free calibration input is neutral
                lp_first = lp_second = -1.4
            lp_first += 0.3  # letter bias toward the first label, as small base models show
            scores = {}
            for c in candidates:
                base = lp_first if c.strip() == candidates[0].strip() else lp_second
                scores[c] = base - (1.5 if c.startswith(" ") else 0.0) - 0.5
            out.append(scores)
            faults.maybe_fault("critic")
        return out

    def continuation_logprobs(self, prompts: list[str], continuations: list[str]) -> list[tuple[float, int]]:
        if len(prompts) != len(continuations):
            raise ValueError(f"continuation_logprobs: {len(prompts)} prompts but {len(continuations)} continuations")
        out = []
        for prompt, cont in zip(prompts, continuations):
            seen = {w.strip(".,!?:;'\"").lower() for w in prompt.split()}
            words = cont.split()
            if not words:
                raise ValueError("continuation encodes to no tokens")
            total = 0.0
            for w in words:
                if any(m in w.lower() for m in BAD_MARKERS):
                    total -= 6.0
                else:
                    total -= 2.0 if w.strip(".,!?:;'\"").lower() in seen else 3.0
            out.append((total, len(words)))
            faults.maybe_fault("critic")
        return out
