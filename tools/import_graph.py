"""The import graph of the ``retain`` package and its floors (the architecture rule, checked in CI).

Every module sits on a floor; a module may import only modules on its own floor or below, and no
group of modules may import each other in a circle; no module but ``retain/__init__.py`` imports
the package root. Every import counts, also those inside functions and under TYPE_CHECKING.

    python tools/import_graph.py            # prints the floors, the edges that break a rule; exit 1 if any
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "retain"
# Highest floor first. A module's floor is that of the longest prefix listed here.
FLOORS: list[tuple[str, list[str]]] = [
    ("entry points", ["retain.cli", "retain.tune", "retain.tune_worker", "retain.benchmark", "retain.benchmark_flags",
                      "retain.benchmark_recipes"]),
    ("methods", ["retain.methods"]),
    ("updaters", ["retain.updaters", "retain.checkpoint"]),
    ("learners", ["retain.learners", "retain.evaluation"]),
    ("parts", ["retain.memory", "retain.models", "retain.state", "retain.data", "retain.batching", "retain.options",
               "retain.chunks", "retain.val_history", "retain.nested", "retain.version", "retain._fast_start"]),
]  # fmt: skip


def modules(src: Path = SRC) -> dict[str, Path]:
    out = {}
    for path in (src / PACKAGE).rglob("*.py"):
        rel = path.relative_to(src).with_suffix("")
        out[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> tuple[set[str], bool]:
    """(modules of the package that ``name`` imports, whether it imports the package root)."""
    found, root = set(), False
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".") if is_package else name.split(".")[:-1]
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for target in targets:
            if target == PACKAGE and name != PACKAGE:
                root = True
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target not in (name, PACKAGE):
                found.add(target)
    return found, root


def floor_of(name: str) -> int:
    """0 for the top floor; the package root itself is above every floor."""
    best, floor = -1, None
    for i, (_, prefixes) in enumerate(FLOORS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, floor = len(prefix), i
    if floor is None:
        raise SystemExit(f"{name} has no floor in tools/import_graph.py FLOORS: put it on one")
    return floor


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def problems(src: Path = SRC) -> list[str]:
    """Every broken rule, one line each (empty when the package keeps them all)."""
    known = modules(src)
    edges: dict[str, set[str]] = {}
    found = []
    for name, path in sorted(known.items()):
        edges[name], root = imports(name, path, known)
        if root:
            found.append(f"imports the package root: {name}")
    for group in circles(edges):
        found.append("circle: " + " <-> ".join(group))
    for name in sorted(edges):
        if name == PACKAGE:
            continue
        for target in sorted(edges[name]):
            if floor_of(target) < floor_of(name):
                found.append(
                    f"imports a higher floor: {name} ({FLOORS[floor_of(name)][0]}) -> {target} "
                    f"({FLOORS[floor_of(target)][0]})"
                )
    return found


def main() -> int:
    for name, prefixes in FLOORS:
        print(f"{name:>13}: {', '.join(prefixes)}")
    found = problems()
    print("\n".join(found) if found else f"{len(FLOORS)} floors, no circle, no import of a higher floor or the root")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
