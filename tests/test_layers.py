"""The package layers: `core` shared by every method, `sisa` and `erase` side by side, `cluster`
composing them. Checked on the source (every import statement, function-level ones included),
so a lazy import cannot hide a circle or a cross-method dependency."""
from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("core", "sisa", "erase", "cluster")
# which top-level packages each may import (itself included)
ALLOWED = {
    "core": {"core"},
    "sisa": {"core", "sisa"},
    "erase": {"core", "erase"},
    "cluster": {"core", "sisa", "erase", "cluster"},
}


def _modules() -> dict[str, str]:
    out = {}
    for pkg in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].split(os.sep)
                    if rel[-1] == "__init__":
                        rel = rel[:-1]
                    out[".".join(rel)] = os.path.join(folder, f)
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (a `from pkg import name` counts as
    pkg.name when that is a module, else as pkg)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_pkg = path.endswith("__init__.py")
        package = name if is_pkg else name.rpartition(".")[0]
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        deps: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    deps.add(t)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_lazy_and_relative_imports():
    g = import_graph()
    assert "core.records" in g["core.sources"]  # a relative import
    assert "core.determinism" in g["erase.embed"]  # an import inside a function
    assert "core" in g["sisa"]


def test_methods_never_import_each_other_and_core_imports_no_method():
    bad = [f"{m} imports {d}" for m, deps in import_graph().items() for d in deps
           if d.split(".")[0] not in ALLOWED[m.split(".")[0]]]
    assert not bad, "\n".join(bad)


def test_no_import_circle():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_demo_script_imports_what_exists():
    """deploy/demo.sh runs Python inline; a moved module would break `make demo` only."""
    import importlib
    import re

    with open(os.path.join(ROOT, "deploy", "demo.sh"), encoding="utf-8") as f:
        found = re.findall(r"^from ([\w.]+) import ([\w, ]+)$", f.read(), re.M)
    assert found
    for module, names in found:
        m = importlib.import_module(module)
        for name in names.split(","):
            assert hasattr(m, name.strip()), f"deploy/demo.sh: {module} has no {name.strip()}"
