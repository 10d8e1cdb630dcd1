"""The SFT trainer's parts: a transformers Trainer whose checkpoints appear whole or not at all (each
written under `.staging-<pid>/` and published with `storage.publish_dir`), the list of finished
checkpoints a resume starts from, and the per-step callback (progress, fault points). Used by `sft.train`.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from stage1_core.infra import faults, storage

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def complete_checkpoints(folder: str | Path) -> list[Path]:
    """The `checkpoint-N` folders under `folder`, oldest step first. Only renamed (finished) ones
    carry that name: a checkpoint is written under `.staging-<pid>/` and renamed when complete."""
    d = Path(folder)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found)]


def atomic_trainer_class() -> type:
    """A transformers Trainer whose checkpoints appear whole or not at all."""
    from transformers import Trainer
    from transformers.trainer_utils import rotate_checkpoints

    class AtomicCheckpointTrainer(Trainer):
        _staging: str | None = None

        def _get_output_dir(self, trial: Any) -> str:
            return self._staging or super()._get_output_dir(trial)

        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            root = Path(self.args.output_dir)
            name = f"checkpoint-{self.state.global_step}"
            staging = root / f".staging-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            self._staging = str(staging)
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self._staging = None
            storage.fsync_tree(staging / name)
            faults.maybe_fault("sft_save", name)
            storage.publish_dir(staging / name, root / name)
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(output_dir=str(root), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=None, use_mtime=False)

    return AtomicCheckpointTrainer


def progress_callback(total_steps: Callable[[], int], on_step: Callable[[int, int, dict[str, float]], None] | None) -> Any:
    from transformers import TrainerCallback

    class StepCallback(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            faults.maybe_fault("sft_step", str(state.global_step))

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
            if on_step is not None and logs and "loss" in logs:
                on_step(state.global_step, state.max_steps, logs)

    return StepCallback()
