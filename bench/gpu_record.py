"""What the GPU step scripts (bench/gpu_smoke.sh, bench/gpu_eval_judge.sh) record besides their own
fields: each step's exit code and seconds (from WORK/steps.tsv, written by bench/gpu_steps.sh), the
lock's sha256, Python, the GPU and package versions; and the record's atomic write."""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import platform
from pathlib import Path
from typing import Any


def version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def load(path: str | Path) -> Any:
    """A JSON file's content, or None when it is missing or unreadable (a step that failed)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def steps(work: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for line in (work / "steps.tsv").read_text().splitlines():
        name, rc, ms = line.split("\t")
        out[name] = {"exit_code": int(rc), "seconds": round(int(ms) / 1000, 1)}
    return out


def environment(packages: tuple[str, ...]) -> dict[str, Any]:
    import torch

    return {"lock_sha256": hashlib.sha256(Path("requirements/lock.txt").read_bytes()).hexdigest(),
            "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "packages": {d: version(d) for d in packages}}


def write(result: Path, rec: dict[str, Any]) -> None:
    result.parent.mkdir(parents=True, exist_ok=True)
    tmp = result.with_name(result.name + ".tmp")
    tmp.write_text(json.dumps(rec, indent=1))
    os.replace(tmp, result)
    print(json.dumps(rec, indent=1))
