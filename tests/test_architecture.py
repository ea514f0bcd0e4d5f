"""The tree imports one way: cli → protocols → methods → features → {data, models} → {io, metrics} → errors.

Read from the source with ``ast``, so every import counts: module top, inside functions, under TYPE_CHECKING.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "fewclip"

#: floor of each top-level part of the package; a module may import its own part and the floors below it
FLOORS = {
    "errors": 0,
    "io": 1,
    "hashing": 1,
    "metrics": 1,
    "progress": 1,
    "data": 2,
    "models": 2,
    "features": 3,
    "generation": 3,
    "methods": 4,
    "protocols": 5,
    "cli": 6,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def is_package(name: str) -> bool:
    return (SRC.parent / name.replace(".", "/") / "__init__.py").is_file()


def imported(name: str, node: ast.AST, known: dict[str, Path]) -> list[str]:
    """The fewclip modules an import statement in module ``name`` loads."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "fewclip"]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        anchor = name.split(".") if is_package(name) else name.split(".")[:-1]
        base = ".".join(anchor[: len(anchor) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    if base.split(".")[0] != "fewclip":
        return []
    submodules = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
    if len(submodules) == len(node.names):  # ``from . import methods``: the submodules are what is loaded
        return submodules
    return [base, *submodules]


def part(module: str) -> str | None:
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else None


def test_every_import_points_down_the_floors():
    known = modules()
    wrong = []
    for name, path in known.items():
        source = part(name)
        if source not in FLOORS:
            continue  # fewclip/__init__.py and __main__.py
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            for target in imported(name, node, known):
                dest = part(target)
                if dest is None or dest == source or dest not in FLOORS:
                    continue
                if FLOORS[dest] >= FLOORS[source]:
                    wrong.append(f"{path.relative_to(SRC)}:{node.lineno} imports {target}")
    assert wrong == [], "imports that point up (or sideways):\n" + "\n".join(wrong)


def test_module_imports_have_no_cycles():
    """Not even through imports inside functions: a cycle means a definition sits in the wrong module."""
    known = modules()
    graph = {
        name: {
            target
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            for target in imported(name, node, known)
            if target in known and target != name
        }
        for name, path in known.items()
    }
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert cycles == [], "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["fit", "--help"]])
def test_help_does_not_import_torch(argv):
    code = (
        "import sys\n"
        "from fewclip.cli.main import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: fewclip" in done.stdout
