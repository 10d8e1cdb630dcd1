"""The pilot flow: five phases, the QC gate, iterate, and (optionally) approval and the hand-off
to the scale deployment.

Run locally (no server needed; an ephemeral Prefect server starts for the run):
    python -m flows.pilot --count 100 --output artifacts/pilot --seed 42
Under a deployment: `prefect deployment run stage1/pilot --param count=100` (deployments/prefect.yaml,
docs/deploy.md). Exit codes: 0 scale, 3 iterate (only with --max-iterations 0), 4 halt, 2 invalid
input (nothing written), 5 output folder locked by another run, 1 unexpected error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from pydantic import ValidationError

from flows import runtime
from stage1_core.infra import settings
from stage1_core.infra.config import load_pilot_config
from stage1_core.phases import approval, options, reports, run
from stage1_core.phases.options import LOCAL_OUTPUT, PilotOptions
from stage1_core.infra.config import InstructionGenerationConfig
from stage1_core.phases.plans import FileRef, IterationRecord, PhaseManifest, PilotPlan, RunMeta
from stage1_core.infra import provenance, storage
from stage1_core.infra.errors import InputError
from stage1_core.infra.locks import LOCK_NAME, hold_lock
from tasks import phases as t

APPROVAL_REQUEST = ".approval_request.json"


def _run_name() -> str:
    """`pilot-{count}-seed{seed}` (the config's values when not given); under a deployment with the run
    id's first 8 characters added, because the name is the run's output folder there and two runs must
    not share one."""
    from prefect.runtime import deployment, flow_run

    p = flow_run.parameters
    count, seed = p.get("count"), p.get("seed")
    if count is None or seed is None:
        try:
            cfg = load_pilot_config(p.get("config"))
            count, seed = count if count is not None else cfg.count, seed if seed is not None else cfg.seed
        except InputError:  # the flow reports it; the name only needs to be a name
            pass
    name = f"pilot-{count}-seed{seed}"
    return f"{name}-{str(flow_run.id)[:8]}" if deployment.id else name


def _pilot(**params: Any) -> dict[str, Any]:
    opts = PilotOptions.model_construct(**params)  # validated at the flow's edge against the same declaration
    steps = check_chain(opts.then, opts.sft_config, opts.eval_config)
    t0, started, run_id = time.perf_counter(), provenance.utc_now(), provenance.run_id()
    deployment = runtime.deployment_name()
    if opts.require_approval and deployment is None and not sys.stdin.isatty():
        raise InputError("require_approval needs a terminal to ask on (stdin is not a terminal)",
                         field="require_approval", expected="an interactive terminal, or a run of the stage1/pilot deployment",
                         fix="run it in a terminal, under the deployment (the run suspends for approval), or without it")
    opts = opts.model_copy(update={"output": runtime.run_output(opts.output, LOCAL_OUTPUT, opts.run_key)})
    plan = t.prepare_run(opts)
    t.load_model(plan)  # guards and sentinels first: a model that fails them leaves the folder as it was
    with hold_lock(Path(plan.output) / LOCK_NAME):  # a second run on this folder exits 5, touching nothing
        result = _run_locked(plan, run_id=run_id, started=started, t0=t0,
                             deployment=deployment, require_approval=opts.require_approval,
                             approval_timeout_s=opts.approval_timeout_s)
    runtime.add_tags(f"gate:{result['decision']}")
    result["scale_run"] = hand_off(result, opts.scale_count, deployment)
    result["chain"] = run_chain(result, steps, opts.sft_config, opts.eval_config)
    return result


pilot = runtime.options_flow(_pilot, PilotOptions, "Stage 1 pilot: generate and filter instructions, generate and "
                             "filter responses, QC + gate.", name="pilot", run_name=_run_name)


THEN_STEPS = ("sft", "sft,eval")


def parse_then(value: str | None) -> list[str]:
    """The chained flows of `--then`: [] (none), ["sft"] or ["sft", "eval"] (eval needs the adapter sft writes).

    Raises:
        InputError: any other value.
    """
    if value is None or not value.strip():
        return []
    steps = [s.strip() for s in value.split(",")]
    if ",".join(steps) not in THEN_STEPS:
        raise InputError(f"--then {value!r} is not a chain this pilot can run", field="then",
                         expected="sft, or sft,eval (eval evaluates the adapter that sft trains)",
                         fix="pass --then sft,eval")
    return steps


def check_chain(then: str | None, sft_config: str | None, eval_config: str | None) -> list[str]:
    """parse_then, and the chained flows' configs validated before the pilot starts (a bad SFT config
    must not surface after the pilot's minutes of generation)."""
    from stage1_core.train import evaluation, sft

    steps = parse_then(then)
    if "sft" in steps:
        sft.load_sft_config(sft_config)
    if "eval" in steps:
        evaluation.load_eval_config(eval_config)
    return steps


def run_chain(result: dict[str, Any], steps: list[str], sft_config: str | None,
              eval_config: str | None) -> dict[str, Any] | None:
    """Run the chained flows of `--then` when the final decision is scale: flows.sft into
    `{output}-sft`, then flows.eval into `{output}-eval` (subflows of this run, on its worker). Any
    other decision stops the chain; the reason is printed and returned. The chain's outcome is
    recorded in session_manifest.json under `chain`."""
    if not steps:
        return None
    out = Path(result["output"])
    if result["decision"] != "scale":
        reasons = "; ".join(str(r) for r in result.get("reasons") or [])
        chain: dict[str, Any] = {"steps": steps, "stopped": f"the gate said {result['decision']}"
                                 + (f" ({reasons})" if reasons else "") + f": {', '.join(steps)} not run"}
        print(f"--then {','.join(steps)}: {chain['stopped']}")
    else:
        from flows.eval import eval_flow
        from flows.sft import sft_flow

        trained = sft_flow(data=str(out), output=str(out.with_name(out.name + "-sft")), config=sft_config)
        s = trained["summary"]
        chain = {"steps": steps, "sft": {"output": trained["output"], "steps": s["steps"], "train_loss": s["train_loss"],
                                         "eval_loss": s["eval_loss"]}}
        print(f"--then: adapter in {trained['output']} (train loss {s['train_loss']:.4f}, eval loss {s['eval_loss']:.4f})")
        if "eval" in steps:
            from stage1_core.train import eval_report

            ev = eval_flow(adapter=trained["output"], output=str(out.with_name(out.name + "-eval")), config=eval_config)
            r = ev["report"]
            chain["eval"] = {"output": ev["output"], "stop_rate": {"base": r["base"]["stop_rate"],
                                                                   "tuned": r["tuned"]["stop_rate"]},
                             "win_rate": r["win_rate"]["tuned_over_base"], "judge_status": r["judge"]["status"]}
            print(f"--then: eval report in {ev['output']}: stop rate base {r['base']['stop_rate']:.3f} -> tuned "
                  f"{r['tuned']['stop_rate']:.3f}, win rate tuned over base {eval_report.win_rate_line(r)}")
    manifest_path = out / "session_manifest.json"
    storage.write_json_atomic(manifest_path, {**storage.read_json(manifest_path), "chain": chain})
    return chain


def _run_locked(plan: PilotPlan, *, run_id: str, started: str, t0: float, deployment: str | None,
                require_approval: bool, approval_timeout_s: int) -> dict[str, Any]:
    """The pilot's phases, from claiming the output folder to the final files (under its lock)."""
    run.claim_output(plan, run_id)
    meta = RunMeta(run_id=run_id, git_sha=provenance.git_info(run.REPO_DIR)["sha"], config_hash=plan.config_hash)
    cfg, manifests = plan.config, []
    ig, rg, iterations = cfg.instruction_generation, cfg.response_generation, []
    since, instructions = 1, None
    for it in range(1, cfg.max_iterations + 2):
        if instructions is None:  # the first iteration, or the iterate step changed an instruction setting
            instructions = _instruction_rounds(plan, meta, ig, since)
            manifests += instructions.manifests
        kept = instructions.kept
        r = t.generate_responses(run.make_call(plan, "generate_responses", meta=meta, iteration=it,
                                               response_generation=rg, inputs={"kept": kept}))
        p = t.filter_pairs(run.make_call(plan, "filter_pairs", meta=meta, iteration=it,
                                         inputs={"responses": r.outputs["responses"]}))
        q = t.qc_gate(run.make_call(plan, "qc", meta=meta, iteration=it, response_generation=rg,
                                    instruction_generation=ig, critic_dev=p.critic_dev, inputs={
            "generated": instructions.generated, "instruction_rejected": instructions.rejected, "kept": kept,
            "responses": r.outputs["responses"], "pairs_kept": p.outputs["kept"],
            "pairs_rejected": p.outputs["rejected"]}))
        manifests += [r, p, q]
        iteration = IterationRecord(qc=q, settings=rg, instruction_settings=ig,
                                    instructions_dir=str(run.instructions_dir(plan.output, since)))
        iterations.append(iteration)
        if q.decision.decision != "iterate":
            break
        new_ig, new_rg, iteration.changes = run.next_settings(ig, rg, q)
        iteration.next_settings, iteration.next_instruction_settings = new_rg, new_ig
        if it > cfg.max_iterations or (new_ig == ig and new_rg == rg):
            break
        if new_ig != ig:  # an instruction setting changed: phases 1-5 rerun with it, in iterations/NN/instructions
            since, instructions = it + 1, None
        ig, rg = new_ig, new_rg
    decision = None
    if require_approval and iterations[-1].qc.decision.decision == "scale":
        decision = ask_approval(plan, iterations[-1].qc.summary, approval_timeout_s, deployment)
    result = t.finalize_run(plan, run_id=run_id, started=started, iterations=iterations, phase_manifests=manifests,
                            flow_seconds=round(time.perf_counter() - t0, 3), approval=decision)
    t.publish_final(result, iterations[-1].qc)
    return result


@dataclass
class InstructionRounds:
    """Phases 1-2 of one instruction setting: each round's generated and rejected files, the kept
    pool after the last round, and the phase manifests."""

    generated: list[FileRef] = field(default_factory=list)
    rejected: list[FileRef] = field(default_factory=list)
    kept: FileRef | None = None
    manifests: list[PhaseManifest] = field(default_factory=list)


def _instruction_rounds(plan: PilotPlan, meta: RunMeta, ig: InstructionGenerationConfig, since: int) -> InstructionRounds:
    """Phases 1-2 with instruction settings `ig`: rounds of generation and filtering until `count`
    instructions are kept or `max_instruction_rounds` run out."""
    rounds = InstructionRounds()
    for rnd in range(1, ig.max_instruction_rounds + 1):
        g = t.generate_instructions(run.make_call(plan, "generate_instructions", meta=meta, round=rnd,
                                                  instruction_generation=ig, instructions_since=since,
                                                  inputs=run.instruction_inputs(ig, rounds.kept)))
        f = t.filter_instructions(run.make_call(plan, "filter_instructions", meta=meta, round=rnd,
                                                instructions_since=since, inputs={
            "generated": g.outputs["generated"], "kept_before": rounds.kept}))
        rounds.manifests += [g, f]
        rounds.generated.append(g.outputs["generated"])
        rounds.rejected.append(f.outputs["rejected"])
        rounds.kept = f.outputs["kept"]
        if f.kept_total >= plan.config.count:
            break
    return rounds


def ask_approval(plan: PilotPlan, summary: dict[str, Any], timeout_s: int, deployment: str | None) -> dict[str, Any]:
    """A human's yes/no on a `scale` verdict: the terminal locally, the resume form under a deployment."""
    if deployment is None:
        return approval.ask_terminal(reports.qc_text(summary), timeout_s)
    from prefect.flow_runs import suspend_flow_run
    from prefect.runtime import flow_run

    request = _approval_request(Path(plan.output), flow_run.id, timeout_s)
    timer = _start_timeout_timer(flow_run.id, request["deadline"])
    form = runtime.ScaleApproval.with_initial_data(
        description=f"## Approve scaling?\n\nDeadline: {request['deadline']} (then: rejected (timeout)).\n\n"
                    + reports.qc_markdown(summary))
    # Frees the worker; on resume the flow reruns from the top (every phase a cache hit) and
    # suspend_flow_run returns the submitted form instead of suspending again.
    answer = suspend_flow_run(wait_for_input=form, key="scale-approval")
    if answer.decision == "reject" and answer.note == approval.TIMEOUT_NOTE:
        verdict: approval.Decision = "rejected (timeout)"
    else:
        verdict = "approved" if answer.decision == "approve" else "rejected"
        _cancel_timer(timer)
    return approval.record(verdict, note=answer.note, source="prefect-ui", requested=request["requested"],
                           deadline=request["deadline"])


def _approval_request(out: Path, flow_run_id: str, timeout_s: int) -> dict[str, Any]:
    """The request time and deadline of this flow run's approval, stable across the resume rerun."""
    path = out / APPROVAL_REQUEST
    if path.is_file():
        saved = storage.read_json(path)
        if saved.get("flow_run_id") == str(flow_run_id):
            return saved
    now = datetime.now(timezone.utc)
    request = {"flow_run_id": str(flow_run_id), "requested": now.isoformat(timespec="seconds"),
               "deadline": (now + timedelta(seconds=timeout_s)).isoformat(timespec="seconds")}
    storage.write_json_atomic(path, request)
    return request


def _start_timeout_timer(flow_run_id: str, deadline: str) -> Any:
    """Schedule `stage1/approval-timeout` at the deadline, once per flow run (idempotency key: the
    resume rerun gets the same timer back). Returns its flow run id, or None without that deployment."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    try:
        return run_deployment(runtime.APPROVAL_TIMEOUT_DEPLOYMENT, parameters={"flow_run_id": str(flow_run_id)},
                              scheduled_time=datetime.fromisoformat(deadline), timeout=0, as_subflow=False,
                              idempotency_key=f"stage1-approval-timeout-{flow_run_id}").id
    except ObjectNotFound:
        get_run_logger().warning("no %s deployment: this approval has no deadline (deploy deployments/prefect.yaml)",
                                 runtime.APPROVAL_TIMEOUT_DEPLOYMENT)
        return None


def _cancel_timer(timer_id: Any) -> None:
    """A human answered: the deadline's flow run, if it has not started, is not needed any more."""
    if timer_id is None:
        return
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled

    with get_client(sync_client=True) as client:
        state = client.read_flow_run(timer_id).state
        if state is not None and state.is_scheduled():
            client.set_flow_run_state(timer_id, Cancelled(message="approval decided before the deadline"))


def hand_off(result: dict[str, Any], scale_count: int, deployment: str | None) -> dict[str, Any] | None:
    """Start the scale run when the final decision is scale and one was asked for. Under a
    deployment: `stage1/scale` on its own pool, not waited on (this run would hold the GPU slot the
    shards need). Locally: print the command."""
    if result["decision"] != "scale" or scale_count <= 0:
        return None
    if deployment is None:
        pilot_dir = Path(result["output"])
        scale_dir = pilot_dir.with_name(pilot_dir.name + "-scale")
        cmd = shlex.join(["python", "-m", "flows.scale", "--from-pilot", str(pilot_dir), "--output", str(scale_dir),
                          "--count", str(scale_count)])
        print(f"gate says scale: run the scale with\n  {cmd}")
        return {"command": cmd}
    from prefect.deployments import run_deployment

    fr = run_deployment(runtime.SCALE_DEPLOYMENT, parameters={"from_pilot": result["output"], "count": scale_count},
                        timeout=0)
    print(f"gate says scale: started {runtime.SCALE_DEPLOYMENT} run {fr.name} ({fr.id})")
    started = {"deployment": runtime.SCALE_DEPLOYMENT, "flow_run_id": str(fr.id), "flow_run_name": fr.name}
    manifest_path = Path(result["output"]) / "session_manifest.json"
    storage.write_json_atomic(manifest_path, {**storage.read_json(manifest_path), "scale_run": started})
    return started


def build_parser() -> argparse.ArgumentParser:
    """The CLI: one flag per option of PilotOptions (stage1_core.phases.options), plus --dry-run."""
    ap = argparse.ArgumentParser(
        prog="python -m flows.pilot",
        description="Stage 1 pilot: turn a base model into instruction data, gated on measured quality.",
        epilog="Exit codes: 0 scale, 3 iterate (only with --max-iterations 0; writes suggested_config.yaml), "
               "4 halt (incl. iterations exhausted), 2 invalid input (nothing written), 5 output folder locked by "
               "another run, 1 unexpected error, "
               "130 interrupted. Docs: docs/quickstart.md, docs/phases.md, docs/outputs.md, docs/config.md (options).")
    options.add_arguments(ap, PilotOptions)
    ap.add_argument("--dry-run", action="store_true",
                    help="validate everything, print the plan (phases, prompts, estimated tokens and time), exit 0 "
                         "without loading the model")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    given = options.from_args(PilotOptions, args)
    try:
        opts = PilotOptions.model_validate({"output": LOCAL_OUTPUT, **given})
    except ValidationError as e:  # a bound argparse does not know (--count 0, --scale-count -1)
        err = settings.input_error(e, source="command line", docs="python -m flows.pilot --help")
        err.fix = f"correct {PilotOptions.model_fields[err.field.split('.')[0]].json_schema_extra['flag']}"
        print(err.render(), file=sys.stderr)
        print("nothing was written.", file=sys.stderr)
        return 2
    if opts.require_approval and not sys.stdin.isatty():
        print(InputError("--require-approval needs a terminal to ask on (stdin is not a terminal)",
                         field="--require-approval", expected="an interactive terminal",
                         fix="run it in a terminal, or through the stage1/pilot deployment (the run suspends "
                             "for approval in the Prefect UI)").render(), file=sys.stderr)
        print("nothing was written.", file=sys.stderr)
        return 2
    try:
        check_chain(opts.then, opts.sft_config, opts.eval_config)
    except InputError as e:
        print(e.render(), file=sys.stderr)
        print("nothing was written.", file=sys.stderr)
        return 2

    def start(plan: PilotPlan) -> dict[str, Any]:
        return pilot(**opts.model_dump(exclude_none=True))

    result = runtime.run_cli(lambda: run.prepare_pilot(opts), dry_run=args.dry_run, dry_text=run.dry_run_text,
                             start=start, load=run.load_model)
    if isinstance(result, int):
        return result
    summary = run.read_summary(result["output"])
    print(reports.qc_text(summary))
    if result.get("approval"):
        a = result["approval"]
        print(f"approval: {a['decision']}" + (f" ({a['note']})" if a.get("note") else ""))
    print(f"{result['kept']} kept pairs in {result['output']}/pilot_data.jsonl — exit {result['exit_code']}")
    if (result.get("chain") or {}).get("stopped"):
        print(f"--then: {result['chain']['stopped']}")
    return result["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
