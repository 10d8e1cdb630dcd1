"""Check that .venv holds exactly the lock: every package of requirements/lock.txt at its version,
torch at requirements/torch.txt's version (any build), nothing else but torch's CUDA libraries, the
`gpu` extra (requirements/gpu.lock) when installed, pip itself and this project.

Run it: `.venv/bin/python scripts/check_lock.py` (scripts/setup.sh does, last). Exit 0 when the venv
equals the lock, 1 with the differences listed otherwise.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)", re.M)
TORCH_BUILD_LIBS = re.compile(r"^(nvidia-.*|cuda-.*|triton)$")
ALWAYS = {"pip", "stage1"}


def norm(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path) -> dict[str, str]:
    """{normalised name: version} of a requirements file's `name==version` lines."""
    if not path.is_file():
        return {}
    return {norm(n): v for n, v in PIN.findall(path.read_text(encoding="utf-8"))}


def main() -> int:
    lock = pins(ROOT / "requirements" / "lock.txt")
    torch = pins(ROOT / "requirements" / "torch.txt")
    gpu = pins(ROOT / "requirements" / "gpu.lock")
    installed = {norm(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    problems = []
    for name, version in sorted(lock.items()):
        got = installed.get(name)
        if got != version:
            problems.append(f"{name}: lock {version}, installed {got or 'nothing'}")
    for name, version in torch.items():
        got = installed.get(name)
        if got is None or got.split("+")[0] != version:
            problems.append(f"{name}: requirements/torch.txt {version}, installed {got or 'nothing'}")
    for name, got in sorted(installed.items()):
        if name in lock or name in torch or name in ALWAYS or TORCH_BUILD_LIBS.match(name):
            continue
        if name in gpu and gpu[name] == got:
            continue
        problems.append(f"{name}=={got}: installed but not in the lock")
    digest = hashlib.sha256((ROOT / "requirements" / "lock.txt").read_bytes()).hexdigest()[:16]
    if problems:
        print(f"stage1: .venv differs from requirements/lock.txt (sha256 {digest}):", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        print("  fix: rerun bash scripts/setup.sh in a fresh venv (rm -rf .venv), or update the lock on purpose "
              "with bash scripts/lock.sh", file=sys.stderr)
        return 1
    print(f"stage1: .venv equals the lock ({len(lock)} packages, requirements/lock.txt sha256 {digest})",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
