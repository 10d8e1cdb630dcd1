"""SFT's and eval's options, each declared once (`stage1_core.infra.options`): the flows' parameters
(`flows.sft.sft_flow`, `flows.eval.eval_flow` take their signatures from here), the CLI flags, and the
option tables of docs/sft.md and docs/eval.md (tests keep the pages equal to them)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from stage1_core.infra.config import StrictModel
from stage1_core.infra.options import RunKey, from_config, opt
from stage1_core.train.sft import SFTSettings

_SEED = SFTSettings.model_fields["seed"]


class SFTOptions(StrictModel):
    """One SFT run's options."""

    data: str = Field(description="a finished pilot's or scale run's output folder",
                      json_schema_extra={"flag": "--data", "metavar": "RUN_DIR"})
    output: str | None = opt(None, "--output", "the adapter's folder; rerunning with it resumes (under a deployment "
                             "default ${STAGE1_OUTPUT_ROOT}/{deployment}/{flow run name or run_key})", metavar="DIR",
                             cli_required=True)
    config: str | None = opt(None, "--config", "YAML merged over configs/sft.yaml", metavar="PATH")
    seed: Annotated[int, *_SEED.metadata] | None = from_config(_SEED, "seed", "--seed", help="training seed",
                                                                metavar="N")
    force: bool = opt(False, "--force", "train on a run whose gate did not say scale (recorded as forced in "
                      "training_summary.json)")
    overwrite: bool = opt(False, "--overwrite", "replace an output folder of another SFT run")
    run_key: RunKey | None = opt(None, None, "under a deployment without output: write to "
                                 "${STAGE1_OUTPUT_ROOT}/{deployment}/{run_key}, so rerunning a crashed run with the "
                                 "same key resumes from its checkpoints")


class EvalOptions(StrictModel):
    """One evaluation's options."""

    adapter: str = Field(description="a finished python -m flows.sft output folder (training_summary.json names "
                         "the base model)", json_schema_extra={"flag": "--adapter", "metavar": "DIR"})
    output: str | None = opt(None, "--output", "where eval_report.json and eval_report.md go (under a deployment "
                             "default ${STAGE1_OUTPUT_ROOT}/{deployment}/{flow run name or run_key})", metavar="DIR",
                             cli_required=True)
    prompts: str | None = opt(None, "--prompts", "JSONL: id and instruction per line, optional IFEval "
                              "instruction_id_list and kwargs (default: the shipped held-out prompts)", metavar="FILE")
    config: str | None = opt(None, "--config", "YAML merged over configs/eval.yaml", metavar="PATH")
    overwrite: bool = opt(False, "--overwrite", "replace an output folder of another evaluation")
    run_key: RunKey | None = opt(None, None, "under a deployment without output: write to "
                                 "${STAGE1_OUTPUT_ROOT}/{deployment}/{run_key}")
