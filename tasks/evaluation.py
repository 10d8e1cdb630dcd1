"""Prefect tasks of the eval flow: validate, load both models, evaluate, publish."""

from __future__ import annotations

import sys
import time
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from tqdm import tqdm

from stage1_core.train.options import EvalOptions
from stage1_core.train import eval_report, evaluation


@task(name="prepare_eval", persist_result=False, cache_policy=NO_CACHE)
def prepare_eval(opts: EvalOptions) -> evaluation.EvalPlan:
    """Validate the adapter folder, prompts, config, model and output folder."""
    return evaluation.prepare_eval(**opts.model_dump(exclude={"run_key"}))


@task(name="load_models", persist_result=False, cache_policy=NO_CACHE)
def load_models(plan: evaluation.EvalPlan) -> tuple[Any, Any, Any]:
    """The base backend (cached per process, guards and sentinels), the tuned one (the base loaded
    again, adapter merged) and the judge (the base, or judge.model). A model that fails its guards is
    bad input (exit 2)."""
    logger = get_run_logger()
    t0 = time.perf_counter()
    base, tuned, judge = evaluation.load_models(plan)
    logger.info(f"base, tuned and judge models ready in {time.perf_counter() - t0:.1f} s "
                f"({base.fingerprint.get('device')}; judge {plan.judge_config.id})")
    return base, tuned, judge


@task(name="evaluate", persist_result=False, cache_policy=NO_CACHE)
def evaluate(plan: evaluation.EvalPlan, base: Any, tuned: Any, judge: Any) -> dict[str, Any]:
    """Generate with both models, score, judge; writes the report files. A bar per stage."""
    artifact = create_progress_artifact(0.0, description="eval: starting")
    bars: dict[str, tqdm] = {}

    def progress(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            for b in bars.values():
                b.close()
            bar = bars[stage] = tqdm(desc=f"eval {stage}", total=total, unit="prompt", file=sys.stderr,
                                     dynamic_ncols=True)
        bar.update(done - bar.n)
        update_progress_artifact(artifact, 100.0 * done / total if total else 100.0,
                                 description=f"eval {stage}: {done}/{total}")

    try:
        report = evaluation.evaluate(plan, base=base, tuned=tuned, judge=judge, progress=progress)
    finally:
        for b in bars.values():
            b.close()
    update_progress_artifact(artifact, 100.0, description="eval: done")
    return report


def publish(report: dict[str, Any]) -> None:
    """The metric table and the markdown report (win rate, judge, verifiable accuracy by type) as
    Prefect artifacts; an uninformative win rate is logged as a warning."""
    line = eval_report.win_rate_line(report)
    create_table_artifact(eval_report.report_table(report), key="stage1-eval",
                          description=f"Eval base vs tuned (win rate tuned over base: {line})")
    create_markdown_artifact(eval_report.report_markdown(report), key="stage1-eval-report", description="Eval report")
    if report["judge"]["status"] == "uninformative":
        get_run_logger().warning(f"eval: the win rate is uninformative: {report['judge']['reason']}")
