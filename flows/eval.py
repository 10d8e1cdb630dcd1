"""The eval flow: the base model vs base + adapter on held-out prompts.

Run locally:
    python -m flows.eval --adapter artifacts/pilot-sft --output artifacts/pilot-eval [--prompts FILE]
Under a deployment: `prefect deployment run stage1/eval --param adapter=...` (docs/eval.md).
Exit codes: 0 report written, 2 bad input (nothing written), 5 output folder locked by another run,
1 unexpected error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


from flows import runtime
from stage1_core.infra import options
from stage1_core.train import eval_report, evaluation
from stage1_core.train.options import EvalOptions
from stage1_core.infra import provenance
from stage1_core.infra.errors import InputError
from stage1_core.infra.locks import LOCK_NAME, hold_lock
from stage1_core.phases.run import RUN_MARKER
from stage1_core.infra import storage
from tasks import evaluation as t


def _run_name() -> str:
    from prefect.runtime import flow_run

    p = flow_run.parameters
    name = f"eval-{Path(str(p.get('adapter') or 'adapter')).name}"
    return f"{name}-{str(flow_run.id)[:8]}" if runtime.deployment_name() else name


def _eval_flow(**params: Any) -> dict[str, Any]:
    opts = EvalOptions.model_construct(**params)  # validated at the flow's edge against the same declaration
    output = runtime.run_output(opts.output, None, opts.run_key)
    if output is None:
        raise InputError("no output folder", field="output", expected="a folder path", fix="pass --output DIR")
    plan = t.prepare_eval(opts.model_copy(update={"output": output}))
    base, tuned, judge = t.load_models(plan)  # before the folder is touched
    out = Path(plan.output)
    with hold_lock(out / LOCK_NAME):
        out.mkdir(parents=True, exist_ok=True)
        if plan.folder_state == "overwrite":
            for name in (evaluation.REPORT, evaluation.REPORT_MD, evaluation.RESPONSES):
                (out / name).unlink(missing_ok=True)
        storage.write_json_atomic(out / RUN_MARKER, {"identity": plan.identity.model_dump(), "run_id": provenance.run_id(),
                                                     "created": provenance.utc_now(), "kind": "eval"})
        report = t.evaluate(plan, base, tuned, judge)
    t.publish(report)
    if report["judge"]["status"] == "uninformative":
        print(f"win rate not presented: {report['judge']['reason']}")
    return {"exit_code": 0, "output": plan.output, "report": report}


eval_flow = runtime.options_flow(
    _eval_flow, EvalOptions,
    "Stage 1 eval: stop rate, runaway and token-limit rates, IFEval verifiable accuracy (strict and loose, per "
    "prompt and per instruction), perplexity, and a judged win rate of base + adapter over the base model "
    "(order-inconsistent verdicts are ties; length-controlled; marked uninformative when the judge's position "
    "consistency is below the floor), with intervals.", name="eval_flow", run_name=_run_name)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m flows.eval",
        description="Stage 1 eval: compare the base model with base + adapter on held-out prompts (zero-shot, greedy).",
        epilog="Exit codes: 0 report written, 2 bad input (nothing written), 5 output folder locked by another run, "
               "1 unexpected error, 130 interrupted. Docs: docs/eval.md.")
    options.add_arguments(ap, EvalOptions)
    ap.add_argument("--dry-run", action="store_true", help="validate, print the plan and exit 0; loads and writes nothing")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    params = options.from_args(EvalOptions, a)
    result = runtime.run_cli(lambda: evaluation.prepare_eval(**EvalOptions(**params).model_dump(exclude={"run_key"})),
                             dry_run=a.dry_run,
                             dry_text=evaluation.dry_run_text, start=lambda plan: eval_flow(**params))
    if isinstance(result, int):
        return result
    print(eval_report.report_text(result["report"]))
    print(f"report in {result['output']}/{evaluation.REPORT} — exit {result['exit_code']}")
    return result["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
