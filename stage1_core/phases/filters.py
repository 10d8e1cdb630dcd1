"""Instruction filtering, phase 2 before the critic: cheap heuristics, then ROUGE-L near-duplicates.

Heuristics follow Self-Instruct's post-processing (length bounds, non-text, blacklisted words,
leading punctuation, non-ASCII first character) plus a copy-of-a-seed check; every rejection
carries a stable, machine-readable reason. Near-duplicate removal keeps an instruction only when its
ROUGE-L F-measure against every item already in the pool (the seed instructions, then each kept
instruction in input order) is below the threshold; `>= threshold` is a duplicate.

Usage:
    kept, rejected = filter_instructions(candidates, cfg.instruction_filter, seed_texts)
    # rejected rows: {"text", "reason", "rouge_l", "most_similar"}

    dedup = RougeDeduper(seed_texts, threshold=0.7)
    kept_it, score, most_similar = dedup.offer("Name three rivers in Europe.")

ROUGE-L is computed on `rouge_score`'s own tokenizer (`DefaultTokenizer(use_stemmer=False)`, the
one `RougeScorer(["rougeL"], use_stemmer=False)` uses), tokenizing each text once; the LCS runs
bit-parallel on Python integers, so a few hundred candidates against a few hundred pool items take
a fraction of a second. Scores equal `RougeScorer.score(...)["rougeL"].fmeasure` exactly; the
keep/drop decision compares the exact rational F = 2*LCS / (len_a + len_b) with the decimal
threshold, so 7 of 10 shared tokens is exactly 0.7 (a duplicate at threshold 0.7).
"""

from __future__ import annotations

import re
import string
from fractions import Fraction
from functools import lru_cache
from typing import Any, Iterable

from stage1_core.infra.config import InstructionFilterConfig

# Reason strings (stable; written to rejected.jsonl and counted in QC).
EMPTY = "empty"
TOO_SHORT = "too_short"
TOO_LONG = "too_long"
NON_TEXT = "non_text"
BLACKLISTED = "blacklisted"  # rendered as "blacklisted:<word>"
STARTS_WITH_PUNCTUATION = "starts_with_punctuation"
STARTS_WITH_NON_ENGLISH = "starts_with_non_english"
COPIES_SEED = "copies_seed"
NEAR_DUPLICATE = "near_duplicate"

# ASCII punctuation a task may not start with. Quotes are allowed: '"Carpe diem" means what?' is a
# fine task. Non-ASCII punctuation (e.g. a typographic quote) is caught by starts_with_non_english.
LEADING_PUNCTUATION = frozenset(string.punctuation) - {'"', "'"}
URL_RE = re.compile(r"(?:\b(?:https?|ftp)://|\bwww\.[a-z0-9-]+\.[a-z])", re.IGNORECASE)
CODE_MARKERS: tuple[str, ...] = ("```", "<html", "<body", "<script", "<?php", "<div")
_WS_RE = re.compile(r"\s+")
_TRAILING = string.punctuation + string.whitespace


def normalize(text: str) -> str:
    """Canonical form for exact-copy checks: lowercase, whitespace collapsed, trailing punctuation off.

    Idempotent, so already-normalized texts may be passed wherever raw ones are accepted.

    Args:
        text: any text.
    Returns:
        The normalized text ("" for blank or punctuation-only input).
    """
    return _WS_RE.sub(" ", text.lower()).strip().rstrip(_TRAILING)


@lru_cache(maxsize=32)
def _blacklist_patterns(blacklist: tuple[str, ...]) -> tuple[tuple[str, re.Pattern[str]], ...]:
    """One case-insensitive whole-word pattern per entry; a phrase matches across any whitespace."""
    out = []
    for word in blacklist:
        parts = word.split()
        if parts:
            body = r"\s+".join(re.escape(p) for p in parts)
            out.append((word, re.compile(rf"\b{body}\b", re.IGNORECASE)))
    return tuple(out)


def _reject_reason(text: str, cfg: InstructionFilterConfig, normalized_seeds: set[str] | frozenset[str]) -> str | None:
    """`heuristic_reject_reason` with the seed set already normalized."""
    t = text.strip()
    if not t:
        return EMPTY
    n_words = len(t.split())
    if n_words < cfg.min_words:
        return TOO_SHORT
    if n_words > cfg.max_words or len(t) > cfg.max_chars:
        return TOO_LONG
    non_space = [c for c in t if not c.isspace()]
    letters = sum(1 for c in non_space if c.isalpha())
    lowered = t.lower()
    if 2 * letters < len(non_space) or URL_RE.search(t) or any(m in lowered for m in CODE_MARKERS):
        return NON_TEXT
    for word, pattern in _blacklist_patterns(tuple(cfg.blacklist)):
        if pattern.search(t):
            return f"{BLACKLISTED}:{word}"
    if t[0] in LEADING_PUNCTUATION:
        return STARTS_WITH_PUNCTUATION
    if not t[0].isascii():
        return STARTS_WITH_NON_ENGLISH
    if normalize(t) in normalized_seeds:
        return COPIES_SEED
    return None


def heuristic_reject_reason(text: str, cfg: InstructionFilterConfig, seed_texts: set[str]) -> str | None:
    """The first heuristic an instruction fails, or None when it passes them all.

    Checks run on the stripped text, in this order:
    `empty`; `too_short` (< cfg.min_words whitespace-separated words); `too_long` (> cfg.max_words
    words or > cfg.max_chars characters); `non_text` (fewer than half of the non-space characters
    are letters, or a URL, or a code marker from CODE_MARKERS); `blacklisted:<word>` (the first
    cfg.blacklist entry found as a whole word/phrase, case-insensitive, as Self-Instruct does);
    `starts_with_punctuation` (first character in ASCII punctuation other than a quote);
    `starts_with_non_english` (first character not ASCII, as Self-Instruct); `copies_seed`
    (`normalize(text)` equals a normalized seed).

    Args:
        text: one candidate instruction.
        cfg: the instruction filter config (bounds, blacklist).
        seed_texts: seed instructions, raw or already normalized.
    Returns:
        A reason string from the list above, or None.
    """
    return _reject_reason(text, cfg, {normalize(s) for s in seed_texts})


class RougeDeduper:
    """ROUGE-L near-duplicate filter against a growing pool (Self-Instruct's rule).

    A text is a duplicate when its ROUGE-L F-measure against any pool item is >= threshold
    (inclusive). Each text is tokenized once; token lists of pool items are cached.

    Args:
        pool: initial pool, usually the seed instructions (kept in order; ties go to the earliest).
        threshold: duplicate threshold in (0, 1].
    Raises:
        ValueError: threshold outside (0, 1].
    """

    def __init__(self, pool: Iterable[str] = (), threshold: float = 0.7) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"rouge threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self._threshold_exact = Fraction(repr(float(threshold)))  # the decimal the user wrote
        from rouge_score.tokenizers import DefaultTokenizer  # imports nltk and scipy (0.7 s): only when deduping

        self._tokenizer = DefaultTokenizer(use_stemmer=False)
        self._pool: list[tuple[str, list[str]]] = []
        for text in pool:
            self.add(text)

    def __len__(self) -> int:
        return len(self._pool)

    def tokens(self, text: str) -> list[str]:
        """rouge_score's tokens of `text` (lowercased alphanumeric runs)."""
        return self._tokenizer.tokenize(text)

    def add(self, text: str, tokens: list[str] | None = None) -> None:
        """Add `text` to the pool unconditionally (`tokens`: its `tokens(text)`, if already known)."""
        self._pool.append((text, self.tokens(text) if tokens is None else tokens))

    def _best(self, cand: list[str]) -> tuple[Fraction, float, str | None]:
        """Exact best F, its float as rouge_score computes it, and the most similar pool text."""
        m = len(cand)
        if m == 0:
            return Fraction(0), 0.0, None
        masks: dict[str, int] = {}
        for i, tok in enumerate(cand):
            masks[tok] = masks.get(tok, 0) | (1 << i)
        full = (1 << m) - 1
        best_num, best_den, best_lcs, best_len, best_text = 0, 1, 0, 0, None
        for text, toks in self._pool:
            n = len(toks)
            den = m + n
            # F = 2*LCS/(m+n) <= 2*min(m,n)/(m+n); skip items that cannot beat the best strictly.
            if n == 0 or 2 * min(m, n) * best_den <= best_num * den:
                continue
            v = full  # Hyyro's bit-parallel LCS: zero bits of v count the LCS length
            for tok in toks:
                mask = masks.get(tok)
                if mask is not None:
                    u = v & mask
                    v = ((v + u) | (v - u)) & full
            lcs = m - v.bit_count()
            if 2 * lcs * best_den > best_num * den:
                best_num, best_den, best_lcs, best_len, best_text = 2 * lcs, den, lcs, n, text
        if best_text is None:
            return Fraction(0), 0.0, None
        # The same float expression as rouge_score.scoring.fmeasure (target = pool item).
        precision, recall = best_lcs / m, best_lcs / best_len
        score = 2 * precision * recall / (precision + recall)
        return Fraction(best_num, best_den), score, best_text

    def check(self, text: str) -> tuple[float, str | None]:
        """Max ROUGE-L F of `text` against the pool, without adding it.

        Returns:
            (score, most similar pool text); (0.0, None) when the pool is empty or nothing overlaps.
        """
        _, score, similar = self._best(self.tokens(text))
        return score, similar

    def offer(self, text: str) -> tuple[bool, float, str | None]:
        """Check `text` and add it to the pool when it is not a duplicate.

        Returns:
            (kept, max ROUGE-L F against the pool before adding, most similar pool text).
        """
        toks = self.tokens(text)
        exact, score, similar = self._best(toks)
        if exact >= self._threshold_exact:
            return False, score, similar
        self._pool.append((text, toks))
        return True, score, similar


def _row(text: str, reason: str, rouge_l: float | None = None, most_similar: str | None = None) -> dict[str, Any]:
    return {"text": text, "reason": reason, "rouge_l": rouge_l, "most_similar": most_similar}


def filter_instructions(candidates: list[str], cfg: InstructionFilterConfig, seed_texts: list[str],
                        previous: list[str] | None = None) -> tuple[list[str], list[dict[str, Any]]]:
    """Heuristics, then ROUGE-L dedup against the seeds and the instructions kept so far.

    Candidates are processed in input order, so the first of two near-copies is the one kept. An
    exact repeat (same `normalize` form) of an earlier kept candidate, or of an instruction kept in
    an earlier round (`previous`), is dropped as `near_duplicate` with rouge_l 1.0 even when it has
    no ROUGE tokens; only copies of a seed are `copies_seed`.

    Args:
        candidates: parsed instructions, in generation order.
        cfg: the instruction filter config.
        seed_texts: the seed instructions (copy check and initial dedup pool).
        previous: instructions kept in earlier rounds (dedup pool, after the seeds).
    Returns:
        (kept texts, unchanged and in input order; rejected rows
        {"index", "text", "reason", "rouge_l", "most_similar"}, in input order, where index is the
        candidate's position). Heuristic rows carry rouge_l/most_similar None; `near_duplicate`
        rows carry the max score and the pool text.
    """
    normalized_seeds = {normalize(s) for s in seed_texts}
    previous = list(previous or [])
    dedup = RougeDeduper([*seed_texts, *previous], cfg.rouge_threshold)
    kept: list[str] = []
    kept_keys: dict[str, str] = {normalize(p): p for p in previous}
    rejected: list[dict[str, Any]] = []
    for i, text in enumerate(candidates):
        reason = _reject_reason(text, cfg, normalized_seeds)
        if reason is not None:
            rejected.append({"index": i, **_row(text, reason)})
            continue
        key = normalize(text)
        if key in kept_keys:
            rejected.append({"index": i, **_row(text, NEAR_DUPLICATE, 1.0, kept_keys[key])})
            continue
        ok, score, similar = dedup.offer(text)
        if not ok:
            rejected.append({"index": i, **_row(text, NEAR_DUPLICATE, score, similar)})
            continue
        kept.append(text)
        kept_keys[key] = text
    return kept, rejected
