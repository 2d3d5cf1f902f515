"""The package's layers: pure modules import nothing that does I/O, and no proxy module imports
itself back through another (one-way layers, no cycles)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "proxy"

# Decisions without I/O: these modules must load without any of the I/O libraries.
PURE = [
    "background",
    "cache_entry",
    "cache_memory",
    "cache_policy",
    "chunked",
    "config",
    "config_values",
    "cors",
    "errors",
    "forwarding",
    "jobs",
    "jobstore",
    "limits",
    "outage",
    "overrides",
    "policy",
    "signing",
    "urls",
    "usage",
    "webhooks",
    "ws_policy",
]
IO_LIBRARIES = ["trio", "h11", "httpx", "httpx2", "httpcore", "httpcore2", "coredis", "anyio"]


@pytest.mark.parametrize("module", PURE)
def test_pure_module_loads_no_io_library(module: str) -> None:
    # A fresh interpreter: this test process has imported all of them already.
    code = f"import sys, proxy.{module}\nprint(','.join(sorted(m for m in {IO_LIBRARIES!r} if m in sys.modules)))\n"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=PACKAGE.parent, check=True
    )
    assert result.stdout.strip() == "", f"proxy.{module} loads {result.stdout.strip()}"


def proxy_imports(path: Path) -> set[str]:
    """The proxy modules ``path`` imports, at module level or inside functions (lazy imports count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module is None:  # from . import a, b
                found.update(alias.name for alias in node.names)
            elif node.level == 1:
                found.add(node.module.split(".")[0])
            elif node.module and node.module.startswith("proxy."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("proxy."))
    return found


def import_graph() -> dict[str, set[str]]:
    return {path.stem: proxy_imports(path) - {path.stem} for path in PACKAGE.glob("*.py")}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path of module names (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles_among_proxy_modules() -> None:
    graph = import_graph()
    assert "state" in graph and "config" in graph  # the parser found the package
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_pure_modules_import_only_pure_modules() -> None:
    graph = import_graph()
    for module in PURE:
        assert graph[module] <= set(PURE), f"{module} imports {sorted(graph[module] - set(PURE))}"


def test_the_cycle_finder_finds_a_cycle() -> None:
    # The check above can fail: a graph with a loop through three modules is reported as one.
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
