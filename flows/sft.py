"""The SFT flow: LoRA on the kept pairs of a finished pilot or scale run.

Run locally (rerunning the same command resumes from the newest checkpoint):
    python -m flows.sft --data artifacts/pilot --output artifacts/pilot-sft
Under a deployment: `prefect deployment run stage1/sft --param data=... ` (deployments/prefect.yaml,
docs/sft.md). Exit codes: 0 adapter written (or already there), 2 bad input (a run whose gate did
not say scale without --force, a bad config, 4-bit quantization on the CPU; nothing written), 5
output folder locked by another run, 1 unexpected error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


from flows import runtime
from stage1_core.infra import provenance
from stage1_core.phases import reports
from stage1_core.infra import options
from stage1_core.train import sft
from stage1_core.train.options import SFTOptions
from stage1_core.infra.errors import InputError
from stage1_core.infra.locks import LOCK_NAME, hold_lock
from tasks import sft as t


def _run_name() -> str:
    from prefect.runtime import flow_run

    p = flow_run.parameters
    name = f"sft-{Path(str(p.get('data') or 'run')).name}"
    return f"{name}-{str(flow_run.id)[:8]}" if runtime.deployment_name() else name


def _sft_flow(**params: Any) -> dict[str, Any]:
    opts = SFTOptions.model_construct(**params)  # validated at the flow's edge against the same declaration
    run_id = provenance.run_id()
    output = runtime.run_output(opts.output, None, opts.run_key)
    if output is None:
        raise InputError("no output folder", field="output", expected="a folder path", fix="pass --output DIR")
    plan = t.prepare_sft(opts.model_copy(update={"output": output}))
    if plan.done:
        summary = sft.read_summary(plan.output)
        print(f"{plan.output} already holds this run's adapter: nothing to do")
    else:
        backend = t.load_base(plan)  # guards and sentinels first: a model that fails them leaves the folder as it was
        with hold_lock(Path(plan.output) / LOCK_NAME):
            t.claim(plan, run_id)
            summary = t.train_adapter(plan, backend)
    t.publish(summary)
    return {"exit_code": 0, "output": plan.output, "summary": summary}


sft_flow = runtime.options_flow(_sft_flow, SFTOptions, "Stage 1 SFT: a LoRA adapter trained on a finished run's "
                                "kept pairs (loss on response tokens only).", name="sft_flow", run_name=_run_name)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m flows.sft",
        description="Stage 1 SFT: train a LoRA adapter on the kept pairs of a finished pilot or scale run "
                    "(completion format, loss on response tokens only); rerun the same command to resume.",
        epilog="Exit codes: 0 adapter written (or already there), 2 bad input (nothing written), 5 output folder "
               "locked by another run, 1 unexpected error, 130 interrupted. Docs: docs/sft.md.")
    options.add_arguments(ap, SFTOptions)
    ap.add_argument("--dry-run", action="store_true", help="validate, print the plan and exit 0; loads and writes nothing")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    params = options.from_args(SFTOptions, a)
    result = runtime.run_cli(lambda: sft.prepare_sft(**SFTOptions(**params).model_dump(exclude={"run_key"})),
                             dry_run=a.dry_run, dry_text=sft.dry_run_text, start=lambda plan: sft_flow(**params))
    if isinstance(result, int):
        return result
    print(reports.sft_text(result["summary"]))
    print(f"adapter in {result['output']} — exit {result['exit_code']}")
    return result["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
