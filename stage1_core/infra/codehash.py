"""Which project modules a function's code depends on, computed from the source (no import runs).

A phase's cache key hashes the source of every `stage1_core` module its function can reach:
the modules the function (and the same-module helpers it calls) names, then every module those
import, at top level or inside a function, transitively. A helper module added on a phase's path,
or a module split in two, is in the key without anyone listing it; a module the phase cannot reach
is not, so editing it keeps the phase's cache.

    from stage1_core.infra import codehash
    codehash.function_modules(CORE_DIR, "pipeline", "filter_pairs")  # {"pipeline", "critic", ...}
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

PACKAGE = "stage1_core"


def module_path(root: Path, module: str) -> Path | None:
    """The file of a project module named relative to the package root ("phases.pipeline" ->
    root/phases/pipeline.py; a package "model" -> root/model/__init__.py), or None."""
    base = root.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


@functools.lru_cache(maxsize=512)
def _parse(path: Path, mtime_ns: int) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _tree(root: Path, module: str) -> ast.Module | None:
    path = module_path(root, module)
    if path is None:
        return None
    return _parse(path, path.stat().st_mtime_ns)


def _with_parents(module: str) -> list[str]:
    """Importing "a.b.c" runs the packages "a" and "a.b" first: each is part of what it depends on."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _bindings(node: ast.AST, root: Path) -> dict[str, str]:
    """Names bound to project modules by the imports directly under `node`'s walk: local name -> module
    (for `from stage1_core.a.m import f`, f -> "a.m"; for `from stage1_core.a import m` where m is a
    module, m -> "a.m")."""
    out: dict[str, str] = {}
    for n in ast.walk(node):
        if isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
            if n.module != PACKAGE and not n.module.startswith(PACKAGE + "."):
                continue
            base = n.module[len(PACKAGE) + 1:]
            for a in n.names:
                sub = f"{base}.{a.name}" if base else a.name
                if module_path(root, sub) is not None:
                    out[a.asname or a.name] = sub
                elif base:
                    out[a.asname or a.name] = base
        elif isinstance(n, ast.Import):
            for a in n.names:
                if a.name.startswith(PACKAGE + "."):
                    out[a.asname or a.name.split(".")[0]] = a.name[len(PACKAGE) + 1:]
    return out


def module_imports(root: Path, module: str) -> set[str]:
    """Project modules `module` imports anywhere in its source (top level and inside functions)."""
    tree = _tree(root, module)
    if tree is None:
        return set()
    return {p for m in _bindings(tree, root).values() for p in _with_parents(m)}


def closure(root: Path, modules: set[str]) -> set[str]:
    """`modules` and every project module they import, transitively."""
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(module_imports(root, m) - seen)
    return seen


def function_modules(root: Path, module: str, function: str) -> set[str]:
    """The project modules `module.function` can reach: `module` itself, the modules named in the
    function and in the same-module functions it calls (followed transitively), and their import
    closure.

    Raises:
        KeyError: `module` has no top-level function `function`.
    """
    tree = _tree(root, module)
    functions = {n.name: n for n in (tree.body if tree else []) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    if function not in functions:
        raise KeyError(f"{module}.{function} is not a top-level function")
    top = _bindings(ast.Module(body=[n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))],
                               type_ignores=[]), root)
    reached: set[str] = set()
    seen: set[str] = set()
    todo = [function]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        body = functions[name]
        reached.update(_bindings(body, root).values())  # imports inside the function
        for n in ast.walk(body):
            if isinstance(n, ast.Name):
                if n.id in top:
                    reached.add(top[n.id])
                elif n.id in functions and n.id not in seen:
                    todo.append(n.id)
    # `module` itself is hashed whole, but only what the function reaches is followed: the other
    # functions of a module (the qc phase beside the generation phases) do not pull their imports in.
    reached = {p for m in reached for p in _with_parents(m)}
    return {module} | closure(root, reached - {module})
