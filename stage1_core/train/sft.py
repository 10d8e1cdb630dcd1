"""LoRA SFT on the kept pairs of a finished pilot or scale run (`python -m flows.sft`).

The pairs are trained in exactly the completion format the data was generated in: the prompt
`Instruction: X\\nResponse:` encoded as the backend encodes a generation prompt (BOS by the model's
policy, chat-control guard), then the response tokenized on its own as the continuation `" " + Y`,
then EOS. The loss covers the response and EOS only (prompt labels are -100). Training is the
transformers `Trainer` with a peft LoRA adapter (QLoRA when `model.quantize: 4bit` on a CUDA GPU),
rows grouped by length, an eval loss on a held-out slice after every epoch, and checkpoints that
are written to a staging folder and renamed into place, so a killed run never leaves half of one
and rerunning the command resumes from the newest.

The output folder, when the run finishes: the adapter (`adapter_config.json`,
`adapter_model.safetensors`; `PeftModel.from_pretrained(base, OUTPUT)` loads it),
`training_summary.json` (written last: its presence means done) and `loss.png`; the checkpoints
are removed once the adapter is written.

Run it: `python -m flows.sft --data RUN_DIR --output DIR`; tests: `python -m pytest -q tests/core/test_sft.py`.
"""

from __future__ import annotations

import io
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from pydantic import Field, model_validator

from stage1_core.infra import provenance, storage
from stage1_core.infra.config import CONFIGS_DIR, ModelConfig, StrictModel, model_with
from stage1_core.infra.settings import load_settings
from stage1_core.infra.errors import InputError
from stage1_core.phases.plans import FolderState, ModelRecord, Record
from stage1_core.train import sft_data, trainer as sft_trainer

log = logging.getLogger("stage1.sft")

DEFAULT_SFT_CONFIG = CONFIGS_DIR / "sft.yaml"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILES = (ADAPTER_CONFIG, "adapter_model.safetensors")
SUMMARY = "training_summary.json"
LOSS_PNG = "loss.png"
CHECKPOINTS = "checkpoints"
PROMPT_TEMPLATE = "Instruction: {instruction}\nResponse:"
"""The zero-shot completion prompt: what generation's last block looks like, and what eval asks."""
IGNORE = -100
"""The label of a token the loss skips (prompt tokens, padding)."""



class LoraSettings(StrictModel):
    r: int = Field(default=16, gt=0, le=1024)
    alpha: float = Field(default=32, gt=0)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: str | list[str] = Field(default="all-linear", description="'all-linear' or module names")

    @model_validator(mode="after")
    def _modules(self) -> "LoraSettings":
        if isinstance(self.target_modules, list) and not all(m.strip() for m in self.target_modules):
            raise ValueError("target_modules must be 'all-linear' or a list of non-empty module names")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("target_modules must not be an empty list")
        return self


class SFTSettings(StrictModel):
    """The validated SFT config (configs/sft.yaml <- --config <- --seed)."""

    seed: int = Field(default=42, ge=0)
    model: dict[str, Any] = Field(default_factory=dict, description="ModelConfig keys over the run's model")
    epochs: float = Field(default=3, gt=0, le=1000)
    learning_rate: float = Field(default=2e-4, gt=0, le=1.0)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_fraction: float = Field(default=0.05, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0)
    batch_size: int = Field(default=8, gt=0, le=4096)
    gradient_accumulation_steps: int = Field(default=1, gt=0, le=4096)
    max_seq_len: int = Field(default=512, ge=8, le=131072)
    eval_fraction: float = Field(default=0.1, gt=0.0, lt=0.5)
    save_steps: int = Field(default=10, gt=0)
    gradient_checkpointing: bool = False
    lora: LoraSettings = Field(default_factory=LoraSettings)


class SFTIdentity(Record):
    """What makes two SFT runs the same run (a folder of another identity is not resumed)."""

    data_sha256: str
    sft_config_sha256: str
    model_weights_sha256: str
    model_config_sha256: str


class SFTPlan(Record):
    """A validated SFT run (`prepare_sft`): nothing is written and no model is loaded to make one."""

    run: sft_data.RunSource
    settings: SFTSettings
    base_model: ModelConfig
    """The run's model with the SFT config's `model:` keys over it."""
    model: ModelRecord
    pairs: int
    identity: SFTIdentity
    output: str
    folder_state: FolderState
    done: bool
    """The output folder already holds this run's adapter."""
    config_source: str | None = None


# --------------------------------------------------------------------------- config and plan

def load_sft_config(config: str | Path | None = None, seed: int | None = None) -> SFTSettings:
    """configs/sft.yaml <- the user's YAML <- --seed, validated (InputError naming file, line and field)."""
    return load_settings(SFTSettings, DEFAULT_SFT_CONFIG, config, {} if seed is None else {"seed": seed},
                         docs="docs/sft.md")


def model_config(run_model: ModelConfig, settings: SFTSettings) -> ModelConfig:
    """The run's model, with the SFT config's `model:` keys over it."""
    return model_with(run_model.model_dump(mode="json"), settings.model, "the SFT config")


def prepare_sft(*, data: str, output: str, config: str | None = None, seed: int | None = None, force: bool = False,
                overwrite: bool = False) -> SFTPlan:
    """Validate everything and return the SFT plan. Writes nothing, loads no model.

    Raises:
        InputError: bad run folder or gate (exit 2), bad config, quantize that cannot run here, a bad
            output folder.
    """
    from stage1_core.model import check_quantize, model_fingerprint, resolve_model
    from stage1_core.phases.run import check_output_dir

    run = sft_data.read_run(data, force)
    settings = load_sft_config(config, seed)
    cfg = model_config(run.model, settings)
    r = resolve_model(cfg)
    if r.kind == "fake":
        raise InputError(f"the run's model is {cfg.id}: SFT needs real weights", field="model.id",
                         expected="the run's real base model", fix="train on a run made with a real model")
    check_quantize(cfg, r)
    pairs = sft_data.read_pairs(run.data)
    model = ModelRecord.model_validate(model_fingerprint(cfg))
    identity = SFTIdentity(data_sha256=run.data_sha256,
                           sft_config_sha256=storage.sha256_text(storage.canonical_json(settings.model_dump(mode="json"))),
                           model_weights_sha256=model.weights_sha256,
                           model_config_sha256=storage.sha256_text(storage.canonical_json(cfg.model_dump(mode="json"))))
    path, state = check_output_dir(output, identity, overwrite)
    done = state == "resume" and (Path(path) / SUMMARY).is_file()
    return SFTPlan(run=run, settings=settings, base_model=cfg, model=model, pairs=len(pairs), identity=identity,
                   output=path, folder_state=state, done=done, config_source=str(config) if config else None)


def dry_run_text(plan: SFTPlan) -> str:
    s, run, cfg = plan.settings, plan.run, plan.base_model
    steps = math.ceil(plan.pairs * (1 - s.eval_fraction) / (s.batch_size * s.gradient_accumulation_steps))
    return "\n".join([
        f"SFT plan: {plan.pairs} pairs from {run.data} (gate: {run.decision}" + (", forced" if run.forced else "") + ")",
        f"  model: {cfg.id} (quantize {cfg.quantize}, dtype {getattr(plan.model, 'dtype', 'n/a')})",
        f"  LoRA r={s.lora.r} alpha={s.lora.alpha} on {s.lora.target_modules}; "
        f"{s.epochs} epochs, ~{steps} steps/epoch of {s.batch_size}x{s.gradient_accumulation_steps} rows, "
        f"lr {s.learning_rate} ({s.lr_scheduler})",
        f"  output: {plan.output}" + (" (already finished: nothing to do)" if plan.done else ""),
    ])


# --------------------------------------------------------------------------- examples

def build_example(prompt_ids: Sequence[int], response_ids: Sequence[int], eos_id: int) -> dict[str, list[int]]:
    """One training row: prompt + response + EOS, labels IGNORE on the prompt.

    Args:
        prompt_ids: the encoded prompt (BOS included when the model's policy adds it).
        response_ids: the response's tokens, encoded on their own (no BOS).
        eos_id: the end-of-sequence token the model should learn to emit after the response.
    Returns:
        {"input_ids", "labels"}: labels are IGNORE for every prompt token, the token ids elsewhere
        (the model shifts them: position t predicts label t + 1).
    """
    ids = [*prompt_ids, *response_ids, eos_id]
    return {"input_ids": ids, "labels": [IGNORE] * len(prompt_ids) + [*response_ids, eos_id]}


def encode_pairs(backend: Any, rows: Sequence[dict[str, str]], max_seq_len: int) -> tuple[list[dict[str, list[int]]], list[str]]:
    """Encode pairs as the backend encodes generation prompts (BOS policy, control-token guard).

    Returns:
        (examples, ids of the rows left out because they exceed max_seq_len).
    Raises:
        ModelGuardError: a prompt or response holds a chat-control token.
    """
    from stage1_core.model import check_control_tokens

    prompts = backend.encode([PROMPT_TEMPLATE.format(instruction=r["instruction"]) for r in rows], what="SFT prompt")
    responses = backend._raw_encode([" " + r["response"].strip() for r in rows])
    check_control_tokens(responses, backend.control_ids, "SFT response")
    eos = backend.eos_ids[0] if backend.tokenizer.eos_token_id is None else int(backend.tokenizer.eos_token_id)
    examples, skipped = [], []
    for row, p, resp in zip(rows, prompts, responses):
        if len(p) + len(resp) + 1 > max_seq_len:
            skipped.append(row["id"])
        else:
            examples.append(build_example(p, resp, eos))
    return examples, skipped


class Collator:
    """Right-pads a batch: pad id in input_ids, 0 in attention_mask, IGNORE in labels."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# --------------------------------------------------------------------------- training

def load_base(plan: SFTPlan) -> Any:
    """A fresh HFBackend of the plan's base model (its own copy: LoRA changes it) with the loader's
    guards, sentinels and BOS policy.

    Raises:
        InputError: the model failed a guard or sentinel (bad input, exit 2), or the loader's checks.
    """
    from stage1_core.infra.errors import ModelGuardError
    from stage1_core.model import HFBackend
    from stage1_core.phases.run import guard_error

    try:
        return HFBackend(plan.base_model)
    except ModelGuardError as e:
        raise guard_error(e, getattr(plan.model, "path", None)) from None


def _peak_memory_bytes(device: str) -> int:
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def attach_lora(model: Any, settings: SFTSettings, quantized: bool) -> Any:
    """The model with a fresh LoRA adapter (peft), k-bit preparation first when quantized."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=settings.gradient_checkpointing)
    elif settings.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    lora = settings.lora
    return get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                            target_modules=lora.target_modules, bias="none", task_type="CAUSAL_LM"))


def training_arguments(settings: SFTSettings, output_dir: str, device: str, dtype: str, quantized: bool) -> Any:
    """The TrainingArguments of a run (used by flows.sft and bench/sft_*.py)."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir, seed=settings.seed, data_seed=settings.seed, num_train_epochs=settings.epochs,
        per_device_train_batch_size=settings.batch_size, per_device_eval_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps, learning_rate=settings.learning_rate,
        lr_scheduler_type=settings.lr_scheduler, warmup_steps=settings.warmup_fraction,
        weight_decay=settings.weight_decay, train_sampling_strategy="group_by_length", eval_strategy="epoch",
        save_strategy="steps", save_steps=settings.save_steps, save_total_limit=2, logging_strategy="steps",
        logging_steps=1, report_to=[], disable_tqdm=True, use_cpu=device == "cpu",
        bf16=dtype == "bfloat16" and device != "cpu" and not quantized, dataloader_num_workers=0,
        remove_unused_columns=False, include_num_input_tokens_seen="non_padding",
        optim="adamw_torch")


def train(plan: SFTPlan, *, backend: Any = None,
          on_step: Callable[[int, int, dict[str, float]], None] | None = None, git_sha: str | None = None) -> dict[str, Any]:
    """Train the plan's adapter into its output folder (resuming from the newest checkpoint there).

    Args:
        plan: prepare_sft's plan.
        backend: an HFBackend of the plan's model loaded for this run (LoRA is attached to its model);
            None loads one.
        on_step: called with (step, total steps, the step's logs) after every logged step.
        git_sha: the code's commit, for the summary.
    Returns:
        The training summary (also written to training_summary.json).
    Raises:
        InputError: the model failed its guards at load.
        ModelGuardError: a pair holds a chat-control token.
    """
    import torch
    import transformers

    t0 = time.perf_counter()
    out, settings, cfg = Path(plan.output), plan.settings, plan.base_model
    transformers.set_seed(settings.seed)
    if backend is None:
        backend = load_base(plan)
    load_s = float(backend.fingerprint.get("load_seconds") or 0.0)  # the load's own time, wherever it happened
    rows = sft_data.read_pairs(plan.run.data)
    train_rows, eval_rows = sft_data.split_pairs(rows, settings.eval_fraction, settings.seed)
    train_ex, skipped_train = encode_pairs(backend, train_rows, settings.max_seq_len)
    eval_ex, skipped_eval = encode_pairs(backend, eval_rows, settings.max_seq_len)
    if not train_ex or not eval_ex:
        raise InputError(f"no pair fits max_seq_len {settings.max_seq_len} in the {'training' if not train_ex else 'eval'} "
                         "split", field="max_seq_len", expected="a length that fits the pairs", fix="raise max_seq_len")
    quantized = cfg.quantize != "none"
    model = attach_lora(backend.model, settings, quantized)
    model.train()
    args = training_arguments(settings, str(out / CHECKPOINTS), backend.device, str(model.dtype).removeprefix("torch."),
                              quantized)
    trainer = sft_trainer.atomic_trainer_class()(model=model, args=args, train_dataset=train_ex, eval_dataset=eval_ex,
                                      data_collator=Collator(backend.pad_id),
                                      callbacks=[sft_trainer.progress_callback(lambda: 0, on_step)])
    checkpoints = sft_trainer.complete_checkpoints(out / CHECKPOINTS)
    resume = str(checkpoints[-1]) if checkpoints else None
    start_tokens = 0
    if resume:
        log.info("resuming from %s", resume)
        start_tokens = int(storage.read_json(Path(resume) / "trainer_state.json").get("num_input_tokens_seen") or 0)
    if backend.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t_train = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    train_s = time.perf_counter() - t_train
    history = [dict(h) for h in trainer.state.log_history]
    tokens_this_run = int(trainer.state.num_input_tokens_seen or 0) - start_tokens
    _write_adapter(trainer.model, out)
    losses = [h for h in history if "loss" in h]
    evals = [h for h in history if "eval_loss" in h]
    summary = {
        "output": str(out), "adapter": str(out), "finished": provenance.utc_now(),
        "dataset": {"run_dir": plan.run.path, "kind": plan.run.kind, "path": plan.run.data,
                    "sha256": plan.run.data_sha256, "pairs": len(rows), "train_pairs": len(train_ex),
                    "eval_pairs": len(eval_ex), "left_out_too_long": skipped_train + skipped_eval,
                    "eval_ids": [r["id"] for r in eval_rows],
                    "gate": {"decision": plan.run.decision, "forced": plan.run.forced,
                             "reasons": plan.run.reasons}},
        "base_model": {"id": cfg.id, "fingerprint": backend.fingerprint, "model_config": cfg.model_dump(mode="json")},
        "hyperparameters": settings.model_dump(mode="json"),
        "git_sha": git_sha, "seed": settings.seed,
        "steps": int(trainer.state.global_step), "epochs": float(trainer.state.epoch or 0.0),
        "resumed_from_step": int(Path(resume).name.split("-")[1]) if resume else None,
        "train_loss": losses[-1]["loss"] if losses else None,
        "train_loss_mean": float(result.training_loss) if result.training_loss is not None else None,
        "eval_loss": evals[-1]["eval_loss"] if evals else None,
        "eval_loss_per_epoch": [{"epoch": h.get("epoch"), "eval_loss": h["eval_loss"]} for h in evals],
        "loss_curve": [{"step": h["step"], "loss": h["loss"]} for h in losses],
        "tokens_trained_this_run": tokens_this_run,
        "tokens_per_s": round(tokens_this_run / train_s, 2) if train_s > 0 else None,
        "train_seconds_this_run": round(train_s, 3), "model_load_seconds": round(load_s, 3),
        "wall_seconds_this_run": None, "peak_memory_bytes": _peak_memory_bytes(backend.device),
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if backend.device.startswith("cuda") else "process max RSS",
        "device": backend.device, "environment": provenance.environment_info(),
        "versions": {"transformers": transformers.__version__, "peft": provenance.package_version("peft"), "torch": torch.__version__},
    }
    write_loss_png(summary, out / LOSS_PNG)
    summary["wall_seconds_this_run"] = round(time.perf_counter() - t0, 3)
    storage.write_json_atomic(out / SUMMARY, summary)  # last: its presence means the run is done
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    return summary


def _write_adapter(model: Any, out: Path) -> None:
    """Save the adapter into a staging folder, then move its files to the top of `out` (each an
    atomic rename); an earlier adapter's files are replaced, never mixed."""
    staging = out / f".adapter-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging), safe_serialization=True)
    storage.fsync_tree(staging)
    for p in sorted(staging.iterdir(), key=lambda p: p.name == ADAPTER_CONFIG):  # the config last
        if p.is_file():
            os.replace(p, out / p.name)
    storage.fsync_dir(out)
    shutil.rmtree(staging, ignore_errors=True)


def write_loss_png(summary: dict[str, Any], path: Path) -> None:
    """The training loss per step and the eval loss per epoch, as a PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    curve = summary["loss_curve"]
    ax.plot([p["step"] for p in curve], [p["loss"] for p in curve], label="train loss (per step)", linewidth=1.2)
    steps_per_epoch = summary["steps"] / summary["epochs"] if summary["epochs"] else None
    evals = summary["eval_loss_per_epoch"]
    if evals and steps_per_epoch:
        ax.plot([e["epoch"] * steps_per_epoch for e in evals], [e["eval_loss"] for e in evals], "o-",
                label="eval loss (held-out pairs, per epoch)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (response tokens)")
    ax.set_title(f"LoRA SFT of {summary['base_model']['id']} on {summary['dataset']['train_pairs']} pairs")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    storage.write_bytes_atomic(path, buf.getvalue())


def read_summary(adapter_dir: str | Path) -> dict[str, Any]:
    """The training_summary.json of a finished SFT output folder.

    Raises:
        InputError: the folder holds no finished adapter.
    """
    d = Path(adapter_dir)
    path = d / SUMMARY
    if not (d / ADAPTER_CONFIG).is_file() or not path.is_file():
        raise InputError(f"no finished adapter in {d}", file=str(path), field="--adapter",
                         expected="the --output folder of a finished python -m flows.sft run (adapter_config.json and "
                                  "training_summary.json)", fix="let the SFT run finish (rerun its command to resume it)")
    try:
        summary = storage.read_json(path)
        summary["base_model"]["model_config"]
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError("training_summary.json is unreadable or lacks base_model.model_config", file=str(path),
                         field="base_model", expected="the summary flows.sft writes", fix="rerun the SFT") from None
    return summary
