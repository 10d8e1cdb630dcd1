"""stage1_core never imports prefect (directly or through its imports); tasks stay thin."""

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_core_source_never_imports_prefect():
    for path in sorted((REPO / "stage1_core").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "prefect" or n.startswith("prefect.") for n in names), f"{path.name} imports prefect"


def test_importing_every_core_module_loads_no_prefect():
    mods = [p.stem for p in (REPO / "stage1_core").glob("*.py") if p.stem != "__init__"]
    code = ("import sys\n" + "".join(f"import stage1_core.{m}\n" for m in mods) +
            "bad = [m for m in sys.modules if m == 'prefect' or m.startswith('prefect.')]\n"
            "assert not bad, bad\nprint('ok')")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_tasks_hold_no_domain_logic():
    # Thin wrappers: no model, prompt, filter or QC code in tasks/.
    for path in (REPO / "tasks").glob("*.py"):
        text = path.read_text()
        for forbidden in ("import torch", "transformers", "rouge", "statistics", "build_", "parse_"):
            assert forbidden not in text, f"{path.name} contains {forbidden!r}"
