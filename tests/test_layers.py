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
    "cache.entry",
    "cache.memory",
    "cache.policy",
    "config",
    "config_values",
    "cors",
    "errors",
    "forwarding",
    "http.chunked",
    "http.framing",
    "http.parsers",
    "jobs.background",
    "jobs.model",
    "jobs.store",
    "jobs.webhooks",
    "limits.limiter",
    "limits.budget",
    "limits.budget_spec",
    "limits.outage",
    "overrides",
    "policy",
    "relay.usage",
    "signing",
    "verify",
    "query",
    "telemetry.model",
    "upstream.wire",
    "urls",
    "websocket.policy",
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


def module_name(path: Path) -> str:
    """``proxy/cache/policy.py`` -> ``cache.policy``; a package's ``__init__.py`` is the package."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(importer: str, is_package: bool, level: int, module: str | None) -> str:
    """The absolute name (below ``proxy``) of a relative import in ``importer``."""
    base = importer.split(".") if importer else []
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join([*base, *(module.split(".") if module else [])])


def proxy_imports(path: Path, modules: set[str]) -> dict[str, set[str]]:
    """The proxy modules ``path`` imports (lazy imports inside functions count), each with the
    names taken from it. ``from . import x`` names a module when ``x`` is one."""
    name = module_name(path)
    found: dict[str, set[str]] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                target = resolve(name, path.name == "__init__.py", node.level, node.module)
            elif node.module and (node.module == "proxy" or node.module.startswith("proxy.")):
                target = node.module.removeprefix("proxy").removeprefix(".")
            else:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}" if target else alias.name
                if sub in modules:
                    found.setdefault(sub, set())
                else:
                    found.setdefault(target, set()).add(alias.name)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("proxy."):
                    found.setdefault(a.name.removeprefix("proxy."), set())
    found.pop(name, None)
    return found


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: set(proxy_imports(path, set(modules))) - {""} for name, path in modules.items()}


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
    assert "limits.state" in graph and "config" in graph  # the parser found the package
    assert "limits.limiter" in graph["limits.state"]  # relative imports are resolved
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_pure_modules_import_only_pure_modules() -> None:
    graph = import_graph()
    allowed = set(PURE) | {"", *(name for name in graph if all_modules()[name].name == "__init__.py")}
    for module in PURE:
        assert graph[module] <= allowed, f"{module} imports {sorted(graph[module] - allowed)}"


def package_of(module: str) -> str:
    return module.rpartition(".")[0]


def test_no_module_takes_private_names_from_another_package() -> None:
    # A leading underscore is the package's own business: what two packages share is a public name
    # (``proxy._redis`` is a private module of the whole package, with public names in it).
    modules = all_modules()
    for name, path in modules.items():
        for target, names in proxy_imports(path, set(modules)).items():
            private = sorted(n for n in names if n.startswith("_") and n != "__version__")
            if package_of(target) != package_of(name):
                assert not private, f"{name} imports {private} from {target}"


# proxy.limits has one face (its __init__): the rest of Parkway imports from it, never from the
# modules inside. config and config_values sit below the package (limits.state reads config's
# StateConfig), so they take the pure limits.limiter (and config limits.budget_spec) directly: the
# face would be an import cycle.
FACES = {"limits": {"config": {"limits.limiter", "limits.budget_spec"}, "config_values": {"limits.limiter"}}}


@pytest.mark.parametrize("package", sorted(FACES))
def test_packages_with_a_face_are_imported_through_it(package: str) -> None:
    modules = all_modules()
    for name, path in modules.items():
        if name == package or name.startswith(package + "."):
            continue
        inner = {t for t in proxy_imports(path, set(modules)) if t.startswith(package + ".")}
        assert inner <= FACES[package].get(name, set()), f"{name} imports {sorted(inner)}: use proxy.{package}"


def test_the_limits_face_loads_no_io_library_until_asked() -> None:
    # Lazy: a pure module that imports proxy.limits.limiter runs the face first.
    code = (
        "import sys, proxy.limits as limits\n"
        f"print(','.join(sorted(m for m in {IO_LIBRARIES!r} if m in sys.modules)))\n"
        "from proxy.limits.admission import GlobalGate\n"
        "assert limits.GlobalGate is GlobalGate and 'trio' in sys.modules\n"
        "from proxy.limits import MemoryState, RedisState, StateBackend, open_state\n"
        "assert set(limits.__all__) <= set(dir(limits)) | {'GlobalGate', 'MemoryState', 'RedisState', 'StateBackend', 'open_state', 'BudgetStore', 'MemoryBudgets', 'RedisBudgets', 'budget_report', 'open_budgets'}\n"
        "try:\n    limits.no_such_name\nexcept AttributeError:\n    pass\nelse:\n    raise SystemExit('no AttributeError')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=PACKAGE.parent, check=True
    )
    assert result.stdout.strip() == "", f"proxy.limits loads {result.stdout.strip()}"


# The request path: every step has a signature mypy checks (no ``*args: Any`` seam), and the
# request body is read by one function (proxy.gateway.handler.read_body), nowhere else.
REQUEST_PATH = ["gateway", "relay/client_watch.py", "cache", "jobs/api.py", "websocket", "http/server.py"]


def request_path_files() -> list[Path]:
    files: list[Path] = []
    for part in REQUEST_PATH:
        path = PACKAGE / part
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


def test_no_untyped_variadic_seam_on_the_request_path() -> None:
    for path in request_path_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                for arg in (node.args.vararg, node.args.kwarg):
                    if arg is not None:
                        annotation = ast.unparse(arg.annotation) if arg.annotation else "Any"
                        assert annotation != "Any", f"{path.name}:{node.lineno} {node.name}(*{arg.arg}: Any)"


def test_the_request_body_is_read_in_one_place() -> None:
    readers = []
    for path in request_path_files():
        tree = ast.parse(path.read_text(), str(path))
        for func in ast.walk(tree):
            if isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
                for node in ast.walk(func):
                    call = node.func if isinstance(node, ast.Call) else None
                    if isinstance(call, ast.Attribute) and call.attr == "read_body":
                        readers.append(f"{module_name(path)}.{func.name}")
    assert sorted(set(readers)) == ["gateway.handler.read_body"]


def test_the_import_parser_resolves_relative_imports() -> None:
    assert resolve("cache.redis", False, 2, "limits.outage") == "limits.outage"
    assert resolve("cache.redis", False, 1, "entry") == "cache.entry"
    assert resolve("config", False, 1, "jobs.webhooks") == "jobs.webhooks"
    assert resolve("cache", True, 1, "policy") == "cache.policy"


def test_the_cycle_finder_finds_a_cycle() -> None:
    # The check above can fail: a graph with a loop through three modules is reported as one.
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
