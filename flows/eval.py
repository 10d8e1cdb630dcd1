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
from typing import Annotated, Any

from prefect import flow
from pydantic import Field

from flows import runtime
from stage1_core.train import eval_report, evaluation
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


@flow(name="stage1", flow_run_name=_run_name, log_prints=True)
def eval_flow(adapter: str, output: str | None = None, prompts: str | None = None, config: str | None = None,
              overwrite: bool = False,
              run_key: Annotated[str, Field(pattern=runtime.RUN_KEY_PATTERN)] | None = None) -> dict[str, Any]:
    """Stage 1 eval: stop rate, runaway and token-limit rates, IFEval verifiable accuracy (strict and
    loose, per prompt and per instruction), perplexity, and a judged win rate of base + adapter over the
    base model (order-inconsistent verdicts are ties; length-controlled; marked uninformative when the
    judge's position consistency is below the floor), with intervals.

    Args:
        adapter: a finished SFT output folder (training_summary.json names the base model).
        output: the report's folder; under a deployment defaults to ${STAGE1_OUTPUT_ROOT}/{deployment}/{flow_run_name}.
        prompts: JSONL with id and instruction per line (optional IFEval instruction_id_list and kwargs);
            default: the shipped held-out set.
        config: YAML merged over configs/eval.yaml.
        overwrite: replace an output folder of another evaluation.
        run_key: under a deployment without `output`: write to ${STAGE1_OUTPUT_ROOT}/{deployment}/{run_key}.
    """
    output = runtime.run_output(output, None, run_key)
    if output is None:
        raise InputError("no output folder", field="output", expected="a folder path", fix="pass --output DIR")
    plan = t.prepare_eval({"adapter": adapter, "output": output, "prompts": prompts, "config": config,
                           "overwrite": overwrite})
    base, tuned, judge = t.load_models(plan)  # before the folder is touched
    out = Path(plan["output"])
    with hold_lock(out / LOCK_NAME):
        out.mkdir(parents=True, exist_ok=True)
        if plan["folder_state"] == "overwrite":
            for name in (evaluation.REPORT, evaluation.REPORT_MD, evaluation.RESPONSES):
                (out / name).unlink(missing_ok=True)
        storage.write_json_atomic(out / RUN_MARKER, {"identity": plan["identity"], "run_id": provenance.run_id(),
                                                     "created": provenance.utc_now(), "kind": "eval"})
        report = t.evaluate(plan, base, tuned, judge)
    t.publish(report)
    if report["judge"]["status"] == "uninformative":
        print(f"win rate not presented: {report['judge']['reason']}")
    return {"exit_code": 0, "output": plan["output"], "report": report}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m flows.eval",
        description="Stage 1 eval: compare the base model with base + adapter on held-out prompts (zero-shot, greedy).",
        epilog="Exit codes: 0 report written, 2 bad input (nothing written), 5 output folder locked by another run, "
               "1 unexpected error, 130 interrupted. Docs: docs/eval.md.")
    ap.add_argument("--adapter", required=True, metavar="DIR", help="a finished python -m flows.sft output folder")
    ap.add_argument("--output", required=True, metavar="DIR", help="where eval_report.json and eval_report.md go")
    ap.add_argument("--prompts", metavar="FILE", default=None,
                    help="JSONL: id and instruction per line, optional IFEval instruction_id_list and kwargs "
                         "(default: the shipped held-out prompts)")
    ap.add_argument("--config", metavar="PATH", default=None, help="YAML merged over configs/eval.yaml")
    ap.add_argument("--overwrite", action="store_true", help="replace an output folder of another evaluation")
    ap.add_argument("--dry-run", action="store_true", help="validate, print the plan and exit 0; loads and writes nothing")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    params = {"adapter": a.adapter, "output": a.output, "prompts": a.prompts, "config": a.config,
              "overwrite": a.overwrite}
    result = runtime.run_cli(lambda: evaluation.prepare_eval(**params), dry_run=a.dry_run,
                             dry_text=evaluation.dry_run_text, start=lambda plan: eval_flow(**params))
    if isinstance(result, int):
        return result
    print(eval_report.report_text(result["report"]))
    print(f"report in {result['output']}/{evaluation.REPORT} — exit {result['exit_code']}")
    return result["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
