"""The scale run's plan and its shards: settings, `--from-pilot`, shard seeds, one shard's
computation from the pilot's phase functions, the dry-run estimate, a scheduled run's seed.

    plan = prepare_scale(output="artifacts/scale", count=15000, shard_size=500, seed=42)  # InputError -> exit 2
    claim(plan, run_id)                                    # folder + .stage1_run.json + config.yaml
    manifest = compute_shard(plan, 0, run_id)              # shards/shard-00000.{jsonl,manifest.json}, ...
    merge.merge_run(plan, ...)                             # scale_data.jsonl, README.md, ...

Shard i's seed is `shard_seed(run_seed, i)`; its rows are the first `size` kept pairs that a loop
of instruction rounds (phases 1-2, deduplicated within the shard) and response batches (phases 3-4,
only as many instructions as pairs are still missing) produces. Everything a shard computes lives
in `shards/shard-NNNNN.work/` until its files and manifest are written (`stage1_core.scale.shards`).
"""

from __future__ import annotations

import math
import shutil
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from stage1_core.phases import pipeline, run
from stage1_core.phases.plans import FileRef, FolderState, RunIdentity, RunMeta
from stage1_core.infra import jsonl, provenance, storage
from stage1_core.scale import shards
from stage1_core.scale.options import ScaleOptions
from stage1_core.scale.settings import (PilotMeasured, PilotSource, ScalePlan, ScaleRunConfig, ScaleSettings,
                                        ShardManifest, ShardSpec)
from stage1_core.infra.config import DEFAULT_PILOT_CONFIG, load_pilot_config, validate_pilot_config
from stage1_core.infra.settings import deep_merge, read_yaml_mapping
from stage1_core.infra.errors import InputError
from stage1_core.infra.locks import LOCK_NAME, hold_lock
from stage1_core.phases.options import CONFIG_FLAGS

# Settings that change how a run is operated, not what it computes: left out of the run identity,
# so a resume may change them.
OPERATIONAL = ("gpu_hour_usd", "scale.shard_timeout_s", "scale.max_parallel_shards", "scale.tokens_per_gpu_second",
               "scale.shard_retries")
SCALE_FLAGS: dict[str, str] = {f.json_schema_extra["config_key"].removeprefix("scale."): f.json_schema_extra["flag"]  # type: ignore[index]
                               for f in ScaleOptions.model_fields.values()
                               if str((f.json_schema_extra or {}).get("config_key", "")).startswith("scale.")}
"""`scale:` key -> the flag that sets it (from ScaleOptions): an override's error says "correct --shard-size"."""
# Dry-run assumptions without a pilot to measure them (as the pilot's dry run): list items per prompt,
# instruction and pair acceptance.
ITEMS_PER_LIST, INSTRUCTION_ACCEPTANCE, PAIR_ACCEPTANCE = 4, 0.5, 0.5


def shard_seed(run_seed: int, index: int) -> int:
    """The seed of shard `index`: a function of the run seed and the index only."""
    return pipeline._derive_seed(run_seed, "shard", index)


def shard_sizes(count: int, shard_size: int) -> list[int]:
    """Kept pairs per shard: full shards, the last one takes the remainder."""
    n = math.ceil(count / shard_size)
    return [shard_size] * (n - 1) + [count - shard_size * (n - 1)]


# -- settings ------------------------------------------------------------------------------------
def read_pilot(pilot_dir: str | Path, force: bool = False) -> tuple[PilotSource, dict[str, Any], str]:
    """The settings a finished pilot ended with, and its gate decision.

    Returns:
        (the pilot: path, gate, forced, run id, config hash, its critic dev-set measurement and what it
        measured for estimates; its config.yaml with instruction_generation and response_generation
        replaced by the final iteration's, still to be validated; that file's path).
    Raises:
        InputError: not a finished pilot folder, or its gate did not say scale (unless `force`).
    """
    d = Path(pilot_dir)
    manifest_path, config_path = d / "session_manifest.json", d / "config.yaml"
    where = {"field": "--from-pilot", "expected": "the output folder of a finished pilot (python -m flows.pilot)"}
    if not d.is_dir():
        raise InputError(f"pilot folder not found: {d}", file=str(d), fix="pass the pilot's --output folder", **where)
    try:
        manifest = storage.read_json(manifest_path)
        final_rg = manifest["iterations"][-1]["response_generation"]
        final_ig = manifest["iterations"][-1].get("instruction_generation")  # absent in pilots before iterate changed it
        decision = manifest["decision"]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        raise InputError("not a finished pilot: session_manifest.json is missing or incomplete", file=str(manifest_path),
                         fix="let the pilot finish (rerun its command to resume it), then scale from it", **where) from None
    if decision.get("decision") != "scale" and not force:
        raise InputError(f"the pilot's gate said '{decision.get('decision')}', not 'scale'", file=str(manifest_path),
                         field="decision", expected="a pilot whose gate said scale",
                         fix="iterate on the pilot until its gate says scale, or pass --force to scale anyway "
                             "(recorded as forced: true in the session manifest)")
    data, _ = read_yaml_mapping(config_path)
    data["response_generation"] = final_rg
    if final_ig is not None:
        data["instruction_generation"] = final_ig
    try:
        critic_dev = storage.read_json(d / "qc_summary.json").get("critic_dev")
    except (OSError, ValueError, AttributeError):
        critic_dev = None
    pairs_kept = next((a["rows"] for a in manifest.get("artifacts", []) if Path(a["path"]).name == "pilot_data.jsonl"), None)
    measured = PilotMeasured(pairs_kept=pairs_kept, tokens_total=(manifest.get("tokens") or {}).get("total"),
                             gpu_seconds=manifest.get("gpu_seconds"), device=(manifest.get("model") or {}).get("device"))
    source = PilotSource(path=str(d.resolve()), decision=decision, forced=decision.get("decision") != "scale",
                         run_id=manifest.get("run_id"), config_hash=manifest.get("config_hash"), critic_dev=critic_dev,
                         measured=measured)
    return source, data, str(config_path)


def _scale_settings(section: Any, over: dict[str, Any], source: str) -> ScaleSettings:
    if not isinstance(section, dict):
        raise InputError("the scale section must be a mapping", file=source, field="scale",
                         expected="scale: {shard_size: 500, ...}", fix="see docs/scale.md")
    merged = {**section, **{k: v for k, v in over.items() if v is not None}}
    try:
        return ScaleSettings.model_validate(merged)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        flag = SCALE_FLAGS.get(key)
        from_cli = key in over and over[key] is not None
        raise InputError(f"invalid value for 'scale.{key}': {err['msg'].removeprefix('Value error, ')}",
                         file="command line" if from_cli else source, field=f"scale.{key}",
                         expected="see docs/scale.md", fix=f"correct {flag}" if from_cli and flag else "correct the value") from None


def load_scale_config(*, config: str | None, pilot: tuple[dict[str, Any], str] | None, overrides: dict[str, Any],
                      scale_over: dict[str, Any]) -> ScaleRunConfig:
    """configs/pilot.yaml <- (the pilot's final settings | --config FILE) <- flags, validated.

    Args:
        pilot: the pilot's final settings and its config.yaml's path (`read_pilot`), or None.
    Returns:
        The resolved config: the pilot schema plus a `scale` section (ScaleSettings).
    Raises:
        InputError: bad YAML, unknown keys, out-of-bound values (naming file, line and field or flag).
    """
    data: dict[str, Any] = {}
    source, node = "command line", None
    if pilot is not None:
        data, source = dict(pilot[0]), pilot[1]
    elif config is not None:
        data, node = read_yaml_mapping(Path(config))
        source = str(config)
    section = data.pop("scale", {})
    if data:  # errors in the file point at the file, not at the command line
        base, _ = read_yaml_mapping(DEFAULT_PILOT_CONFIG)
        validate_pilot_config(deep_merge(base, data), source, node)
    cfg = load_pilot_config(None, deep_merge(data, overrides), flags=CONFIG_FLAGS)
    if cfg.seeds_path and not Path(cfg.seeds_path).is_absolute():
        cfg.seeds_path = str(Path(cfg.seeds_path).resolve())  # shard runs may start elsewhere
    return ScaleRunConfig.model_construct(**dict(cfg), scale=_scale_settings(section, scale_over, source))


def identity_config(cfg: ScaleRunConfig) -> dict[str, Any]:
    """The config (as JSON) without its OPERATIONAL settings: what the run identity hashes."""
    out = cfg.model_dump(mode="json")
    for dotted in OPERATIONAL:
        head, _, tail = dotted.partition(".")
        (out[head].pop(tail, None) if tail else out.pop(head, None))
    return out


def prepare_scale(*, output: str, config: str | None = None, from_pilot: str | None = None, force: bool = False,
                  overwrite: bool = False, strict_qc: bool = False, count: int | None = None,
                  shard_size: int | None = None, seed: int | None = None, seeds: str | None = None,
                  model: str | None = None, bos_policy: str | None = None, allow_pickle: bool | None = None,
                  gpu_hour_usd: float | None = None, shard_timeout_s: float | None = None,
                  shard_retries: int | None = None) -> ScalePlan:
    """Validate everything and return the scale plan. Writes nothing, loads no model.

    Raises:
        InputError: any bad input (the CLI exits 2).
    """
    pilot = None
    if from_pilot is not None:
        clash = [f for f, v in (("--config", config), ("--model", model), ("--seeds", seeds), ("--bos-policy", bos_policy))
                 if v is not None]
        if clash:
            raise InputError(f"{', '.join(clash)} cannot be combined with --from-pilot", field=clash[0],
                             expected="the pilot's own settings (its config.yaml and final response settings)",
                             fix=f"drop {', '.join(clash)}, or drop --from-pilot and give the settings yourself")
        if count is None:
            raise InputError("--count is required with --from-pilot (the pilot's count is its sample size)",
                             field="--count", expected="the number of examples to generate, e.g. 15000",
                             fix="pass --count N")
        pilot, pilot_config, pilot_config_path = read_pilot(from_pilot, force)
    elif count is None and config is None:
        raise InputError("--count is required", field="--count", expected="the number of examples, e.g. 15000",
                         fix="pass --count N (or --config with a scale run's config.yaml)")
    over = run.build_overrides(count=count, seed=seed, seeds=seeds, model=model, bos_policy=bos_policy,
                               allow_pickle=allow_pickle)
    if gpu_hour_usd is not None:
        over["gpu_hour_usd"] = gpu_hour_usd
    cfg = load_scale_config(config=config, pilot=(pilot_config, pilot_config_path) if pilot else None, overrides=over,
                            scale_over={"shard_size": shard_size, "shard_timeout_s": shard_timeout_s,
                                        "shard_retries": shard_retries})
    config_hash = storage.sha256_text(storage.canonical_json(identity_config(cfg)))
    seeds_summary, fingerprint, identity = run.check_seeds_and_model(cfg, config_hash)
    path, state = _check_folder(output, identity, overwrite)
    sizes = shard_sizes(cfg.count, cfg.scale.shard_size)
    return ScalePlan(config=cfg, config_hash=config_hash, output=path, folder_state=state,
                     seeds=seeds_summary, model=fingerprint, identity=identity,
                     config_source=str(config) if config else None, strict_qc=strict_qc, pilot=pilot,
                     forced=bool(pilot and pilot.forced),
                     shards=[ShardSpec(index=i, seed=shard_seed(cfg.seed, i), size=n) for i, n in enumerate(sizes)])


def _check_folder(output: str, identity: RunIdentity, overwrite: bool) -> tuple[str, FolderState]:
    """The pilot's folder rules; a folder holding nothing but a lock file counts as new."""
    path = Path(output)
    if path.is_dir() and not path.is_symlink() and {p.name for p in path.iterdir()} <= {LOCK_NAME}:
        return str(path.resolve()), "new"
    return run.check_output_dir(output, identity, overwrite)


def claim(plan: ScalePlan, run_id: str) -> list[int]:
    """Claim the folder (as the pilot does) and tidy the scratch folders of shards that are done.

    Returns:
        The indices of the shards already complete (never recomputed).
    """
    run.claim_output(plan, run_id)
    done = []
    for s in plan.shards:
        if shards.valid_manifest(plan.output, plan, s.index) is not None:
            done.append(s.index)
            shutil.rmtree(shards.paths(plan.output, s.index)["work"], ignore_errors=True)
    return done


def pending_shards(plan: ScalePlan) -> list[int]:
    """The indices of the shards not yet complete on disk (read-only: nothing is created or tidied).
    A run with none pending needs no model (only the merge is left)."""
    return [s.index for s in plan.shards if shards.valid_manifest(plan.output, plan, s.index) is None]


def load_model_if_needed(plan: ScalePlan, only: int | None = None) -> dict[str, Any] | None:
    """Load and check the model (`run.load_model`, cached per process) when a shard still has to be
    computed in this process: any shard of the plan, or shard `only`. Call it before anything is
    written; returns the loaded fingerprint, or None when nothing is left to compute.

    Raises:
        InputError: the model failed its guards at load (the folder is left as it was).
    """
    pending = pending_shards(plan)
    if not pending or (only is not None and only not in pending):
        return None
    return dict(run.load_model(plan).fingerprint)


# -- one shard -------------------------------------------------------------------------------------
def compute_shard(plan: ScalePlan, index: int, run_id: str,
                  attempts: list[dict[str, Any]] | None = None) -> ShardManifest:
    """Compute shard `index` from scratch unless it is already complete; returns its manifest.

    Holds the shard's own lock, so two processes never compute the same shard at once. `attempts`
    (earlier attempts, then this one; default: this process as attempt 1) goes into the manifest.
    Raises:
        LockedError: another process is computing this shard.
    """
    out = Path(plan.output)
    p = shards.paths(out, index)
    with hold_lock(p["lock"], what=f"shard {index} in"):
        done = shards.valid_manifest(out, plan, index)
        if done is not None:
            return done
        shutil.rmtree(p["work"], ignore_errors=True)
        manifest = _compute(plan, index, run_id, p["work"], attempts or [shards.this_attempt(1)])
        shutil.rmtree(p["work"], ignore_errors=True)
        return manifest


def _compute(plan: ScalePlan, index: int, run_id: str, work: Path, attempts: list[dict[str, Any]]) -> ShardManifest:
    from stage1_core.model import loaded_fingerprint

    t0 = time.perf_counter()
    cfg, info = plan.config, plan.shards[index]
    size, prefix = info.size, f"s{index:05d}-"
    work_plan = plan.model_copy(update={"output": str(work), "config": cfg.model_copy(update={"seed": info.seed})})
    meta = RunMeta(run_id=run_id)
    kept_pool: FileRef | None = None
    unanswered: list[dict[str, Any]] = []
    pairs: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    completions: list[dict[str, Any]] = []
    counts = {"instructions_generated": 0, "instructions_kept": 0, "pairs_generated": 0, "rounds": 0, "batches": 0}
    tokens = {"instructions": 0, "responses": 0}
    critic_dev = None
    # The critic's dev-set accuracy is the same in every shard: measured once, in shard 0, unless the
    # pilot (same model, same critic settings) already measured it.
    measure_dev = index == 0 and cfg.scale.measure_critic_dev and not (plan.pilot and plan.pilot.critic_dev)
    while len(pairs) < size:
        if not unanswered:
            if counts["rounds"] >= cfg.scale.max_rounds_per_shard:
                break
            counts["rounds"] += 1
            rnd = counts["rounds"]
            g = pipeline.run_phase(run.make_call(work_plan, "generate_instructions", meta=meta, round=rnd,
                                                 inputs=run.instruction_inputs(cfg.instruction_generation, kept_pool)))
            f = pipeline.run_phase(run.make_call(work_plan, "filter_instructions", meta=meta, round=rnd, inputs={
                "generated": g.outputs["generated"], "kept_before": kept_pool}))
            kept_pool = f.outputs["kept"]
            unanswered = jsonl.read_rows(kept_pool.path)[counts["instructions_kept"]:]
            counts["instructions_kept"] = f.kept_total
            counts["instructions_generated"] += g.generated
            tokens["instructions"] += g.tokens
            rejected += jsonl.read_rows(f.outputs["rejected"].path)
            continue
        counts["batches"] += 1
        batch = counts["batches"]
        todo, unanswered = unanswered[: size - len(pairs)], unanswered[size - len(pairs):]
        todo_path = work / "iterations" / f"{batch:02d}" / "todo.jsonl"
        storage.write_jsonl_atomic(todo_path, todo)
        batch_plan = work_plan.model_copy(update={"config": work_plan.config.model_copy(update={"count": len(todo)})})
        r = pipeline.run_phase(run.make_call(batch_plan, "generate_responses", meta=meta, iteration=batch,
                                             inputs={"kept": FileRef.of(todo_path, len(todo))}))
        pf = pipeline.run_phase(run.make_call(batch_plan, "filter_pairs", meta=meta, iteration=batch,
                                              inputs={"responses": r.outputs["responses"]},
                                              measure_dev=measure_dev and batch == 1))
        critic_dev = critic_dev or pf.critic_dev
        responses = jsonl.read_rows(r.outputs["responses"].path)
        counts["pairs_generated"] += len(responses)
        tokens["responses"] += r.tokens
        completions += [{"id": x["id"], "raw": x["raw"], "stop_reason": x["stop_reason"],
                         "completion_tokens": x["completion_tokens"]} for x in responses]
        pairs += jsonl.read_rows(pf.outputs["kept"].path)
        rejected += jsonl.read_rows(pf.outputs["rejected"].path)
    rejected += [{"phase": "instruction_filter", "id": k["id"], "instruction": k["instruction"],
                  "reason": "surplus_over_count"} for k in unanswered]
    base = {"run_id": run_id, "git_sha": provenance.git_info(run.REPO_DIR)["sha"], "config_hash": plan.config_hash,
            "model": {"id": plan.model.id, "weights_sha256": plan.model.weights_sha256},
            "seed": cfg.seed, "shard": index, "shard_seed": info.seed,
            "generation": run.generation_record(cfg.instruction_generation, cfg.response_generation)}
    rows = [pipeline.data_row({**x, "id": prefix + x["id"]}, base) for x in pairs]
    for x in (*rejected, *completions):
        x["id"] = prefix + x["id"]
    seconds = round(time.perf_counter() - t0, 3)
    device = str((loaded_fingerprint(cfg.model.model_dump(mode="json")) or {}).get("device", "cpu"))
    info_out = ShardManifest(**shards.expected(plan, index), run_id=run_id, created=provenance.utc_now(),
                             rows=len(rows), seconds=seconds, device=device,
                             gpu_seconds=seconds if device.startswith("cuda") else 0.0,
                             examples_per_s=round(len(rows) / seconds, 3) if seconds > 0 else None,
                             tokens={**tokens, "total": tokens["instructions"] + tokens["responses"]},
                             counts={**counts, "pairs_kept": len(rows), "rejected": len(rejected)},
                             rejected_by_reason=pipeline.count_reasons(rejected), critic_dev=critic_dev,
                             attempts=attempts)
    return shards.write(plan.output, index, rows, rejected, completions, info_out)


def shard_log_line(s: ShardManifest, done: int, total: int, computed: bool) -> str:
    """One log line per shard: rows, seconds and examples/s (or that it was already complete)."""
    if not computed:
        return f"shard {s.shard:05d} ({done}/{total}): already complete, {s.rows} rows (computed by run {s.run_id[:8]})"
    rate = f"{s.examples_per_s:.2f} examples/s" if s.examples_per_s is not None else "n/a examples/s"
    return (f"shard {s.shard:05d} ({done}/{total}): {s.rows}/{s.size} rows in {s.seconds:.1f} s "
            f"({rate}, {s.tokens.total} tokens, device {s.device})")


# -- estimates -------------------------------------------------------------------------------------
def estimate(plan: ScalePlan) -> dict[str, Any]:
    """Expected tokens, GPU-seconds and cost of the whole run (the dry-run plan).

    Per kept pair: the pilot's measured tokens and GPU-seconds when scaling from a pilot that has
    them, else the pilot dry run's assumptions with every completion at its token limit and
    `scale.tokens_per_gpu_second`.
    """
    cfg, sc = plan.config, plan.config.scale
    measured = plan.pilot.measured if plan.pilot else PilotMeasured()
    pairs = measured.pairs_kept or 0
    if pairs and measured.tokens_total:
        per_pair, basis = measured.tokens_total / pairs, f"measured in the pilot ({pairs} kept pairs)"
    else:
        ig, rg = cfg.instruction_generation, cfg.response_generation
        per_instruction = ig.max_new_tokens / (ITEMS_PER_LIST * INSTRUCTION_ACCEPTANCE)
        per_pair = (per_instruction + rg.max_new_tokens) / PAIR_ACCEPTANCE
        basis = (f"assumed: {ITEMS_PER_LIST} instructions per list, {INSTRUCTION_ACCEPTANCE:.0%} kept, "
                 f"{PAIR_ACCEPTANCE:.0%} of pairs kept, completions at their token limit")
    tokens = math.ceil(cfg.count * per_pair)
    if pairs and measured.gpu_seconds:
        gpu_s, gbasis = cfg.count * measured.gpu_seconds / pairs, "the pilot's measured GPU-seconds per kept pair"
    else:
        gpu_s, gbasis = tokens / sc.tokens_per_gpu_second, f"{sc.tokens_per_gpu_second:g} tokens per GPU-second"
    price = cfg.gpu_hour_usd
    return {"tokens": tokens, "tokens_per_pair": round(per_pair, 1), "tokens_basis": basis,
            "gpu_seconds": round(gpu_s, 1), "gpu_seconds_basis": gbasis, "gpu_hour_usd": price,
            "cost_usd": round(gpu_s / 3600 * price, 2) if price is not None else None}


def dry_run_text(plan: ScalePlan) -> str:
    """The plan printed by --dry-run: shards, expected tokens, GPU time and cost."""
    cfg, sc, sh = plan.config, plan.config.scale, plan.shards
    est = estimate(plan)
    done = [s.index for s in sh if shards.valid_manifest(plan.output, plan, s.index) is not None] \
        if plan.folder_state == "resume" else []
    source = (f"pilot {plan.pilot.path} (gate {plan.pilot.decision['decision']}"
              f"{', forced' if plan.forced else ''})") if plan.pilot else (plan.config_source or "configs/pilot.yaml")
    listed = sh if len(sh) <= 6 else [*sh[:3], None, *sh[-2:]]
    lines = [
        "stage1 scale — dry run (nothing loaded, nothing written)",
        f"  output:    {plan.output} ({plan.folder_state})",
        f"  model:     {plan.model.id} (weights sha256 {plan.model.weights_sha256[:16]}…)",
        f"  seeds:     {plan.seeds.path} ({plan.seeds.count} seeds, {plan.seeds.usable} usable)",
        f"  settings:  {source}",
        f"  count:     {cfg.count} examples in {len(sh)} shards of {sc.shard_size} (last {sh[-1].size}), "
        f"run seed {cfg.seed}",
        f"  done:      {len(done)} of {len(sh)} shards complete" + (" (they are not recomputed)" if done else ""),
        "  shards:",
        *[f"    {shards.stem(s.index)}  seed {s.seed:>10}  {s.size} examples"
          + ("  done" if s.index in done else "") if s else "    …" for s in listed],
        f"  tokens:    ≈ {est['tokens']:,} generated ({est['tokens_per_pair']} per kept pair; {est['tokens_basis']})",
        f"  GPU time:  ≈ {est['gpu_seconds'] / 3600:.2f} GPU-hours ({est['gpu_seconds_basis']})",
        "  cost:      " + (f"≈ ${est['cost_usd']:,.2f} at ${est['gpu_hour_usd']:g}/GPU-hour" if est["cost_usd"] is not None
                           else "set --gpu-hour-usd (or gpu_hour_usd in the config) for a cost estimate"),
        "  merge:     MinHash-LSH candidates confirmed by ROUGE-L ≥ "
        f"{cfg.instruction_filter.rouge_threshold} across shards; keeps the lowest (shard, row)",
    ]
    return "\n".join(lines)


# -- scheduled runs ------------------------------------------------------------------------------
def seed_from_time(t: datetime) -> int:
    """A scheduled run's seed: its scheduled start as whole seconds since the epoch (UTC)."""
    return int(t.timestamp())


def collect_manifests(plan: ScalePlan) -> list[ShardManifest]:
    """The valid manifest of every shard, in shard order (checked on disk, whatever ran them).

    Raises:
        RuntimeError: some shards are not complete (names them; rerunning the command resumes).
    """
    found = [shards.valid_manifest(plan.output, plan, s.index) for s in plan.shards]
    missing = [s.index for s, m in zip(plan.shards, found) if m is None]
    if missing:
        names = ", ".join(shards.stem(i) for i in missing[:10]) + (" …" if len(missing) > 10 else "")
        raise RuntimeError(f"{len(missing)} of {len(found)} shards are not complete ({names}); rerun the same "
                           "command to resume: complete shards are kept, the others are redone")
    return [m for m in found if m is not None]
