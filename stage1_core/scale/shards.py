"""Shard files of a scale run and the manifest that makes a shard count as done.

A shard `i` lives in `DIR/shards/`:
    shard-0000i.jsonl               kept pairs (the dataset rows of this shard, before the merge)
    shard-0000i.rejected.jsonl      every item the shard dropped, with phase and reason
    shard-0000i.completions.jsonl   every response completion (raw text, stop reason) for QC
    shard-0000i.manifest.json       written last: rows and sha256 of each file, identity, timings
Each file is written atomically; the manifest only after all three. A shard counts as done only
when its manifest parses, names this run identity, shard index and seed, and every file it lists
exists with the recorded sha256 and row count (`valid_manifest`). Anything less is redone from
scratch; a done shard is never recomputed.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from stage1_core.infra import faults, jsonl, provenance, storage
from pydantic import ValidationError

from stage1_core.phases.plans import FileRef
from stage1_core.scale.settings import ScalePlan, ShardManifest

SHARDS_DIR = "shards"
FILES = ("data", "rejected", "completions")


def stem(index: int) -> str:
    """`shard-00007` for index 7."""
    return f"shard-{index:05d}"


def paths(out: str | Path, index: int) -> dict[str, Path]:
    """Every path of shard `index` in output folder `out` (data, rejected, completions, manifest,
    work: the shard's scratch folder, lock: its per-shard lock file)."""
    base = Path(out) / SHARDS_DIR / stem(index)
    return {"data": base.with_name(f"{base.name}.jsonl"), "rejected": base.with_name(f"{base.name}.rejected.jsonl"),
            "completions": base.with_name(f"{base.name}.completions.jsonl"),
            "manifest": base.with_name(f"{base.name}.manifest.json"), "work": base.with_name(f"{base.name}.work"),
            "lock": base.with_name(f"{base.name}.lock")}


def expected(plan: ScalePlan, index: int) -> dict[str, Any]:
    """What a valid manifest of shard `index` must record for this plan (ShardManifest fields)."""
    shard = plan.shards[index]
    return {"shard": index, "shard_seed": shard.seed, "size": shard.size, "identity": plan.identity}


def this_attempt(attempt: int, **extra: Any) -> dict[str, Any]:
    """The record of the attempt computing a shard in this process, for its manifest's `attempts`:
    `attempt` (from 1), `host`, `pid`, `cuda_visible_devices` (the GPU its worker is pinned to; None
    when unset), `started`, and `extra` (the flow run's id and name under a deployment)."""
    return {"attempt": attempt, **extra, "host": socket.gethostname(), "pid": os.getpid(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "started": provenance.utc_now()}


def write(out: str | Path, index: int, rows: list[dict[str, Any]], rejected: list[dict[str, Any]],
          completions: list[dict[str, Any]], info: ShardManifest) -> ShardManifest:
    """Write a shard's three files, then its manifest (last). Returns the manifest.

    Args:
        out: the run's output folder.
        index: the shard index.
        rows, rejected, completions: the shard's kept pairs, dropped items and response completions.
        info: the manifest but its `files`, which this fills in.
    """
    p = paths(out, index)
    p["manifest"].unlink(missing_ok=True)  # a stale manifest must never vouch for new files
    for name, data in zip(FILES, (rows, rejected, completions)):
        storage.write_jsonl_atomic(p[name], data)
    faults.maybe_fault("shard_write", stem(index))
    files = {name: FileRef.of(p[name], n).model_copy(update={"path": p[name].name})
             for name, n in zip(FILES, (len(rows), len(rejected), len(completions)))}
    manifest = info.model_copy(update={"files": files})
    storage.write_json_atomic(p["manifest"], manifest.model_dump(mode="json"))
    return manifest


def valid_manifest(out: str | Path, plan: ScalePlan, index: int) -> ShardManifest | None:
    """The manifest of shard `index` if the shard is complete for this plan, else None.

    Complete: the manifest parses, records the expected identity, index, seed and size, and every
    file it lists exists next to it with the recorded sha256 and row count.
    """
    p = paths(out, index)
    try:
        manifest = ShardManifest.model_validate(storage.read_json(p["manifest"]))
    except (OSError, ValueError, ValidationError):
        return None
    if any(getattr(manifest, k) != v for k, v in expected(plan, index).items()):
        return None
    if set(manifest.files) != set(FILES):
        return None
    for rec in manifest.files.values():
        f = p["manifest"].parent / rec.path
        if not f.is_file():
            return None
        actual = storage.file_manifest(f)
        if (actual["sha256"], actual["rows"]) != (rec.sha256, rec.rows):
            return None
    return manifest


def read(out: str | Path, manifest: ShardManifest, name: str) -> list[dict[str, Any]]:
    """Rows of one of a shard's files (`data`, `rejected`, `completions`)."""
    return jsonl.read_rows(Path(out) / SHARDS_DIR / manifest.files[name].path)
