"""The cross-shard merge: MinHash-LSH candidates confirmed by ROUGE-L equal the all-pairs greedy
rule (keep the lowest index), exact repeats, the inclusive threshold; the dataset card."""

from __future__ import annotations

import random

import pytest
import yaml

from stage1_core.scale import dataset_card, merge
from stage1_core.phases import filters
from stage1_core.model.fake import QUALIFIERS, TOPICS, VERBS
from stage1_core.phases.seeds import PACKAGED_SEEDS
from stage1_core.phases.plans import SeedsSummary
from stage1_core.scale.settings import ScalePlan, ScaleRunConfig, ScaleSettings


def brute_force(texts, threshold=0.7):
    """All-pairs reference: visit in order, drop a text whose ROUGE-L F against any kept one is >= threshold."""
    kept, dups = [], {}
    seen = {}
    for i, t in enumerate(texts):
        key = filters.normalize(t)
        if key in seen:
            dups[i] = seen[key]
            continue
        if kept:
            ok, _, similar = filters.RougeDeduper([texts[k] for k in kept], threshold).offer(t)
            if not ok:
                dups[i] = next(k for k in kept if texts[k] == similar)
                continue
        kept.append(i)
        seen[key] = i
    return dups


def corpus(n, seed=0):
    rng = random.Random(seed)
    extra = ["quickly", "carefully", "today", "for beginners", "in French", "with a story", "briefly", "again"]
    out = []
    for _ in range(n):
        words = f"{rng.choice(VERBS)} {rng.choice(TOPICS)} {rng.choice(QUALIFIERS)}".split()
        for _ in range(rng.randint(0, 4)):
            words.insert(rng.randint(0, len(words)), rng.choice(extra))
        out.append(" ".join(words))
    return out


def test_lsh_candidates_confirmed_by_rouge_equal_all_pairs():
    texts = corpus(800)
    got = merge.find_duplicates(texts)
    assert {i: j for i, (j, _) in got.items()} == brute_force(texts)
    assert 100 < len(got) < 790  # the corpus has plenty of near-copies, and plenty of distinct texts
    for i, (j, score) in got.items():
        assert j < i and score >= 0.7


def test_keeps_the_lowest_and_handles_repeats_and_tokenless_texts():
    texts = ["Write a poem about the sea.", "Explain gravity to a child.", "write a poem about the sea!!",
             "???", "???", "Write a short poem about the sea."]
    assert merge.find_duplicates(texts) == {2: (0, 1.0), 4: (3, 1.0), 5: (0, pytest.approx(0.923, abs=1e-3))}


def test_threshold_is_inclusive():
    a = "alpha beta gamma delta epsilon zeta eta theta iota kappa"
    b = "alpha beta gamma delta epsilon zeta eta xx yy zz"      # 7 of 10 shared: F = 0.7 exactly
    c = "alpha beta gamma delta epsilon zeta xx yy zz ww"       # 6 of 10: F = 0.6
    assert 1 in merge.find_duplicates([a, b])
    assert merge.find_duplicates([a, c]) == {}


def test_model_license_and_seed_attribution(tmp_path):
    assert "Gemma Terms of Use" in dataset_card.model_license({"kind": "embedded"})
    assert "fake" in dataset_card.model_license({"kind": "fake"})
    folder = tmp_path / "m"
    folder.mkdir()
    assert "not recorded" in dataset_card.model_license({"kind": "hf_folder", "path": str(folder)})
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# A model\n")
    assert dataset_card.model_license({"kind": "hf_folder", "path": str(folder)}).startswith("apache-2.0")
    assert "Wang et al." in dataset_card.seeds_attribution(_seeds(str(PACKAGED_SEEDS), "x"))
    assert "not recorded" in dataset_card.seeds_attribution(_seeds("/x/mine.jsonl", "ab" * 32))


def _seeds(path: str, sha256: str) -> SeedsSummary:
    return SeedsSummary(path=path, format="stage1", count=1, usable=1, sha256=sha256)


def test_card_front_matter_parses():
    summary = {"counts": {"rows": 1500, "requested": 2000, "rejected": 700, "near_duplicates_across_shards": 12,
                          "instructions_generated": 5000, "instructions_kept": 2600, "pairs_generated": 2100,
                          "pairs_kept": 1512, "shards": 4},
               "rejected_by_reason": {"merge:near_duplicate": 12, "pair_filter:critic": 588},
               "gate": {"decision": "scale", "reasons": ["all gated metrics passed"], "failed": []}, "passed": True,
               "metrics": {"runaway_rate": {"value": 0.01, "k": 1, "n": 100, "ci95": [0.0, 0.05], "op": "<",
                                            "threshold": 0.05, "passed": True}}}
    plan = ScalePlan.model_construct(config=ScaleRunConfig.model_construct(seed=3, scale=ScaleSettings(shard_size=500)),
                                     seeds=_seeds(str(PACKAGED_SEEDS), "x"), config_hash="c" * 64, pilot=None, forced=False)
    manifest = {"run_id": "r" * 32, "model": {"id": "embedded:gemma-3-270m", "kind": "embedded", "weights_sha256": "w" * 64}}
    text = dataset_card.render(plan, summary, manifest)
    front = yaml.safe_load(text.split("---")[1])
    assert front["size_categories"] == ["1K<n<10K"] and front["configs"][0]["data_files"][0]["path"] == "scale_data.jsonl"
    for needle in ("Gemma Terms of Use", "Wang et al.", "| merge:near_duplicate | 12 |", "| runaway_rate |",
                   'load_dataset("json", data_files="scale_data.jsonl"', "kept: **1500**"):
        assert needle in text
