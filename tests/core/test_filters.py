"""Golden tests of stage1_core.phases.filters: each heuristic reason, ROUGE-L dedup (inclusive threshold,
agreement with rouge_score), and filter_instructions' order and reasons."""

from __future__ import annotations

import random
import time

import pytest
from rouge_score import rouge_scorer

from stage1_core.infra.config import InstructionFilterConfig, load_pilot_config
from stage1_core.phases.filters import (
    RougeDeduper,
    filter_instructions,
    heuristic_reject_reason,
    normalize,
)

SEEDS = ["Give three tips for staying healthy.", "What is the capital of Japan?"]


@pytest.fixture(scope="module")
def cfg() -> InstructionFilterConfig:
    return load_pilot_config().instruction_filter


def words(prefix: str, n: int) -> str:
    return " ".join(f"{prefix}{i}" for i in range(n))


# --- normalize and heuristics ------------------------------------------------------------------

def test_normalize() -> None:
    assert normalize("  What IS the\tcapital   of Japan?!  ") == "what is the capital of japan"
    assert normalize("abc . .") == "abc"
    assert normalize(normalize("Hello,  World ...")) == normalize("Hello,  World ...") == "hello, world"
    assert normalize("?!") == ""


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("   \n\t ", "empty"),
        ("Summarize this", "too_short"),
        ("1234 5678 9012 3456", "non_text"),
        ("Open https://example.com and summarize it.", "non_text"),
        ("Visit www.example.org to find the answer.", "non_text"),
        ("Fix this code: ```print(1)```", "non_text"),
        ("Explain what <html> tags are for.", "non_text"),
        ("Describe the IMAGE shown below in detail.", "blacklisted:image"),
        ("Tell me how to go   to the station.", "blacklisted:go to"),
        ("Draw a cat using only ASCII characters.", "blacklisted:draw"),
        ("- Write a poem about the sea.", "starts_with_punctuation"),
        ("(Write a poem about the sea.)", "starts_with_punctuation"),
        ("¿Cómo estás hoy, amigo mío?", "starts_with_non_english"),
        ("Écris un poème sur la mer.", "starts_with_non_english"),
        ("what is the   capital of JAPAN", "copies_seed"),
        ("Give three tips for staying healthy!!", "copies_seed"),
    ],
)
def test_heuristic_reasons(cfg: InstructionFilterConfig, text: str, reason: str) -> None:
    assert heuristic_reject_reason(text, cfg, set(SEEDS)) == reason


def test_heuristics_pass_and_edges(cfg: InstructionFilterConfig) -> None:
    seeds = set(SEEDS)
    assert heuristic_reject_reason("Name three rivers in Europe.", cfg, seeds) is None
    assert heuristic_reject_reason('"Carpe diem" means what in English?', cfg, seeds) is None  # quotes allowed
    assert heuristic_reject_reason("3 ways to save money on groceries.", cfg, seeds) is None  # digits allowed
    # whole words only: "mapping" and "profile" do not match "map" / "file"
    assert heuristic_reject_reason("Explain the mapping between keys and a profile.", cfg, seeds) is None
    # exactly min_words / max_words pass; one beyond fails
    c = InstructionFilterConfig(min_words=3, max_words=5, max_chars=40)
    assert heuristic_reject_reason("Name three rivers", c, seeds) is None
    assert heuristic_reject_reason("Name three big rivers please", c, seeds) is None
    assert heuristic_reject_reason("Name three big long rivers please", c, seeds) == "too_long"
    assert heuristic_reject_reason("Name " + "x" * 40, InstructionFilterConfig(min_words=1, max_chars=40), seeds) == "too_long"
    # exactly half letters passes, fewer fails
    assert heuristic_reject_reason("ab12 cd34 ef56", cfg, seeds) is None
    assert heuristic_reject_reason("ab123 cd34 ef56", cfg, seeds) == "non_text"
    # order: too_short wins over blacklisted; blacklisted wins over starts_with_punctuation
    assert heuristic_reject_reason("draw it", cfg, seeds) == "too_short"
    assert heuristic_reject_reason("- draw a small house", cfg, seeds) == "blacklisted:draw"


# --- ROUGE-L dedup ------------------------------------------------------------------------------

def test_scores_agree_with_rouge_scorer() -> None:
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(12)] + ["the", "a", "of", "Japan", "capital"]
    pairs = [
        ("What is the capital of Japan?", "What's the capital city of Japan, again?"),
        ("Give three tips for staying healthy.", "Give me 3 tips to stay healthy!"),
        ("a b a b a b", "b a b a"),
        ("Hello", "!!!"),
    ]
    pairs += [(" ".join(rng.choices(vocab, k=rng.randint(1, 25))), " ".join(rng.choices(vocab, k=rng.randint(1, 25))))
              for _ in range(200)]
    for a, b in pairs:
        score, similar = RougeDeduper([a]).check(b)
        expected = scorer.score(a, b)["rougeL"].fmeasure
        assert score == expected, (a, b)
        assert similar == (a if expected > 0 else None)


def test_dedup_keeps_first_rejects_near_copy() -> None:
    dedup = RougeDeduper([], threshold=0.7)
    assert dedup.offer("Write a short story about a brave knight.") == (True, 0.0, None)
    kept, score, similar = dedup.offer("Write a short story about a brave young knight.")
    assert not kept and score >= 0.7 and similar == "Write a short story about a brave knight."
    assert dedup.offer("List five fruits that are rich in vitamin C.")[0]
    assert len(dedup) == 2


def test_threshold_inclusive_exactly_07() -> None:
    base = words("t", 10)
    copy7 = words("t", 7) + " x1 x2 x3"  # 10 tokens, LCS 7 -> F = 0.7 exactly
    assert RougeDeduper([base]).check(copy7) == (0.7, base)
    assert RougeDeduper([base], threshold=0.7).offer(copy7)[0] is False
    assert RougeDeduper([base], threshold=0.71).offer(copy7)[0] is True
    copy6 = words("t", 6) + " x1 x2 x3 x4"  # 0.6 < 0.7 -> kept
    assert RougeDeduper([base], threshold=0.7).offer(copy6)[0] is True


def test_threshold_inclusive_when_float_rounds_below() -> None:
    # 23 and 37 tokens with LCS 21: exact F = 42/60 = 0.7, but the float is 0.6999999999999998.
    a = words("t", 21) + " a1 a2"
    b = words("t", 21) + " " + words("b", 16)
    score, _ = RougeDeduper([a]).check(b)
    assert score == rouge_scorer.RougeScorer(["rougeL"]).score(a, b)["rougeL"].fmeasure < 0.7
    assert RougeDeduper([a], threshold=0.7).offer(b)[0] is False


def test_deduper_reports_max_and_validates() -> None:
    pool = ["alpha beta gamma delta", "alpha beta gamma delta epsilon zeta", "one two three"]
    score, similar = RougeDeduper(pool).check("alpha beta gamma delta epsilon")
    assert similar == pool[1] and score == pytest.approx(10 / 11)
    assert RougeDeduper([]).check("anything at all") == (0.0, None)
    with pytest.raises(ValueError):
        RougeDeduper([], threshold=0.0)


def test_dedup_speed() -> None:
    rng = random.Random(1)
    vocab = [f"v{i}" for i in range(400)]
    pool = [" ".join(rng.choices(vocab, k=rng.randint(6, 30))) for _ in range(500)]
    cands = [" ".join(rng.choices(vocab, k=rng.randint(6, 30))) for _ in range(300)]
    dedup = RougeDeduper(pool)
    start = time.perf_counter()
    for c in cands:
        dedup.offer(c)
    assert time.perf_counter() - start < 3.0


# --- filter_instructions ------------------------------------------------------------------------

def test_filter_instructions_order_and_reasons(cfg: InstructionFilterConfig) -> None:
    candidates = [
        "Write a short story about a brave knight.",        # kept
        "",                                                  # empty
        "Describe the picture on the wall.",                 # blacklisted
        "Write a short story about a brave young knight.",   # near copy of the first
        "What is the capital of Japan",                      # copies a seed
        "List five fruits that are rich in vitamin C.",      # kept
        "write a short story about a brave knight",          # exact repeat (normalized)
        "What is the capital city of Japan?",                # near copy of a seed
        "Translate 'good morning' into French.",             # kept
    ]
    kept, rejected = filter_instructions(candidates, cfg, SEEDS)
    assert kept == [candidates[0], candidates[5], candidates[8]]
    assert [(r["text"], r["reason"]) for r in rejected] == [
        ("", "empty"),
        (candidates[2], "blacklisted:picture"),
        (candidates[3], "near_duplicate"),
        (candidates[4], "copies_seed"),
        (candidates[6], "near_duplicate"),
        (candidates[7], "near_duplicate"),
    ]
    assert rejected[0]["rouge_l"] is None and rejected[0]["most_similar"] is None
    assert rejected[2]["most_similar"] == candidates[0] and rejected[2]["rouge_l"] >= 0.7
    assert rejected[4]["rouge_l"] == 1.0 and rejected[4]["most_similar"] == candidates[0]
    assert rejected[5]["most_similar"] == SEEDS[1]
    assert all(set(r) == {"index", "text", "reason", "rouge_l", "most_similar"} for r in rejected)
    assert all(candidates[r["index"]] == r["text"] for r in rejected)
    # deterministic: same input, same output
    assert filter_instructions(candidates, cfg, SEEDS) == (kept, rejected)


def test_previous_rounds_are_dedup_pool_not_seeds():
    cfg = InstructionFilterConfig()
    earlier = "Explain how a rainbow forms in the sky after rain."
    kept, rejected = filter_instructions([earlier, "Name three rivers in South America today."], cfg, SEEDS, [earlier])
    assert kept == ["Name three rivers in South America today."]
    assert rejected[0]["reason"] == "near_duplicate" and rejected[0]["index"] == 0


def test_repeats_within_a_batch_each_get_a_row():
    cfg = InstructionFilterConfig()
    text = "Describe the water cycle for a ten-year-old child."
    kept, rejected = filter_instructions([text, text, text], cfg, SEEDS)
    assert kept == [text] and [r["index"] for r in rejected] == [1, 2]
