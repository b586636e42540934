"""The package's import graph: no cycles, and the Triton code depends on nothing above it.

Parsed from the source (every ``import`` and ``from ... import``, at any depth, including those
inside functions), so a lazy import counts as much as a top-level one."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "eplb_triton"
KERNELS = ROOT / "kernels"  # installed as eplb_triton.kernels


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in KERNELS.rglob("*.py"):
        parts = ("eplb_triton", "kernels", *path.relative_to(KERNELS).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level:
        base = base[: len(base) - (level - 1)]
        return ".".join([*base, name] if name else base)
    return name or ""


def import_graph() -> dict[str, set[str]]:
    """``module -> modules of the package it imports`` (a ``from x import y`` of a submodule ``y``
    counts as importing ``x.y``, not ``x``: the package's ``__init__`` runs first in any case)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(module, is_package, node.level, node.module)
                # a submodule imported by name depends on it; any other name on the module it is in
                names = [f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names]
            else:
                continue
            for name in names:
                # the longest package module that the name starts with
                while name and name not in modules:
                    name = name.rpartition(".")[0]
                if name and name != module:
                    deps.add(name)
        graph[module] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph, as the modules along it, or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_kernels_import_nothing_above_them():
    graph = import_graph()
    bad = {
        m: sorted(d for d in deps if not d.startswith("eplb_triton.kernels"))
        for m, deps in graph.items()
        if m.startswith("eplb_triton.kernels")
    }
    assert not {m: d for m, d in bad.items() if d}, bad


def test_only_launch_imports_the_kernels():
    # one import of the Triton code: eplb_triton.launch (the kernels' launch policy)
    importers = {m for m, deps in import_graph().items() if any(d.startswith("eplb_triton.kernels") for d in deps)}
    assert {m for m in importers if not m.startswith("eplb_triton.kernels")} == {"eplb_triton.launch"}


def test_the_checks_can_fail():
    # a cycle and a kernel importing the package are found in a made-up graph
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    graph = import_graph()
    assert "eplb_triton.launch" in graph["eplb_triton.backends"]
    assert "eplb_triton.kernels._rebalance" in graph["eplb_triton.kernels.rebalance"]
