"""A pilot run's plan and folder: validation before anything runs, the run identity and the
output-folder rules, per-phase calls, iteration settings, and the final files.

`prepare_pilot(...)` validates config, seeds, model and output folder and returns the typed plan
(`plans.PilotPlan`) without writing anything (InputError on bad input, so the CLI exits 2 with nothing written).
`load_model(plan)` loads and checks the model (guards, sentinels) before `claim_output(plan)`
creates/claims the folder, so a model that fails its guards leaves the folder as it was;
`finalize(...)` writes the top-level files.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from collections.abc import Mapping
from typing import Any

from stage1_core.phases import approval as approval_mod
from stage1_core.phases import qc
from stage1_core.infra import provenance, storage
from stage1_core.model import Backend
from stage1_core.infra.config import (InstructionGenerationConfig, PilotConfig, ResponseGenerationConfig,
                                load_pilot_config)
from stage1_core.phases.critic import rubric_variants
from stage1_core.infra.errors import InputError, ModelGuardError
from stage1_core.infra.locks import LOCK_NAME
from stage1_core.phases.options import CONFIG_FLAGS, LOCAL_OUTPUT, PilotOptions
from stage1_core.phases.plans import (CALLS, FileRef, FolderState, GenerationRecord, IterationRecord, ModelRecord,
                                      JsonObject, PhaseCall, PhaseManifest, PilotPlan, QCManifest, Record,
                                      RunIdentity, RunMeta, SeedsSummary)
from stage1_core.phases.seeds import load_seeds, require_usable

RUN_MARKER = ".stage1_run.json"
FINAL_FILES = ("pilot_data.jsonl", "rejected.jsonl", "qc_summary.json")
OVERWRITE_REMOVES = (*FINAL_FILES, "session_manifest.json", "suggested_config.yaml")
"""The top-level files of a finished pilot that `--overwrite` deletes when it claims the folder."""
EXIT_CODES = {"scale": 0, "iterate": 3, "halt": 4}
REPO_DIR = Path(__file__).resolve().parents[2]
# CPU rates measured on 2 cores with the embedded model by bench/pilot_cpu.py, copied from its JSON
# (bench/results/pilot_cpu-2026-12-02.json: generation_tokens_per_second, critic_prompts_per_second;
# a test keeps them equal to the newest bench result). --dry-run estimates from them.
CPU_SAMPLED_TOK_S = 42.7
CPU_CRITIC_PROMPTS_S = 9.6


def build_overrides(**given: Any) -> dict[str, Any]:
    """Pilot options (count, seed, seeds, model, max_iterations, bos_policy, allow_pickle; None = not
    given) as a config overlay (`PilotOptions.config_overrides`)."""
    return PilotOptions.model_construct(**given).config_overrides()


def check_output_dir(output: str | Path, identity: Record, overwrite: bool) -> tuple[str, FolderState]:
    """Apply the folder rules; nothing is created or deleted here.

    Args:
        identity: the run identity (a pilot's or scale run's `RunIdentity`, an SFT or eval run's own).

    Returns:
        (absolute path, "new" | "resume" | "overwrite").
    Raises:
        InputError: the path is a file, a symlink out of the tree, a foreign non-empty folder, or a
            folder of another run identity (without overwrite).
    """
    path = Path(output)
    if path.is_symlink():
        target = path.resolve()
        tree = Path.cwd().resolve()
        if tree != target and tree not in target.parents:
            raise InputError(f"output path is a symlink that points out of the tree (to {target})", file=str(path),
                             field="--output", expected="a folder inside the working tree",
                             fix="pass the real folder path, or choose another --output")
    if path.exists() and not path.is_dir():
        raise InputError("output path exists and is not a folder", file=str(path), field="--output",
                         expected="a folder (new or made by an earlier stage1 run)", fix="choose another --output")
    abspath = str(path.resolve())
    if not path.exists():
        return abspath, "new"
    marker = path / RUN_MARKER
    if marker.is_file():
        try:
            previous = storage.read_json(marker)
        except (OSError, ValueError):
            previous = {}
        mine = identity.model_dump()
        if previous.get("identity") == mine:
            return abspath, "resume"
        if overwrite:
            return abspath, "overwrite"
        changed = sorted(k for k in mine if (previous.get("identity") or {}).get(k) != mine[k])
        raise InputError(f"output folder belongs to another run (different {', '.join(changed) or 'identity'})",
                         file=str(marker), field="--output", expected="the same config, seeds and model as that run",
                         fix="pass --overwrite to replace it, or choose another --output")
    if any(p.name != LOCK_NAME for p in path.iterdir()):  # a lock file alone: a run died before its claim
        if overwrite:
            return abspath, "overwrite"
        raise InputError("output folder is not empty and was not made by stage1", file=str(path), field="--output",
                         expected=f"an empty folder or one holding {RUN_MARKER}",
                         fix="choose another --output, or pass --overwrite to write into it anyway")
    return abspath, "new"


def prepare_pilot(opts: PilotOptions) -> PilotPlan:
    """Validate everything and return the run plan. Writes nothing, loads no model.

    Args:
        opts: the run's options (`output` set); those that override config keys are laid over the
            config (`PilotOptions.config_overrides`).
    Raises:
        InputError: any bad input.
    """
    output, config = opts.output or LOCAL_OUTPUT, opts.config
    cfg = load_pilot_config(config, opts.config_overrides(), flags=CONFIG_FLAGS)
    config_hash = storage.sha256_text(storage.canonical_json(cfg.model_dump(mode="json")))
    seeds, model, identity = check_seeds_and_model(cfg, config_hash)
    path, state = check_output_dir(output, identity, opts.overwrite)
    return PilotPlan(config=cfg, config_hash=config_hash, output=path, folder_state=state, seeds=seeds, model=model,
                     identity=identity, config_source=str(config) if config else None)


def check_seeds_and_model(cfg: PilotConfig, config_hash: str) -> tuple[SeedsSummary, ModelRecord, RunIdentity]:
    """A pilot or scale config's seed file (usable for its few-shot lists) and model (resolved and
    fingerprinted, not loaded), and the run identity they make with the config's hash.

    Raises:
        InputError: a bad seed file, too few usable seeds, or a model that does not resolve.
    """
    from stage1_core.model import model_fingerprint, resolve_model

    seedset = load_seeds(cfg.seeds_path)
    require_usable(seedset, cfg.instruction_generation.few_shot_k)
    resolve_model(cfg.model)
    model = ModelRecord.model_validate(model_fingerprint(cfg.model))
    identity = RunIdentity(config_sha256=config_hash, seeds_sha256=seedset.sha256, model_weights_sha256=model.weights_sha256)
    return SeedsSummary.model_validate(seedset.summary()), model, identity


GUARD_FIX_TRANSFORMERS = "5.24"
"""The transformers release from which Gemma 3 GGUF files load correctly (older ones misread them)."""


def load_model(plan: PilotPlan) -> Backend:
    """Load the plan's model and run its guards and sentinels, before anything is written.

    Loading is cached per process (`stage1_core.model.load_backend`), so the phases that follow in
    this process reuse the backend loaded here.

    Args:
        plan: a pilot or scale plan.
    Returns:
        The loaded backend.
    Raises:
        InputError: the model failed a guard or sentinel at load (ModelGuardError, turned into an
            error block naming what to check), or the loader found bad input (e.g. the model does not
            fit in memory), raised as it is. Either way the CLI exits 2 and the folder is untouched.
    """
    from stage1_core.model import load_backend

    try:
        return load_backend(plan.config.model)
    except ModelGuardError as e:
        raise guard_error(e, getattr(plan.model, "path", None)) from None


def guard_error(e: ModelGuardError, path: str | None) -> InputError:
    """A guard or sentinel failure at load as bad input: the error block names what to check."""
    return InputError(f"the model failed its guards at load: {e}", file=path, field="model.id (--model)",
                      expected="a base model that loads in completion mode and passes its sentinels",
                      fix=f"check (1) transformers >= {GUARD_FIX_TRANSFORMERS} is installed (older releases misread "
                          f"Gemma 3 GGUF files; installed: {_installed('transformers')}), (2) the model files "
                          "(complete, uncorrupted, tokenizer matching the weights, the intended revision), "
                          "(3) --bos-policy (try always or never; auto follows the per-family table)")


def _installed(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def claim_output(plan: PilotPlan, run_id: str) -> None:
    """Create the output folder and record the run identity. An overwrite re-claims the folder:
    phase files stay (their cache keys are content hashes, so only what changed reruns); the earlier
    run's final files (`OVERWRITE_REMOVES`) are deleted before the new identity is written, so a crash
    before this run finishes never leaves a folder that mixes two runs. Nothing of the user's is
    ever deleted: only a folder holding a stage1 run marker is cleaned. Call it holding the folder's
    lock (`locks.hold_lock`): it removes temp files a writer of this folder may own."""
    out = Path(plan.output)
    ours = (out / RUN_MARKER).is_file()
    out.mkdir(parents=True, exist_ok=True)
    if ours:  # only files of an earlier stage1 run of this folder are cleaned up
        remove_stale_temp_files(out)  # a resume keeps suggested_config.yaml until finalize decides
        if plan.folder_state == "overwrite":
            for name in OVERWRITE_REMOVES:
                (out / name).unlink(missing_ok=True)
    storage.write_json_atomic(out / RUN_MARKER, {"identity": plan.identity.model_dump(), "run_id": run_id,
                                                 "created": provenance.utc_now()})
    storage.write_yaml_atomic(out / "config.yaml", plan.config.model_dump(mode="json"))


def remove_stale_temp_files(out: Path) -> list[Path]:
    """Delete temp files a killed writer left (`NAME.tmp-<pid>`, see storage); returns them."""
    stale = [p for p in out.rglob("*.tmp-*") if re.fullmatch(r".+\.tmp-\d+", p.name) and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def instructions_dir(out: str | Path, since: int = 1) -> Path:
    """Where the instruction rounds of a pilot live: `instructions/` for the config's settings; the
    rounds of settings the iterate step changed before iteration `since` in `iterations/NN/instructions/`."""
    return Path(out) / "instructions" if since == 1 else Path(out) / "iterations" / f"{since:02d}" / "instructions"


def make_call(plan: PilotPlan, phase: str, *, meta: RunMeta, iteration: int | None = None,
              round: int | None = None, inputs: Mapping[str, FileRef | list[FileRef] | None] | None = None,
              response_generation: ResponseGenerationConfig | None = None,
              instruction_generation: InstructionGenerationConfig | None = None, instructions_since: int = 1,
              critic_dev: JsonObject | None = None, measure_dev: bool = True) -> PhaseCall:
    """The call of one phase: only the config slice it depends on goes into its params.

    `response_generation` / `instruction_generation` are an iteration's settings (default: the
    config's); `instructions_since` is the iteration whose settings the instruction rounds use
    (`instructions_dir`); `critic_dev` is the dev-set measurement qc reports, `measure_dev` whether
    filter_pairs takes it.

    Raises:
        ValueError: an unknown phase, or inputs that are not the phase's.
    """
    if phase not in CALLS:
        raise ValueError(f"unknown phase {phase!r}")
    cfg, out = plan.config, Path(plan.output)
    rg = response_generation or cfg.response_generation
    ig = instruction_generation or cfg.instruction_generation
    since = instructions_since if instructions_since > 1 else None  # names the rerun's rounds apart from the first ones
    params: dict[str, object]
    if phase == "generate_instructions":
        params = {"instruction_generation": ig, "seeds_path": cfg.seeds_path, "seeds_sha256": plan.seeds.sha256,
                  "seed": cfg.seed, "round": round, "instructions_since": since}
        out_dir = instructions_dir(out, instructions_since)
    elif phase == "filter_instructions":
        params = {"instruction_filter": cfg.instruction_filter, "critic": cfg.critic, "seeds_path": cfg.seeds_path,
                  "seeds_sha256": plan.seeds.sha256, "round": round, "instructions_since": since}
        out_dir = instructions_dir(out, instructions_since)
    elif phase == "generate_responses":
        params = {"response_generation": rg, "count": cfg.count, "seed": cfg.seed, "iteration": iteration}
        out_dir = out / "iterations" / f"{iteration:02d}"
    elif phase == "filter_pairs":
        params = {"critic": cfg.critic, "iteration": iteration, "measure_dev": measure_dev}
        out_dir = out / "iterations" / f"{iteration:02d}"
    else:
        params = {"qc": cfg.qc, "count": cfg.count, "seed": cfg.seed, "iteration": iteration,
                  "max_iterations": cfg.max_iterations, "model_id": plan.model.id,
                  "model_sha": plan.model.weights_sha256, "generation": GenerationRecord.of(ig, rg),
                  "critic_dev": critic_dev}
        out_dir = out / "iterations" / f"{iteration:02d}"
    return CALLS[phase].model_validate({"out_dir": str(out_dir), "params": params, "inputs": dict(inputs or {}),
                                        "model": cfg.model, "model_sha": plan.model.weights_sha256, "meta": meta})


def instruction_inputs(ig: InstructionGenerationConfig, kept: FileRef | None) -> dict[str, FileRef]:
    """Phase 1's inputs: the kept pool of the rounds so far when prompts mix in machine instructions
    (`ig.machine_examples` > 0; the pool then enters the cache key), else none."""
    return {"kept_before": kept} if ig.machine_examples and kept else {}


def generation_record(instruction: InstructionGenerationConfig, response: ResponseGenerationConfig) -> dict[str, Any]:
    """The sampling settings of both generation phases, as the data rows' provenance records them."""
    return GenerationRecord.of(instruction, response).model_dump(mode="json")


def next_settings(ig: InstructionGenerationConfig, rg: ResponseGenerationConfig, qc_manifest: QCManifest,
                  ) -> tuple[InstructionGenerationConfig, ResponseGenerationConfig, list[str]]:
    """Apply the adjustment tables (`qc.adjust`) after an `iterate` decision.

    Returns:
        (new instruction settings, new response settings, human-readable changes). Nothing changes
        when the only miss is "sample too small" or every setting is at its bound: a rerun would
        repeat the same iteration, so the flow stops and the run ends in halt. A changed instruction
        setting reruns phases 1-5, a changed response setting alone phases 3-5.
    """
    summary = qc_manifest.summary
    new_ig, new_rg, changes = qc.adjust(ig, rg, qc_manifest.decision.failed, summary.get("rejected_by_reason", {}),
                                        summary.get("observed_delimiters", []))
    return new_ig, new_rg, changes


def finalize(plan: PilotPlan, *, run_id: str, started: str, iterations: list[IterationRecord],
             phase_manifests: list[PhaseManifest], flow_seconds: float | None = None,
             approval: dict[str, Any] | None = None) -> dict[str, Any]:
    """Copy the last iteration's files to the top level, write session_manifest.json (and
    suggested_config.yaml when the decision is iterate). Returns the run result."""
    out, cfg = Path(plan.output), plan.config
    last = iterations[-1]
    last_dir = Path(last.qc.outputs["qc_summary"].path).parent
    for name in FINAL_FILES:
        storage.write_text_atomic(out / name, (last_dir / name).read_text(encoding="utf-8"))
    gate = last.qc.decision.model_dump()
    stuck = any(c.startswith(qc.NO_ADJUSTMENT) for c in last.changes)
    if gate["decision"] == "iterate" and (cfg.max_iterations > 0 or stuck):
        # Reruns were allowed but the adjustment table had nothing left to change, or (no reruns
        # allowed) there is nothing to suggest: either way no setting fixes this run.
        gate = {**gate, "decision": "halt", "reasons": [*gate["reasons"], _no_adjustment_reason(last.changes)]}
    final = approval_mod.apply_to_gate(gate, approval)
    if final != last.qc.decision.model_dump() or approval is not None:
        gate = final
        summary = storage.read_json(out / "qc_summary.json")
        summary["gate"] = gate
        summary["approval"] = approval
        storage.write_json_atomic(out / "qc_summary.json", summary)
    decision = gate["decision"]
    dumped = cfg.model_dump(mode="json")
    if decision == "iterate":
        # an iterate that reaches here came with the adjustment table's next settings (the flow sets them)
        assert last.next_settings is not None and last.next_instruction_settings is not None
        suggested = dict(dumped, instruction_generation=last.next_instruction_settings.model_dump(mode="json"),
                         response_generation=last.next_settings.model_dump(mode="json"))
        storage.write_yaml_atomic(out / "suggested_config.yaml", suggested)
    else:  # an earlier run's suggestion no longer applies (removed only now: a failed rerun keeps it)
        (out / "suggested_config.yaml").unlink(missing_ok=True)
    storage.write_yaml_atomic(out / "config.yaml", dumped)
    tokens = {"instructions": 0, "responses": 0}
    timings: dict[str, float] = {}
    cached: list[str] = []
    compute = 0.0
    for m in phase_manifests:
        name = m.label()
        timings[name] = m.seconds
        if m.run_id != run_id:
            cached.append(name)
        else:
            compute += m.seconds
        if m.phase == "generate_instructions":
            tokens["instructions"] += getattr(m, "tokens", 0)
        elif m.phase == "generate_responses":
            tokens["responses"] += getattr(m, "tokens", 0)
    artifacts = [storage.file_manifest(out / n) for n in (*FINAL_FILES, "config.yaml")]
    from stage1_core.model import loaded_fingerprint

    model_info = {**plan.model.model_dump(), **(loaded_fingerprint(dumped["model"]) or {})}
    on_gpu = str(model_info.get("device", "")).startswith("cuda")
    gpu_seconds = round(compute, 3) if on_gpu else 0.0
    price = cfg.gpu_hour_usd
    manifest = {
        "run_id": run_id, "started": started, "finished": provenance.utc_now(),
        "decision": gate, "exit_code": EXIT_CODES[decision],
        "seeds": plan.seeds.model_dump(), "model": model_info, "identity": plan.identity.model_dump(),
        "config_hash": plan.config_hash, "environment": provenance.environment_info(),
        "git": provenance.git_info(REPO_DIR),
        "timings": {"phases": timings, "phase_compute_seconds": round(compute, 3), "flow_seconds": flow_seconds,
                    "cached_phases": cached, "note": "phase_compute_seconds counts phases computed in this run"},
        "tokens": {**tokens, "total": tokens["instructions"] + tokens["responses"]},
        "gpu_seconds": gpu_seconds,
        "gpu_hour_usd": price,
        "estimated_cost_usd": round(gpu_seconds / 3600 * price, 4) if price is not None else None,
        "iterations": [{"iteration": i + 1, "dir": str(Path(it.qc.outputs["qc_summary"].path).parent),
                        "decision": it.qc.decision.model_dump(),
                        "instruction_generation": it.instruction_settings.model_dump(mode="json"),
                        "instructions_dir": it.instructions_dir,
                        "response_generation": it.settings.model_dump(mode="json"),
                        "changes_for_next": it.changes} for i, it in enumerate(iterations)],
        "artifacts": artifacts,
        "approval": approval,
    }
    storage.write_json_atomic(out / "session_manifest.json", manifest)
    return {"decision": decision, "reasons": gate["reasons"], "exit_code": EXIT_CODES[decision],
            "output": str(out), "kept": last.qc.outputs["pilot_data"].rows, "run_id": run_id,
            "approval": approval}


def _no_adjustment_reason(changes: list[str]) -> str:
    text = "; ".join(changes)
    return text if text.startswith("no further adjustment possible") else f"no further adjustment possible: {text}"


def dry_run_text(plan: PilotPlan) -> str:
    """The plan printed by --dry-run: phases, prompts per phase, estimated tokens and CPU time."""
    cfg, model, seeds = plan.config, plan.model, plan.seeds
    ig, rg, cr = cfg.instruction_generation, cfg.response_generation, cfg.critic
    # ~4 parsed items per list prompt, ~half survive filtering (measured on the embedded model).
    est_generated = math.ceil(cfg.count / 0.5)
    rounds = min(ig.max_instruction_rounds, max(1, math.ceil(est_generated / (ig.prompts_per_round * 4))))
    p1 = rounds * ig.prompts_per_round
    t1 = p1 * ig.max_new_tokens
    p2 = est_generated * len(rubric_variants(cr, "instruction"))
    t3 = cfg.count * rg.max_new_tokens
    p4 = cfg.count * len(rubric_variants(cr, "pair"))
    iters = cfg.max_iterations + 1
    sec = t1 / CPU_SAMPLED_TOK_S + p2 / CPU_CRITIC_PROMPTS_S + iters * (t3 / CPU_SAMPLED_TOK_S + p4 / CPU_CRITIC_PROMPTS_S)
    lines = [
        "stage1 pilot — dry run (nothing loaded, nothing written)",
        f"  output:   {plan.output} ({plan.folder_state})",
        f"  model:    {model.id} (weights sha256 {model.weights_sha256[:16]}…, "
        f"bos {getattr(model, 'bos_policy', 'n/a')}, dtype {getattr(model, 'dtype', 'n/a')})",
        f"  seeds:    {seeds.path} ({seeds.format}, {seeds.count} seeds, {seeds.usable} usable)",
        f"  count:    {cfg.count} candidate pairs, seed {cfg.seed}, up to {cfg.max_iterations} reruns",
        "  phases:",
        f"    1 generate_instructions  up to {ig.max_instruction_rounds} rounds × {ig.prompts_per_round} prompts "
        f"(est. {rounds} rounds, {p1} prompts, ≤ {t1} tokens)",
        f"    2 filter_instructions    heuristics, ROUGE-L ≥ {cfg.instruction_filter.rouge_threshold}, critic "
        f"(est. {p2} critic prompts)",
        f"    3 generate_responses     {cfg.count} prompts, {rg.n_examples} worked examples, ≤ {t3} tokens",
        f"    4 filter_pairs           {p4} critic prompts",
        "    5 qc                     metrics + gate",
        f"  estimate: ≤ {t1 + iters * t3} tokens, about {sec / 60:.1f} min on a 2-core CPU in the worst case",
    ]
    return "\n".join(lines)


def read_summary(output: str | Path) -> dict[str, Any]:
    return storage.read_json(Path(output) / "qc_summary.json")


def interrupted_text(output: str | Path) -> str:
    """What an interrupted run kept: completed phase files are whole (atomic writes) and reused."""
    out = Path(output)
    if (out / RUN_MARKER).is_file():
        remove_stale_temp_files(out)
    kept = sorted(str(p.relative_to(out)) for p in out.rglob("*.jsonl")) if out.exists() else []
    lines = ["interrupted: no final file was half-written."]
    if kept:
        lines.append(f"kept {len(kept)} completed phase files in {out} (reused when you rerun the same command):")
        lines += [f"  {k}" for k in kept[:20]]
    else:
        lines.append("nothing was completed yet.")
    return "\n".join(lines)
