"""The import graph of the packages (every import statement, at module level or inside a function): ``storage`` imports
none of the others, ``zoo`` never imports ``runtime``, ``registry`` imports ``zoo`` only to load the built-ins, and no
two modules import each other, directly or through others."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("storage", "registry", "zoo", "runtime")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            name = ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            out[name] = p
    return out


def import_graph() -> dict[str, set[str]]:
    """``module -> modules it imports`` (``from a.b import c`` names ``a.b.c`` when that is a module, else ``a.b``)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                           for a in node.names]
            else:
                continue
            graph[m] |= {t for t in targets if t in mods and t != m}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop()
                    on.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def _arrows(graph: dict[str, set[str]], src: str, dst: str) -> list[tuple[str, str]]:
    return sorted((a, b) for a, bs in graph.items() for b in bs if a.split(".")[0] == src and b.split(".")[0] == dst)


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_layers_point_down():
    g = import_graph()
    assert _arrows(g, "zoo", "runtime") == []
    for up in ("registry", "zoo", "runtime"):
        assert _arrows(g, "storage", up) == []
    assert _arrows(g, "registry", "runtime") == []
    # registry reaches the zoo only to load the built-ins (``import zoo``), never a component module
    assert {b for _, b in _arrows(g, "registry", "zoo")} <= {"zoo"}
