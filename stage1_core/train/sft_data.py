"""What SFT reads from a finished pilot or scale run: its gate, model and data file (`read_run`), the
pairs through the hardened JSONL reader (`read_pairs`), and the deterministic held-out split
(`split_pairs`). Used by `sft.prepare_sft` and `sft.train`.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Literal, Sequence

from stage1_core.infra import storage
from stage1_core.infra.config import ModelConfig, validate_pilot_config
from stage1_core.infra.errors import InputError
from stage1_core.infra.jsonl import JsonlKind, read_jsonl, require_string
from stage1_core.infra.settings import read_yaml_mapping
from stage1_core.phases.plans import Record

RUN_DATA_FILES = {"pilot": "pilot_data.jsonl", "scale": "scale_data.jsonl"}


class RunSource(Record):
    """The finished pilot or scale run SFT trains on (`read_run`)."""

    path: str
    kind: Literal["pilot", "scale"]
    decision: str
    """The gate's word."""
    reasons: list[str]
    forced: bool
    data: str
    """Its data file (pilot_data.jsonl or scale_data.jsonl)."""
    data_sha256: str
    model: ModelConfig
    run_id: str | None = None


def read_run(run_dir: str | Path, force: bool = False) -> RunSource:
    """What SFT needs from a finished pilot or scale folder: its gate, data file and model.

    Args:
        run_dir: the pilot's or scale run's --output folder.
        force: train even though the gate did not say scale (recorded as forced).
    Returns:
        The run: its folder, kind, gate, data file and its sha256, and its model.
    Raises:
        InputError: not a finished run folder, or its gate did not say scale (unless `force`).
    """
    d = Path(run_dir)
    where = {"field": "--data", "expected": "the output folder of a finished pilot or scale run"}
    if not d.is_dir():
        raise InputError(f"run folder not found: {d}", file=str(d), fix="pass the pilot's or scale run's --output folder",
                         **where)
    manifest_path = d / "session_manifest.json"
    kind = next((k for k, name in RUN_DATA_FILES.items() if (d / name).is_file()), None)
    try:
        manifest = storage.read_json(manifest_path)
        gate = manifest["decision"] if kind == "pilot" else manifest["qc"]["decision"]
        decision = gate["decision"]
    except (OSError, ValueError, KeyError, TypeError):
        kind = None
    if kind is None:
        raise InputError("not a finished run: session_manifest.json or the data file (pilot_data.jsonl / "
                         "scale_data.jsonl) is missing or incomplete", file=str(manifest_path),
                         fix="let the run finish (rerun its command to resume it), then train on it", **where)
    if decision != "scale" and not force:
        reasons = "; ".join(str(r) for r in (gate.get("reasons") or [])[:3])
        raise InputError(f"the run's gate said '{decision}', not 'scale'" + (f" ({reasons})" if reasons else ""),
                         file=str(manifest_path), field="decision", expected="a run whose gate said scale",
                         fix="iterate until the gate says scale, or pass --force to train anyway "
                             "(recorded as forced: true in training_summary.json)")
    cfg_path = d / "config.yaml"
    data, node = read_yaml_mapping(cfg_path)
    data.pop("scale", None)
    model = validate_pilot_config(data, str(cfg_path), node).model
    data_path = d / RUN_DATA_FILES[kind]
    return RunSource(path=str(d.resolve()), kind=kind, decision=decision, reasons=list(gate.get("reasons") or []),
                     forced=decision != "scale", data=str(data_path.resolve()), data_sha256=storage.sha256_file(data_path),
                     model=model, run_id=manifest.get("run_id"))


SFT_DATA = JsonlKind(item="SFT data", example='{"id": "p1", "instruction": "Name a fruit.", "response": "An apple."}',
                     missing_fix="pass a finished pilot or scale run folder (its pilot_data.jsonl / scale_data.jsonl)",
                     empty_fix="use the run's own data file (it is written atomically), or rerun the run")
"""How errors name an SFT data file (stage1_core.infra.jsonl reads it)."""


def read_pairs(path: str | Path) -> list[dict[str, str]]:
    """The (id, instruction, response) of every row of a run's data file, through the hardened reader
    (stage1_core.infra.jsonl: bad UTF-8, over-long lines, repeated keys, invalid JSON are errors naming the line).

    Raises:
        InputError: a reader error, or a row without a non-empty instruction or response (naming
            file, line and field); fewer than 2 rows (one is held out for the eval loss).
    """
    rows: list[dict[str, str]] = []
    name = str(path)
    for n, row in read_jsonl(path, SFT_DATA):
        instruction = require_string(row, "instruction", name, n, SFT_DATA)
        response = require_string(row, "response", name, n, SFT_DATA)
        rows.append({"id": str(row.get("id", f"line-{n}")), "instruction": instruction, "response": response})
    if len(rows) < 2:
        raise InputError(f"{len(rows)} pairs: SFT needs at least 2 (one is held out for the eval loss)", file=str(path),
                         expected="a run that kept 2 or more pairs", fix="run a larger pilot (--count)")
    return rows


def split_pairs(rows: Sequence[dict[str, str]], eval_fraction: float, seed: int) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Deterministic held-out split: rows ordered by sha256(seed, id); the first ceil(fraction * n)
    (at least 1, at most n - 1) are the eval slice. Returns (train, eval), each in file order."""
    n_eval = min(len(rows) - 1, max(1, math.ceil(eval_fraction * len(rows))))
    ranked = sorted(range(len(rows)), key=lambda i: hashlib.sha256(f"{seed}:{rows[i]['id']}:{i}".encode()).hexdigest())
    held = set(ranked[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]
