"""The five pilot phases as plain functions over files: each takes its typed call
(`stage1_core.phases.plans`), reads its input artifacts, writes its outputs atomically and returns
its manifest. No Prefect here; the Prefect tasks in `tasks/` are thin wrappers around `run_phase`.

A call holds:
- params: the config slice the phase depends on (plus seed/round/iteration numbers), typed per phase,
- inputs: the files it reads (`FileRef`: path, rows, sha256), typed per phase,
- model: the ModelConfig; loaded lazily, only when the phase really runs,
- meta: run id, git sha, config hash — recorded in outputs but never part of the cache key.

Folder layout of a run: `instructions/round-NN.*` (phases 1-2, shared by all iterations: the
adjustment table never changes them), `iterations/NN/*` (phases 3-5), top-level final files.
"""

from __future__ import annotations

import hashlib
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

from stage1_core.infra import codehash, faults, interrupts, jsonl, storage
from stage1_core.phases import filters, prompts, qc
from stage1_core.model import Backend
from stage1_core.infra.config import InstructionFilterConfig, ModelConfig
from stage1_core.phases.critic import ABCritic, instruction_reject_reason, pair_reject_reason
from stage1_core.phases.plans import (FileRef, FilterInstructionsCall, FilterPairsCall, Gate, GenerateInstructionsCall,
                                      GenerateResponsesCall, InstructionFilterManifest, InstructionRoundManifest,
                                      JsonObject, PairFilterManifest, PhaseCall, PhaseManifest, QCCall, QCManifest,
                                      Record, ResponsesManifest)
from stage1_core.phases.seeds import load_seeds

CORE_DIR = Path(__file__).resolve().parents[1]
Progress = Callable[[int, int], None]

PHASE_DATA: dict[str, tuple[str, ...]] = {"filter_pairs": ("data/critic_dev.test.jsonl",)}
"""Data files under stage1_core/ a phase reads besides its inputs (the critic dev split QC measures)."""
CRITIC_DEV_SET = CORE_DIR / "data" / "critic_dev.test.jsonl"
"""The held-out split of the shipped critic dev set (QC measures it; the tuning split chose the defaults)."""


def phase_modules(phase: str) -> list[str]:
    """The stage1_core modules a phase's function can reach, computed from the source
    (`codehash.function_modules`: the names it uses, the same-module helpers it calls, and their
    imports, transitively), sorted."""
    return sorted(codehash.function_modules(CORE_DIR, "phases.pipeline", PHASES[phase].__name__))


def code_hash(phase: str) -> str:
    """sha256 over the source of the core modules a phase reaches (`phase_modules`) and its data
    files (`PHASE_DATA`), so editing one invalidates exactly the phases that can run it."""
    h = hashlib.sha256()
    files = [codehash.module_path(CORE_DIR, m) for m in phase_modules(phase)]
    files += [CORE_DIR / name for name in PHASE_DATA.get(phase, ())]
    for path in files:
        h.update(path.relative_to(CORE_DIR).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _input_shas(inputs: Record) -> dict[str, str | list[str] | None]:
    """Each input file by its sha256 only (its path and row count follow from the content)."""
    def sha(ref: FileRef | list[FileRef] | None) -> str | list[str] | None:
        if isinstance(ref, list):
            return [r.sha256 for r in ref]
        return None if ref is None else ref.sha256
    return {name: sha(getattr(inputs, name)) for name in type(inputs).model_fields}


def cache_key(call: PhaseCall) -> str:
    """Cache key of a phase call: its config slice + sha256 of its input artifacts + hash of the
    core modules it uses + the model fingerprint + the resolved output folder. Run id, git sha
    and other `meta` are deliberately left out, so a new run of the same config hits. The model part
    is the weights sha256 plus the model settings that can change outputs (`model_settings`)."""
    phase = call.phase
    material = {
        "phase": phase,
        "params": call.params.model_dump(mode="json"),
        "inputs": _input_shas(call.inputs),
        "code": code_hash(phase),
        "model": {"weights_sha256": call.model_sha, "settings": model_settings(call.model)} if phase != "qc" else None,
        "out_dir": str(Path(call.out_dir).resolve()),
    }
    return f"stage1-{phase}-" + hashlib.sha256(storage.canonical_json(material).encode()).hexdigest()[:40]


OUTPUT_NEUTRAL_MODEL_KEYS = ("batch_size",)
"""ModelConfig keys left out of the cache key: sampling is per item id (Backend.generate), so the
batch size changes speed, not outputs."""


def model_settings(model: ModelConfig) -> dict[str, Any]:
    """The `model` section of a call as the cache key hashes it: every key (id, revision, bos_policy,
    dtype, device, allow_pickle, engine, quantize, ...) but OUTPUT_NEUTRAL_MODEL_KEYS, with `device`
    and `dtype` resolved ("auto" is float32 on the CPU, and on a GPU float32 up to sizing.SMALL_MODEL_PARAMS
    parameters, else bfloat16: a phase computed on one must not count as a hit on the other). Fake models
    compute the same on any device: left as given. The stage1 engine's lossy switches that this process
    sets (FP8 projections, an e4m3 KV cache: fp8.lossy_switches) are hashed as `lossy_engine`."""
    settings = model.model_dump(mode="json", exclude=set(OUTPUT_NEUTRAL_MODEL_KEYS))
    if not model.id.startswith("fake:") and "auto" in (model.device, model.dtype):
        from stage1_core.model import resolve_device, resolve_dtype, resolve_model

        device = resolve_device(model.device)
        sized = device != "cpu" and model.dtype == "auto"  # only a GPU's auto depends on the size
        resolved = resolve_model(model) if sized else None
        settings["dtype"] = resolve_dtype(model.dtype, device, resolved)
        settings["device"] = device
    if not model.id.startswith("fake:") and model.engine == "stage1":
        from stage1_core.model import lossy_switches

        lossy = lossy_switches()
        if lossy:  # absent when off: the keys of runs without them stay what they were
            settings["lossy_engine"] = lossy
    return settings


def sidecar_path(call: PhaseCall) -> Path:
    """Where a phase records which cache key produced its outputs."""
    suffix = f"-round-{call.round:02d}" if call.round is not None else ""
    return Path(call.out_dir) / f".{call.phase}{suffix}.cache.json"


def outputs_valid(call: PhaseCall, key: str) -> bool:
    """True if the sidecar says `key` produced the outputs and every output file still exists
    with its recorded sha256 (a cache hit is trusted only then)."""
    side = sidecar_path(call)
    try:
        rec = json.loads(side.read_text())
    except (OSError, ValueError):
        return False
    if rec.get("key") != key:
        return False
    for out in rec.get("outputs", []):
        p = Path(out["path"])
        if not p.is_file() or storage.sha256_file(p) != out["sha256"]:
            return False
    return True


M = TypeVar("M", bound=PhaseManifest)


def _finish(call: PhaseCall, key: str | None, kind: type[M], outputs: dict[str, FileRef], **fields: Any) -> M:
    """The phase's manifest (`kind`), after its sidecar records `key` and the output files."""
    manifest = kind(phase=call.phase, outputs=outputs, run_id=call.meta.run_id, round=call.round,
                    iteration=call.iteration, instructions_since=call.instructions_since, **fields)
    faults.maybe_fault("phase_end")
    if key is not None:
        storage.write_json_atomic(sidecar_path(call), {"key": key,
                                                       "outputs": [o.model_dump() for o in outputs.values()]})
    return manifest


def _backend(call: PhaseCall) -> Backend:
    from stage1_core.model import load_backend
    return load_backend(call.model)


def _derive_seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:4], "big")


def _noop(done: int, total: int) -> None:
    return None


def _counter(progress: Progress, total: int) -> Callable[[int], None]:
    """Adapt a (done, total) progress callback to the backends' per-batch increments."""
    done = 0

    def step(n: int) -> None:
        nonlocal done
        interrupts.check()  # a swallowed Ctrl-C stops the phase at its next batch
        done += n
        progress(done, total)

    return step


# -- phase 1 -------------------------------------------------------------------------------------
def generate_instructions(call: GenerateInstructionsCall, key: str | None = None,
                          progress: Progress = _noop) -> InstructionRoundManifest:
    """One round of few-shot list continuation: `prompts_per_round` prompts of k sampled seeds."""
    p, out = call.params, Path(call.out_dir)
    ig = p.instruction_generation
    seedset = load_seeds(p.seeds_path)
    usable = seedset.usable_seeds()
    rnd = p.round
    kept_before = call.inputs.kept_before
    pool = jsonl.read_rows(kept_before.path) if ig.machine_examples and kept_before else []
    prompt_rows = []
    for i in range(ig.prompts_per_round):
        rng = random.Random(_derive_seed(p.seed, "instructions", rnd, i))
        m = min(ig.machine_examples, len(pool))
        chosen = rng.sample(usable, ig.few_shot_k - m)
        lines = [(s.list_text() or "", None) for s in chosen]
        if m:  # Self-Instruct's mix: machine instructions kept so far among the human seeds, in a random order
            lines += [(pool[j]["instruction"], pool[j]["id"]) for j in rng.sample(range(len(pool)), m)]
            rng.shuffle(lines)
        prompt_rows.append({"seed_ids": [s.id for s in chosen], "machine_ids": [mid for _, mid in lines if mid],
                            "prompt": prompts.build_instruction_prompt(ig.header, [t for t, _ in lines])})
    params = ig.sampling()
    step = _counter(progress, len(prompt_rows))
    comps = _backend(call).generate([r["prompt"] for r in prompt_rows], params, _derive_seed(p.seed, "gen", rnd), step,
                                    ids=[f"r{rnd:02d}-p{i:03d}" for i in range(len(prompt_rows))])
    completions, generated = [], []
    for i, (row, comp) in enumerate(zip(prompt_rows, comps)):
        items = prompts.parse_instruction_list(comp.text, ig.few_shot_k + 1, comp.stop_reason == "token_limit")
        completions.append({"round": rnd, "prompt_index": i, "seed_ids": row["seed_ids"],
                            "machine_ids": row["machine_ids"], "raw": comp.text,
                            "stop_reason": comp.stop_reason, "n_tokens": comp.n_tokens, "n_items": len(items)})
        for j, text in enumerate(items):
            generated.append({"id": f"r{rnd:02d}-p{i:03d}-i{j:02d}", "instruction": text, "round": rnd,
                              "prompt_index": i, "item_index": j, "stop_reason": comp.stop_reason,
                              "seed_ids": row["seed_ids"]})
    stem = out / f"round-{rnd:02d}"
    storage.write_jsonl_atomic(f"{stem}.completions.jsonl", completions)
    storage.write_jsonl_atomic(f"{stem}.generated.jsonl", generated)
    return _finish(call, key, InstructionRoundManifest, {
        "completions": FileRef.of(f"{stem}.completions.jsonl", len(completions)),
        "generated": FileRef.of(f"{stem}.generated.jsonl", len(generated)),
    }, tokens=sum(c.n_tokens for c in comps), prompts=len(comps), generated=len(generated))


# -- phase 2 -------------------------------------------------------------------------------------
def filter_instructions(call: FilterInstructionsCall, key: str | None = None,
                        progress: Progress = _noop) -> InstructionFilterManifest:
    """Heuristics, ROUGE-L dedup against seeds + everything kept so far, the critic's cheap checks,
    then the critic.
    Writes the cumulative kept pool and this round's rejections."""
    p, out, ins = call.params, Path(call.out_dir), call.inputs
    fcfg, ccfg = p.instruction_filter, p.critic
    seed_texts = [s.instruction for s in load_seeds(p.seeds_path).seeds]
    previous = jsonl.read_rows(ins.kept_before.path) if ins.kept_before else []
    generated = jsonl.read_rows(ins.generated.path)
    texts = [g["instruction"] for g in generated]
    _, rejected_rows = filters.filter_instructions(texts, fcfg, seed_texts, [k["instruction"] for k in previous])
    dropped = {r["index"]: r for r in rejected_rows}
    candidates = [g for i, g in enumerate(generated) if i not in dropped]
    rejected = [{"phase": "instruction_filter", "id": generated[i]["id"], "instruction": generated[i]["instruction"],
                 "reason": r["reason"], "rouge_l": r.get("rouge_l"), "most_similar": r.get("most_similar")}
                for i, r in sorted(dropped.items())]
    checked = []
    for c in candidates:  # the critic's own cheap checks (truncated, leakage, list residue, repetition)
        reason = instruction_reject_reason(c["instruction"], ccfg.instruction_heuristics)
        if reason is None:
            checked.append(c)
        else:
            rejected.append({"phase": "instruction_filter", "id": c["id"], "instruction": c["instruction"],
                             "reason": reason, "rouge_l": None, "most_similar": None})
    candidates = checked
    step = _counter(progress, len(candidates))
    critiques = ABCritic(_backend(call), ccfg).score("instruction", [(c["instruction"], None) for c in candidates], step) if candidates else []
    kept = list(previous)
    for c, crit in zip(candidates, critiques):
        row = {**c, "instruction_critique": crit.model_dump()}
        if crit.is_good:
            kept.append(row)
        else:
            rejected.append({"phase": "instruction_filter", "id": c["id"], "instruction": c["instruction"],
                             "reason": "critic", "critique": crit.model_dump()})
    stem = out / f"round-{p.round:02d}"
    storage.write_jsonl_atomic(f"{stem}.kept.jsonl", kept)
    storage.write_jsonl_atomic(f"{stem}.rejected.jsonl", rejected)
    return _finish(call, key, InstructionFilterManifest, {
        "kept": FileRef.of(f"{stem}.kept.jsonl", len(kept)),
        "rejected": FileRef.of(f"{stem}.rejected.jsonl", len(rejected)),
    }, kept_total=len(kept), generated=len(generated), accepted=len(kept) - len(previous),
        heuristic_or_dup=len(generated) - len(candidates), critic_rejected=len(candidates) - (len(kept) - len(previous)))


# -- phase 3 -------------------------------------------------------------------------------------
def generate_responses(call: GenerateResponsesCall, key: str | None = None,
                       progress: Progress = _noop) -> ResponsesManifest:
    """Worked-example completion prompts for the first `count` kept instructions."""
    p, out = call.params, Path(call.out_dir)
    rg = p.response_generation
    kept = jsonl.read_rows(call.inputs.kept.path)[: p.count]
    examples = rg.worked_examples[: rg.n_examples]
    params = rg.sampling()
    step = _counter(progress, len(kept))
    backend = _backend(call)
    comps = backend.generate([prompts.build_response_prompt(k["instruction"], examples) for k in kept], params,
                             _derive_seed(p.seed, "responses", p.iteration), step,
                             ids=[k["id"] for k in kept]) if kept else []
    rows = []
    for k, comp in zip(kept, comps):
        response = prompts.clean_response(comp.text, rg.stop_sequences)
        rows.append({**k, "raw": comp.text, "stop_reason": comp.stop_reason, "completion_tokens": comp.n_tokens,
                     "response": response, "response_tokens": backend.count_tokens(response) if response else 0})
    storage.write_jsonl_atomic(out / "responses.jsonl", rows)
    return _finish(call, key, ResponsesManifest, {"responses": FileRef.of(out / "responses.jsonl", len(rows))},
                   tokens=sum(c.n_tokens for c in comps), prompts=len(comps))


# -- phase 4 -------------------------------------------------------------------------------------
def filter_pairs(call: FilterPairsCall, key: str | None = None, progress: Progress = _noop) -> PairFilterManifest:
    """The pair critic; cheap checks first (`critic.pair_reject_reason`: empty responses always,
    leakage and repetition with critic.pair_heuristics). Also measures the critic on the shipped
    labelled dev set."""
    p, out = call.params, Path(call.out_dir)
    ccfg = p.critic
    rows = jsonl.read_rows(call.inputs.responses.path)
    kept, rejected, judged = [], [], []
    for r in rows:
        reason = pair_reject_reason(r["response"], ccfg.pair_heuristics, r["instruction"])
        if reason is None:
            judged.append(r)
        else:
            rejected.append({"phase": "pair_filter", "id": r["id"], "instruction": r["instruction"],
                             "response": r["response"], "raw": r["raw"], "stop_reason": r["stop_reason"],
                             "reason": reason})
    step = _counter(progress, len(judged))
    critic = ABCritic(_backend(call), ccfg)
    critiques = critic.score("pair", [(r["instruction"], r["response"]) for r in judged], step) if judged else []
    for r, crit in zip(judged, critiques):
        row = {**r, "pair_critique": crit.model_dump()}
        if crit.is_good:
            kept.append(row)
        else:
            rejected.append({"phase": "pair_filter", "id": r["id"], "instruction": r["instruction"],
                             "response": r["response"], "stop_reason": r["stop_reason"], "reason": "critic",
                             "critique": crit.model_dump()})
    dev = None
    if p.measure_dev:
        t0 = time.perf_counter()
        dev = {**critic_dev_accuracy(critic), "seconds": round(time.perf_counter() - t0, 2)}
    storage.write_jsonl_atomic(out / "pairs.kept.jsonl", kept)
    storage.write_jsonl_atomic(out / "pairs.rejected.jsonl", rejected)
    return _finish(call, key, PairFilterManifest, {"kept": FileRef.of(out / "pairs.kept.jsonl", len(kept)),
                                                   "rejected": FileRef.of(out / "pairs.rejected.jsonl", len(rejected))},
                   critic_dev=dev)


def critic_dev_accuracy(critic: ABCritic, instruction_filter: InstructionFilterConfig | None = None) -> JsonObject:
    """The critic measured on the shipped held-out dev split (CRITIC_DEV_SET), as critic_eval does.

    Args:
        critic: the critic in use (its model and config).
        instruction_filter: the instruction heuristics' config (default: configs/pilot.yaml's).
    Returns:
        {"path", "sha256", "n", "accuracy", "instruction": {...}, "pair": {...}}: per kind critic_eval's
        keys (n, accuracy, auc, mean margins, mean_ab_mass, heuristic_rejects) on the pipeline's
        final score (heuristic rejects count as rejected and score -inf); overall accuracy over both.
    """
    from stage1_core.phases.critic_eval import evaluate, load_labels

    sha = storage.sha256_file(CRITIC_DEV_SET)
    memo_key = storage.canonical_json({"model": critic.backend.fingerprint, "critic": critic.cfg.model_dump(mode="json"),
                                       "filter": instruction_filter and instruction_filter.model_dump(mode="json"),
                                       "dev": sha})
    if memo_key in _DEV_MEMO:  # the same model and critic measure the same (every iteration asks again)
        return json.loads(_DEV_MEMO[memo_key])
    items = load_labels(CRITIC_DEV_SET)
    per_kind = evaluate(items, critic, heuristics=True, instruction_filter=instruction_filter)
    result: dict[str, Any] = {"path": CRITIC_DEV_SET.name, "sha256": sha}
    correct = sum(round(v["accuracy"] * v["n"]) for v in per_kind.values() if v["n"])
    result.update(per_kind)
    result["n"] = len(items)
    result["accuracy"] = round(correct / len(items), 4) if items else None
    _DEV_MEMO[memo_key] = json.dumps(result)
    return result


_DEV_MEMO: dict[str, str] = {}


# -- phase 5 -------------------------------------------------------------------------------------
def qc_phase(call: QCCall, key: str | None = None, progress: Progress = _noop) -> QCManifest:
    """Metrics, the gate, and the iteration's final files: pilot_data.jsonl, rejected.jsonl,
    qc_summary.json."""
    p, out, ins, meta = call.params, Path(call.out_dir), call.inputs, call.meta
    th = p.qc
    generated = [g for m in ins.generated for g in jsonl.read_rows(m.path)]
    instr_rejected = [r for m in ins.instruction_rejected for r in jsonl.read_rows(m.path)]
    kept_pool = jsonl.read_rows(ins.kept.path)
    responses = jsonl.read_rows(ins.responses.path)
    pairs = jsonl.read_rows(ins.pairs_kept.path)
    pair_rejected = jsonl.read_rows(ins.pairs_rejected.path)
    surplus = [{"phase": "instruction_filter", "id": k["id"], "instruction": k["instruction"], "reason": "surplus_over_count"}
               for k in kept_pool[p.count:]]
    distinct = len({filters.normalize(g["instruction"]) for g in generated}) if generated else 0
    rejected = instr_rejected + surplus + pair_rejected
    by_reason = count_reasons(rejected)
    dedup_dropped = qc.rejections(by_reason, "instruction_filter", *qc.NEAR_DUPLICATE_REASONS)
    metrics = qc.compute_metrics(
        instructions_generated=len(generated), instructions_kept=len(kept_pool),
        instructions_distinct=max(0, min(distinct, len(generated) - dedup_dropped)),
        instructions_critic_rejected=qc.rejections(by_reason, "instruction_filter", "critic"),
        instructions_near_duplicate=dedup_dropped,
        response_completions=[{"raw": r["raw"], "stop_reason": r["stop_reason"]} for r in responses],
        kept_pairs=[{"response": r["response"], "response_tokens": r["response_tokens"]} for r in pairs],
        pairs_generated=len(responses), pairs_critic_rejected=qc.rejections(by_reason, "pair_filter", "critic"),
        critic_dev_accuracy=(p.critic_dev or {}).get("accuracy"), thresholds=th,
        critic_dev_auc=qc.critic_dev_auc(p.critic_dev))
    decision = qc.gate(metrics, th, pairs_generated=len(responses), iteration=p.iteration,
                       max_iterations=p.max_iterations, allow_iterate_when_exhausted=p.max_iterations == 0,
                       model_id=p.model_id)
    provenance_base = {"run_id": meta.run_id, "git_sha": meta.git_sha, "config_hash": meta.config_hash,
                       "model": {"id": p.model_id, "weights_sha256": p.model_sha}, "seed": p.seed,
                       "iteration": p.iteration, "generation": p.generation.model_dump(mode="json")}
    data = [data_row(r, provenance_base) for r in pairs]
    summary = {"gate": decision.to_dict(), "metrics": metrics, "thresholds": th.model_dump(),
               "counts": {"instructions_generated": len(generated), "instructions_kept": len(kept_pool),
                          "pairs_generated": len(responses), "pairs_kept": len(pairs), "rejected": len(rejected)},
               "rejected_by_reason": by_reason, "critic_dev": p.critic_dev,
               "iteration": p.iteration, "observed_delimiters": qc.observed_delimiters([r["raw"] for r in responses])}
    storage.write_jsonl_atomic(out / "pilot_data.jsonl", data)
    storage.write_jsonl_atomic(out / "rejected.jsonl", rejected)
    storage.write_json_atomic(out / "qc_summary.json", summary)
    median = statistics.median([r["response_tokens"] for r in pairs]) if pairs else None
    return _finish(call, key, QCManifest, {"pilot_data": FileRef.of(out / "pilot_data.jsonl", len(data)),
                                           "rejected": FileRef.of(out / "rejected.jsonl", len(rejected)),
                                           "qc_summary": FileRef.of(out / "qc_summary.json", 1)},
                   decision=Gate.model_validate(decision.to_dict()), summary=summary, median_response_tokens=median)


def data_row(pair: dict[str, Any], provenance_base: dict[str, Any]) -> dict[str, Any]:
    """A kept pair (a `pairs.kept.jsonl` row) as a dataset row: instruction, response, both
    critiques, and its provenance (`provenance_base` plus where the instruction came from)."""
    return {"id": pair["id"], "instruction": pair["instruction"], "response": pair["response"],
            "instruction_critique": pair.get("instruction_critique"), "pair_critique": pair.get("pair_critique"),
            "provenance": {**provenance_base, "round": pair["round"], "prompt_index": pair["prompt_index"],
                           "seed_ids": pair["seed_ids"], "stop_reason": pair["stop_reason"],
                           "response_tokens": pair["response_tokens"]}}


def count_reasons(rows: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        k = f"{r['phase']}:{r['reason'].split(':')[0]}"
        out[k] = out.get(k, 0) + 1
    return dict(sorted(out.items()))


PHASES: dict[str, Callable[..., PhaseManifest]] = {
    "generate_instructions": generate_instructions,
    "filter_instructions": filter_instructions,
    "generate_responses": generate_responses,
    "filter_pairs": filter_pairs,
    "qc": qc_phase,
}


def run_phase(call: PhaseCall, key: str | None = None, progress: Progress = _noop) -> PhaseManifest:
    """Run the call's phase; `key` (if given) is recorded in the sidecar for cache validation.
    The manifest also records the compute seconds and the run id that produced it."""
    interrupts.check()
    Path(call.out_dir).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    manifest = PHASES[call.phase](call, key, progress)
    return manifest.model_copy(update={"seconds": round(time.perf_counter() - t0, 3)})
