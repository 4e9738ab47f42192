"""The package's shape: one-way dependencies between its modules, none over ~400 lines."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fishdip_peft"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def internal_imports(module: str) -> dict[str, bool]:
    """The package modules `module` imports, each with whether the import is inside a function."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found: dict[str, bool] = {}

    def visit(node, nested: bool):
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom) and child.level == 1:
                names = [child.module] if child.module else [alias.name for alias in child.names]
                for name in names:
                    found[name.split(".")[0]] = found.get(name.split(".")[0], False) or inner
            visit(child, inner)

    visit(tree, False)
    return {name: nested for name, nested in found.items() if name in MODULES}


def test_module_dependencies_are_acyclic_and_at_the_top():
    graph = {module: internal_imports(module) for module in MODULES}
    nested = {m: [d for d, inner in deps.items() if inner] for m, deps in graph.items()}
    assert not {m: d for m, d in nested.items() if d and m != "trainer"}, "imports hidden in functions"
    state: dict[str, str] = {}

    def walk(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dependency in graph[module]:
            assert state.get(dependency) != "open", f"import cycle: {' -> '.join(path + [dependency])}"
            if dependency not in state:
                walk(dependency, path + [dependency])
        state[module] = "done"

    for module in MODULES:
        if module not in state:
            walk(module, [module])


def test_every_module_imports_on_its_own():
    """Each module imported first, into an interpreter where no fishdip_peft module is loaded yet
    (one interpreter for all, clearing the package between modules: torch stays loaded)."""
    script = (
        "import importlib, sys\n"
        f"for module in {MODULES!r}:\n"
        "    for name in [n for n in sys.modules if n.split('.')[0] == 'fishdip_peft']:\n"
        "        del sys.modules[name]\n"
        "    importlib.import_module('fishdip_peft.' + module)\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=PACKAGE.parent)


def test_no_module_over_about_400_lines():
    lengths = {m: len((PACKAGE / f"{m}.py").read_text().splitlines()) for m in MODULES}
    assert {m: n for m, n in lengths.items() if n > 420} == {}
