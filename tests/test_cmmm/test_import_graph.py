"""The import graph: the core (``cmmm``) never imports the plug-ins, and plug-ins never import each
other, except through the one discovery module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("cmmm", "strategies", "streams")
# The one core module allowed to import the plug-in packages: it finds them.
DISCOVERY_MODULE = "cmmm.discovery"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str) -> set[str]:
    """Every module an ``import`` or ``from ... import`` statement names, at any depth."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # `from strategies import ours` imports the module strategies.ours.
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of the three packages it imports."""
    graph: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            imported = imported_modules(path.read_text(encoding="utf-8"))
            graph[module_name(path)] = {m for m in imported if m.split(".")[0] in PACKAGES}
    return graph


def package_of(module: str) -> str:
    return module.split(".")[0]


def violations(graph: dict[str, set[str]]) -> list[str]:
    found: list[str] = []
    for module, imports in sorted(graph.items()):
        for target in sorted(imports):
            source_package, target_package = package_of(module), package_of(target)
            if source_package == "cmmm" and target_package != "cmmm":
                if module != DISCOVERY_MODULE:
                    found.append(f"core module {module} imports the plug-in {target}")
            elif source_package == "strategies" and target_package == "strategies":
                # `from strategies import X` in a strategy module also names the package itself.
                if target not in ("strategies", module):
                    found.append(f"strategy {module} imports the strategy {target}")
            elif {source_package, target_package} == {"strategies", "streams"}:
                found.append(f"{module} imports {target} across the plug-in packages")
    return found


def test_every_package_is_scanned() -> None:
    graph = import_graph()
    assert DISCOVERY_MODULE in graph
    assert {"strategies.ours", "streams.mosi", "cmmm.strategy", "cmmm.data.catalog"} <= set(graph)


def test_core_and_plugins_keep_their_direction() -> None:
    assert violations(import_graph()) == []


def strategy_imports(path: Path) -> set[str]:
    """The ``strategies`` modules a strategy file imports, relative imports resolved."""
    source = path.read_text(encoding="utf-8")
    names = imported_modules(source)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            # `from . import x` or `from .x import y` inside strategies/ names strategies.x.
            base = "strategies" + (f".{node.module}" if node.module else "")
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return {n for n in names if package_of(n) == "strategies" and n != "strategies"}


def test_no_strategy_module_imports_another() -> None:
    """A method is one file: what two methods share lives in the core (``cmmm.kit.prompt_kit``,
    ``cmmm.replay_sizes``), never in another method's file."""
    paths = sorted(p for p in (ROOT / "strategies").glob("*.py") if p.name != "__init__.py")
    assert len(paths) >= 10
    offending = {}
    for path in paths:
        own = module_name(path)
        others = {m for m in strategy_imports(path) if m.split(".")[:2] != own.split(".")}
        if others:
            offending[own] = sorted(others)
    assert offending == {}


def test_a_relative_strategy_import_is_caught(tmp_path: Path) -> None:
    source = tmp_path / "l2p.py"
    source.write_text("from .sprompts import kmeans\nfrom . import dualprompt\n")
    assert {"strategies.sprompts", "strategies.dualprompt"} <= strategy_imports(source)


@pytest.mark.parametrize(
    ("module", "statement", "complaint"),
    [
        ("cmmm.running", "from strategies.ours import Ours", "core module cmmm.running imports"),
        ("cmmm.data.catalog", "import streams.mosi", "core module cmmm.data.catalog imports"),
        ("strategies.aoept", "from strategies.sprompts import kmeans", "strategy strategies.aoept"),
        ("strategies.l2p", "from strategies import sprompts", "strategy strategies.l2p"),
        ("streams.mosi", "from strategies.base import STRATEGIES", "across the plug-in packages"),
        ("strategies.ours", "from streams.synthetic import make_synthetic", "across the plug-in"),
    ],
)
def test_an_offending_import_is_caught(module: str, statement: str, complaint: str) -> None:
    graph = import_graph()
    graph[module] = graph[module] | {
        m for m in imported_modules(statement) if package_of(m) in PACKAGES
    }
    assert any(complaint in v for v in violations(graph)), violations(graph)


def test_the_discovery_module_may_import_plugins() -> None:
    graph = import_graph()
    graph[DISCOVERY_MODULE] = graph[DISCOVERY_MODULE] | {"strategies.ours"}
    assert violations(graph) == []


def test_discovery_loads_the_entry_points_of_cmmm_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    """A package of the user's registers through the ``cmmm.plugins`` entry-point group."""
    import cmmm.discovery as discovery

    loaded: list[str] = []

    class FakeEntryPoint:
        name = "my_method"

        def load(self) -> None:
            loaded.append(self.name)

    groups: list[str] = []

    def fake_entry_points(*, group: str) -> list[FakeEntryPoint]:
        groups.append(group)
        return [FakeEntryPoint()]

    monkeypatch.setattr(discovery, "entry_points", fake_entry_points)
    monkeypatch.setattr(discovery, "_loading_started", False)
    discovery.load_plugins()
    discovery.load_plugins()  # once per process
    assert groups == ["cmmm.plugins"] and loaded == ["my_method"]


def test_the_kernel_does_not_import_the_method_kit() -> None:
    """``cmmm.kit`` holds what methods share; the kernel (backbone, data, runner, evaluator, lab
    tools, CLI) runs every method alike and so never needs it."""
    graph = import_graph()
    assert any(module.startswith("cmmm.kit.") for module in graph)
    found = [
        f"{module} imports {target}"
        for module, imports in sorted(graph.items())
        if module.startswith("cmmm.") and not module.startswith("cmmm.kit")
        for target in sorted(imports)
        if target == "cmmm.kit" or target.startswith("cmmm.kit.")
    ]
    assert found == []


def import_loops(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other round a loop (strongly connected components
    of more than one module; imports inside functions count, since they only hide a loop).
    Edges to package ``__init__`` modules are left out: ``from cmmm import running`` names the
    package, but imports the module."""
    packages = {m for m in graph if (ROOT / m.replace(".", "/") / "__init__.py").is_file()}
    edges = {
        m: sorted(t for t in ts if t in graph and t not in packages and t != m)
        for m, ts in graph.items()
        if m not in packages
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    loops: list[list[str]] = []

    def visit(module: str) -> None:  # Tarjan's algorithm
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in edges[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                loops.append(sorted(group))

    for module in sorted(edges):
        if module not in index:
            visit(module)
    return sorted(loops)


def test_no_modules_import_each_other_round_a_loop() -> None:
    """A loop hides which module builds on which: each module stands above what it imports."""
    assert import_loops(import_graph()) == []


def test_an_import_loop_is_caught() -> None:
    graph = {
        "cmmm.a": {"cmmm.b"},
        "cmmm.b": {"cmmm.c", "cmmm"},
        "cmmm.c": {"cmmm.a"},
        "cmmm.d": {"cmmm.a"},
        "cmmm": {"cmmm.d"},  # the package's __init__: not a module of a loop
    }
    assert import_loops(graph) == [["cmmm.a", "cmmm.b", "cmmm.c"]]
