"""Imports point one way: no module of ``beit`` or ``beit_kernels`` imports, directly or through others, a module
that imports it back, function-level imports included (a cycle there only waits for the call that closes it).
``beit_kernels`` never imports ``beit``.

The graph is read from the sources (every ``import`` and ``from ... import`` anywhere in a module, not only those
that ran), with ``from package import name`` an edge to ``package.name`` where that is a module, else to the
package's ``__init__``.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"beit": ROOT / "beit", "beit_kernels": ROOT / "kernels" / "beit_kernels"}


def modules() -> dict[str, Path]:
    found = {}
    for pkg, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((pkg, *parts))] = path
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolved against this module's package
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in mods else module for a in node.names]
            for t in targets:
                # The nearest module the name lies in: "beit.data.files.X" -> "beit.data.files".
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    graph[name].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n) :] + [n]
            if n not in state and (c := visit(n)):
                return c
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_the_graph_sees_function_level_imports():
    graph = import_graph()
    assert "beit.graphs" in graph["beit.train"]  # imported inside train() only
    assert "beit_kernels.backend" in graph["beit.precision"]


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_beit_kernels_never_imports_beit():
    graph = import_graph()
    offenders = {m: sorted(t for t in ts if t.split(".")[0] == "beit") for m, ts in graph.items()}
    assert {m: t for m, t in offenders.items() if t and m.startswith("beit_kernels")} == {}
