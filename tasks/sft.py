"""Prefect tasks of the SFT flow: validate, load the base model, train (resuming), publish.

Training is not cached by Prefect: the output folder is its own record (a finished folder holds
training_summary.json; an unfinished one resumes from its newest checkpoint), so a task retry or a
rerun of the command continues where the last one stopped.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from tqdm import tqdm

from stage1_core.infra import provenance, storage
from stage1_core.phases import reports, run
from stage1_core.train.options import SFTOptions
from stage1_core.train import sft


@task(name="prepare_sft", persist_result=False, cache_policy=NO_CACHE)
def prepare_sft(opts: SFTOptions) -> sft.SFTPlan:
    """Validate the run folder (its gate), the SFT config, the model and the output folder."""
    return sft.prepare_sft(**opts.model_dump(exclude={"run_key"}))


@task(name="load_base_model", persist_result=False, cache_policy=NO_CACHE)
def load_base(plan: sft.SFTPlan) -> Any:
    """Load the base model with its guards and sentinels before the output folder is touched (a
    model that fails them is bad input, exit 2). Returns the backend (its own copy: LoRA changes it)."""
    model = plan.base_model
    logger = get_run_logger()
    logger.info(f"loading base model {model.id} (device {model.device}, dtype {model.dtype}, "
                f"quantize {model.quantize}) ...")
    t0 = time.perf_counter()
    backend = sft.load_base(plan)
    logger.info(f"base model ready in {time.perf_counter() - t0:.1f} s ({backend.device}, "
                f"{backend.fingerprint.get('dtype')}; guards and sentinels passed)")
    return backend


@task(name="claim_sft_output", persist_result=False, cache_policy=NO_CACHE)
def claim(plan: sft.SFTPlan, run_id: str) -> None:
    """Create the output folder and record the run identity; an overwrite removes the earlier run's
    adapter, summary, plot and checkpoints first (never a folder without a stage1 marker)."""
    import shutil

    out = Path(plan.output)
    ours = (out / run.RUN_MARKER).is_file()
    out.mkdir(parents=True, exist_ok=True)
    if ours:
        run.remove_stale_temp_files(out)
        if plan.folder_state == "overwrite":
            for name in (*sft.ADAPTER_FILES, sft.SUMMARY, sft.LOSS_PNG, "README.md"):
                (out / name).unlink(missing_ok=True)
            shutil.rmtree(out / sft.CHECKPOINTS, ignore_errors=True)
    storage.write_json_atomic(out / run.RUN_MARKER, {"identity": plan.identity.model_dump(), "run_id": run_id,
                                                     "created": provenance.utc_now(), "kind": "sft"})


@task(name="train_adapter", persist_result=False, cache_policy=NO_CACHE)
def train_adapter(plan: sft.SFTPlan, backend: Any) -> dict[str, Any]:
    """Train (or resume) the adapter; a tqdm bar and a Prefect progress artifact follow the steps."""
    logger = get_run_logger()
    artifact = create_progress_artifact(0.0, description="sft: starting")
    bar = tqdm(desc="sft", unit="step", file=sys.stderr, dynamic_ncols=True)
    last = [-1.0]

    def on_step(step: int, total: int, logs: dict[str, float]) -> None:
        if bar.total != total:
            bar.total = total
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{logs['loss']:.3f}")
        pct = 100.0 * step / total if total else 100.0
        if pct - last[0] >= 5.0 or step >= total:
            last[0] = pct
            update_progress_artifact(artifact, pct, description=f"sft: step {step}/{total}, loss {logs['loss']:.3f}")

    try:
        summary = sft.train(plan, backend=backend, on_step=on_step,
                            git_sha=provenance.git_info(run.REPO_DIR)["sha"])
    finally:
        bar.close()
    update_progress_artifact(artifact, 100.0, description="sft: done")
    logger.info(f"adapter written to {summary['output']}: {summary['steps']} steps, train loss {summary['train_loss']:.4f}, "
                f"eval loss {summary['eval_loss']:.4f}, {summary['tokens_per_s']} tokens/s")
    return summary


def publish(summary: dict[str, Any]) -> None:
    """The loss curve as a Prefect table artifact and the summary as markdown."""
    evals = {round(e["epoch"] or 0, 3): e["eval_loss"] for e in summary["eval_loss_per_epoch"]}
    rows = [{"step": p["step"], "train_loss": round(p["loss"], 5)} for p in summary["loss_curve"]]
    create_table_artifact(rows, key="stage1-sft-loss", description=f"SFT loss per step (eval loss per epoch: {evals})")
    create_markdown_artifact(reports.sft_markdown(summary), key="stage1-sft", description="SFT summary")
