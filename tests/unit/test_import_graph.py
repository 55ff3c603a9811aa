"""The package's modules import one another without a circle: each can be read (and
loaded) knowing only the modules below it. Every import counts, a function's own and one
under TYPE_CHECKING too: a late import hides a circle, it does not remove it."""

from __future__ import annotations

import ast
from pathlib import Path

import reconciler

PACKAGE = Path(reconciler.__file__).parent


def _graph() -> dict[str, set[str]]:
    modules = {p.stem: p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == "reconciler":
                    deps |= {a.name for a in node.names}
                elif node.module.startswith("reconciler."):
                    deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names
                         if a.name.startswith("reconciler.")}
        graph[name] = (deps & modules.keys()) - {name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One circle of imports (its modules in order, the first repeated at the end), or []."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str]:
        if node in path:
            return [*path[path.index(node):], node]
        if node in done:
            return []
        path.append(node)
        for dep in sorted(graph[node]):
            found = visit(dep)
            if found:
                return found
        path.pop()
        done.add(node)
        return []

    for start in sorted(graph):
        found = visit(start)
        if found:
            return found
    return []


def test_the_graph_is_read_from_the_sources() -> None:
    graph = _graph()
    # A few edges known to exist: an empty graph would pass the next test for nothing.
    assert "pgpool" in graph["jobs_table"]
    assert "jobs_sql" in graph["indexes"]
    assert "metrics" in graph["health"]  # under TYPE_CHECKING
    assert "rq_api" in graph["rq_state"]  # imported inside a function


def test_the_modules_import_one_another_without_a_circle() -> None:
    assert _cycle(_graph()) == []


def test_a_circle_is_found() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
