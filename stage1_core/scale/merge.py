"""The merge of a scale run: cross-shard near-duplicate removal, QC over all shards, and the final
files (`scale_data.jsonl`, `rejected.jsonl`, `qc_summary.json`, `config.yaml`, `README.md`,
`session_manifest.json`, written in that order, each atomically; the manifest last).

Dedup: all-pairs ROUGE-L over 15k instructions is ~10^8 LCS computations, so candidates come from
MinHash-LSH (datasketch) over each instruction's set of ROUGE tokens (the same tokenizer as the
pilot's filter), and every candidate pair is confirmed by the exact ROUGE-L rule of
`filters.RougeDeduper` (F >= threshold, inclusive). Items are visited in (shard, row) order and
compared with the items kept so far, so of two near-copies the lowest (shard, row) is kept. An exact
repeat (same `filters.normalize` form) is a duplicate with ROUGE-L 1.0 even without tokens.
Recall: for texts without repeated tokens, ROUGE-L F >= 0.7 implies a token Jaccard >= 0.54 (LCS L
of lengths m, n: J >= L / (m + n - L) with L >= 0.35 (m + n)); the default LSH (threshold 0.2, 256
permutations: 85 bands of 3) misses a pair at J = 0.54 with probability < 5e-7.

    dups = find_duplicates(texts, rouge_threshold=0.7)   # {index: (kept index it copies, rouge_l)}
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from datasketch import MinHash, MinHashLSH

from stage1_core.scale import dataset_card, plan as scale, shards
from stage1_core.infra import faults, provenance, storage
from stage1_core.phases import filters, pipeline, qc, run
from stage1_core.scale.settings import ScalePlan, ShardManifest

FINAL_FILES = ("scale_data.jsonl", "rejected.jsonl", "qc_summary.json", "config.yaml", "README.md")
EXIT_STRICT_QC = 4


def find_duplicates(texts: list[str], rouge_threshold: float = 0.7, num_perm: int = 256,
                    lsh_threshold: float = 0.2) -> dict[int, tuple[int, float]]:
    """Near-duplicates among `texts`, keeping the earliest of each group (greedy, in list order).

    Args:
        texts: the texts in priority order (earlier wins).
        rouge_threshold: ROUGE-L F at or above which two texts are duplicates.
        num_perm: MinHash permutations.
        lsh_threshold: Jaccard threshold of the LSH candidate search (below the implied bound).
    Returns:
        {index of a dropped text: (index of the kept text it duplicates, ROUGE-L F)}.
    """
    lsh = MinHashLSH(threshold=lsh_threshold, num_perm=num_perm)
    template = MinHash(num_perm=num_perm, seed=1)  # permutations drawn once, not per text
    tokenizer = filters.RougeDeduper(threshold=rouge_threshold)
    kept_keys: dict[str, int] = {}
    kept_tokens: dict[int, list[str]] = {}
    dups: dict[int, tuple[int, float]] = {}
    for i, text in enumerate(texts):
        key = filters.normalize(text)
        if key in kept_keys:
            dups[i] = (kept_keys[key], 1.0)
            continue
        tokens = tokenizer.tokens(text)
        if tokens:
            mh = MinHash(num_perm=num_perm, seed=1, permutations=template.permutations, scheme=template.scheme)
            mh.update_batch([t.encode("utf-8") for t in sorted(set(tokens))])
            candidates = sorted(lsh.query(mh))
            if candidates:
                pool = filters.RougeDeduper(threshold=rouge_threshold)
                for c in candidates:
                    pool.add(texts[c], kept_tokens[c])
                ok, score, similar = pool.offer(text)
                if not ok:
                    dups[i] = (next(c for c in candidates if texts[c] == similar), score)
                    continue
            lsh.insert(i, mh)
            kept_tokens[i] = tokens
        kept_keys[key] = i
    return dups


def merge_run(plan: ScalePlan, *, run_id: str, started: str, manifests: list[ShardManifest],
              computed: list[int], flow_seconds: float | None = None) -> dict[str, Any]:
    """Merge every shard into the final files. Returns {exit_code, passed, rows, output, run_id, ...}.

    Args:
        plan: the scale plan.
        run_id: this run's id.
        started: when this run started (UTC ISO).
        manifests: the valid manifest of every shard, in shard order.
        computed: indices of the shards computed by this run (the others were already complete).
        flow_seconds: wall time of the flow so far.
    """
    t0 = time.perf_counter()
    out, cfg = Path(plan.output), plan.config
    rows = [r for m in manifests for r in shards.read(out, m, "data")]
    rejected = [r for m in manifests for r in shards.read(out, m, "rejected")]
    completions = [c for m in manifests for c in shards.read(out, m, "completions")]
    sc = cfg.scale
    dups = find_duplicates([r["instruction"] for r in rows], cfg.instruction_filter.rouge_threshold,
                           sc.minhash_num_perm, sc.minhash_threshold)
    kept = [r for i, r in enumerate(rows) if i not in dups]
    merged_out = [{"phase": "merge", "id": rows[i]["id"], "instruction": rows[i]["instruction"],
                   "response": rows[i]["response"], "reason": "near_duplicate", "rouge_l": score,
                   "most_similar": rows[j]["instruction"], "most_similar_id": rows[j]["id"]}
                  for i, (j, score) in sorted(dups.items())]
    rejected += merged_out
    storage.write_jsonl_atomic(out / "scale_data.jsonl", kept)
    storage.write_jsonl_atomic(out / "rejected.jsonl", rejected)
    faults.maybe_fault("merge")
    summary = qc_summary(plan, manifests, kept, rejected, completions, len(merged_out))
    storage.write_json_atomic(out / "qc_summary.json", summary)
    storage.write_yaml_atomic(out / "config.yaml", cfg.model_dump(mode="json"))
    exit_code = EXIT_STRICT_QC if plan.strict_qc and not summary["passed"] else 0
    manifest = session_manifest(plan, run_id=run_id, started=started, manifests=manifests, computed=computed,
                                summary=summary, exit_code=exit_code,
                                timings={"flow_seconds": flow_seconds, "merge_seconds": round(time.perf_counter() - t0, 3)})
    storage.write_text_atomic(out / "README.md", dataset_card.render(plan, summary, manifest))
    manifest["artifacts"] = [storage.file_manifest(out / n) for n in FINAL_FILES]
    storage.write_json_atomic(out / "session_manifest.json", manifest)
    return {"exit_code": exit_code, "passed": summary["passed"], "rows": len(kept), "output": str(out),
            "run_id": run_id, "near_duplicates": len(merged_out), "shards_computed": computed}


def qc_summary(plan: ScalePlan, manifests: list[ShardManifest], kept: list[dict[str, Any]],
               rejected: list[dict[str, Any]], completions: list[dict[str, Any]], cross_dups: int) -> dict[str, Any]:
    """The pilot's metrics over all shards, judged by the same gate; `passed` is `decision == scale`."""
    th = plan.config.qc
    total = {k: sum(getattr(m.counts, k) for m in manifests) for k in
             ("instructions_generated", "instructions_kept", "pairs_generated", "pairs_kept")}
    by_reason = pipeline.count_reasons(rejected)
    within = qc.rejections(by_reason, "instruction_filter", *qc.NEAR_DUPLICATE_REASONS)
    critic_dev = next((m.critic_dev for m in manifests if m.critic_dev), None) or \
        (plan.pilot.critic_dev if plan.pilot else None)
    metrics = qc.compute_metrics(
        instructions_generated=total["instructions_generated"], instructions_kept=total["instructions_kept"],
        instructions_distinct=max(0, total["instructions_generated"] - within - cross_dups),
        instructions_critic_rejected=qc.rejections(by_reason, "instruction_filter", "critic"),
        instructions_near_duplicate=within,
        response_completions=[{"raw": c["raw"], "stop_reason": c["stop_reason"]} for c in completions],
        kept_pairs=[{"response": r["response"], "response_tokens": r["provenance"]["response_tokens"]} for r in kept],
        pairs_generated=total["pairs_generated"], pairs_critic_rejected=qc.rejections(by_reason, "pair_filter", "critic"),
        critic_dev_accuracy=(critic_dev or {}).get("accuracy"), thresholds=th,
        critic_dev_auc=qc.critic_dev_auc(critic_dev))
    decision = qc.gate(metrics, th, pairs_generated=total["pairs_generated"], iteration=1, max_iterations=1,
                       model_id=plan.config.model.id)
    return {"gate": decision.to_dict(), "passed": decision.decision == "scale", "strict_qc": plan.strict_qc,
            "metrics": metrics, "thresholds": th.model_dump(),
            "counts": {**total, "near_duplicates_across_shards": cross_dups, "rows": len(kept), "requested": plan.config.count,
                       "rejected": len(rejected), "shards": len(manifests)},
            "rejected_by_reason": by_reason, "critic_dev": critic_dev,
            "observed_delimiters": qc.observed_delimiters([c["raw"] for c in completions])}


def session_manifest(plan: ScalePlan, *, run_id: str, started: str, manifests: list[ShardManifest],
                     computed: list[int], summary: dict[str, Any], exit_code: int,
                     timings: dict[str, Any]) -> dict[str, Any]:
    """session_manifest.json of a scale run (artifacts are added by the caller, after README.md)."""
    from stage1_core.model import loaded_fingerprint

    cfg = plan.config
    gpu_all = round(sum(m.gpu_seconds for m in manifests), 3)
    gpu_now = round(sum(m.gpu_seconds for m in manifests if m.shard in computed), 3)
    price = cfg.gpu_hour_usd
    tokens = {k: sum(getattr(m.tokens, k) for m in manifests) for k in ("instructions", "responses", "total")}
    return {
        "run_id": run_id, "kind": "scale", "started": started, "finished": provenance.utc_now(),
        "qc": {"passed": summary["passed"], "decision": summary["gate"], "strict_qc": plan.strict_qc},
        "exit_code": exit_code, "forced": plan.forced, "pilot": plan.pilot and plan.pilot.model_dump(),
        "seeds": plan.seeds.model_dump(),
        "model": {**plan.model.model_dump(), **(loaded_fingerprint(cfg.model.model_dump(mode="json")) or {})},
        "identity": plan.identity.model_dump(), "config_hash": plan.config_hash,
        "environment": provenance.environment_info(), "git": provenance.git_info(run.REPO_DIR),
        "shards": [{"shard": m.shard, "seed": m.shard_seed, "size": m.size, "rows": m.rows,
                    "sha256": m.files["data"].sha256, "run_id": m.run_id, "computed_in_this_run": m.shard in computed,
                    "seconds": m.seconds, "examples_per_s": m.examples_per_s, "device": m.device,
                    "gpu_seconds": m.gpu_seconds, "tokens": m.tokens.total,
                    "attempts": len(m.attempts) or 1} for m in manifests],
        "timings": {**timings, "shard_compute_seconds": round(sum(m.seconds for m in manifests), 3),
                    "shard_compute_seconds_this_run": round(sum(m.seconds for m in manifests if m.shard in computed), 3)},
        "tokens": tokens,
        "gpu_seconds": gpu_all, "gpu_seconds_this_run": gpu_now, "gpu_hour_usd": price,
        "estimated_cost_usd": round(gpu_all / 3600 * price, 4) if price is not None else None,
        "plan_estimate": scale.estimate(plan),
        "approval": None,
    }

