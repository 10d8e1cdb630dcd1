"""The house rules of stage1_core (../STYLE.md, issue 21), read from the source: no prefect anywhere;
packages layered infra < model < phases < scale < train < cli with every import pointing down; the
model stack reached from outside only through its facade; no private name imported across packages; no
command line inside a library module; no import cycle; no file over 500 lines; tasks stay thin."""

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CORE = REPO / "stage1_core"
LAYERS = ("infra", "model", "phases", "scale", "train", "cli")
MAX_LINES = 500
# Files still over the limit while issue 21 splits them: none may grow, and each leaves this table
# when it is split. The table must end empty.
NOT_YET_SPLIT = {
}


def modules() -> dict[str, Path]:
    """Every stage1_core module, dotted relative to the package ("phases.qc"; a package is its __init__)."""
    out = {}
    for path in sorted(CORE.rglob("*.py")):
        rel = path.relative_to(CORE).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out[".".join(parts)] = path
    return out


def imports(path: Path) -> list[tuple[str, str, int]]:
    """(imported stage1_core module, imported name or "", line) for every import in the file, at any depth."""
    mods = modules()
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("stage1_core"):
            base = node.module[len("stage1_core") + 1:]
            for a in node.names:
                sub = f"{base}.{a.name}" if base else a.name
                out.append((sub, "", node.lineno) if sub in mods else (base, a.name, node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name[len("stage1_core") + 1:], "", node.lineno) for a in node.names
                    if a.name.startswith("stage1_core.")]
    return out


def package(module: str) -> str:
    return module.split(".")[0]


def test_every_module_lives_in_a_layer_package():
    stray = [m for m in modules() if m and package(m) not in LAYERS]
    assert not stray, f"modules outside the area packages {LAYERS}: {stray}"


def test_imports_point_down_the_layers():
    bad = []
    for mod, path in modules().items():
        if not mod:
            continue
        here = LAYERS.index(package(mod))
        for target, _, line in imports(path):
            if target and LAYERS.index(package(target)) > here:
                bad.append(f"{path.relative_to(REPO)}:{line} imports stage1_core.{target} (a layer above)")
    assert not bad, "\n".join(bad)


def test_the_model_stack_is_reached_through_its_facade_and_no_private_name_crosses_a_package():
    bad = []
    for mod, path in modules().items():
        for target, name, line in imports(path):
            if not target or package(target) == package(mod):
                continue
            if package(target) == "model" and target != "model":
                bad.append(f"{path.relative_to(REPO)}:{line} imports stage1_core.{target}: use stage1_core.model")
            if name.startswith("_") or target.rsplit(".", 1)[-1].startswith("_"):
                bad.append(f"{path.relative_to(REPO)}:{line} imports the private {target}.{name} across packages")
    assert not bad, "\n".join(bad)


def test_library_modules_hold_no_command_line():
    bad = [str(p.relative_to(REPO)) for m, p in modules().items() if package(m) != "cli"
           and ('if __name__ == "__main__"' in p.read_text() or "\ndef main(" in p.read_text())]
    assert not bad, f"command lines belong in stage1_core/cli: {bad}"


def test_no_import_cycle_between_modules():
    """Counting imports inside functions too: a lazy import still closes a cycle."""
    mods = modules()
    graph = {m: {t for t, _, _ in imports(p) if t and t != m} for m, p in mods.items()}
    # importing a.b also runs the package a: a submodule depends on its package's __init__, except
    # that a package's own __init__ importing its submodules is not a cycle back to itself.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_core_file_is_over_500_lines():
    big = {p.relative_to(CORE).as_posix(): n for p in CORE.rglob("*.py")
           if (n := len(p.read_text().splitlines())) > MAX_LINES}
    grown = {f: n for f, n in big.items() if n > NOT_YET_SPLIT.get(f, MAX_LINES)}
    assert not grown, f"files over {MAX_LINES} lines: {grown}"
    assert set(big) == set(NOT_YET_SPLIT), f"split: remove from NOT_YET_SPLIT {set(NOT_YET_SPLIT) - set(big)}"


def test_core_source_never_imports_prefect():
    paths = sorted(CORE.rglob("*.py"))
    assert len(paths) > 30
    for path in paths:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "prefect" or n.startswith("prefect.") for n in names), f"{path.name} imports prefect"


def test_importing_every_core_module_loads_no_prefect():
    mods = [m for m in modules() if m]
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
