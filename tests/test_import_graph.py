"""The import graph of the packages: imports point one way (docs/architecture.md), with no cycles.

Every ``import``/``from ... import`` of the shipped packages (``model``, ``server``) and of ``tools`` is read
with ``ast`` (lazy imports inside functions included) and mapped onto its folder.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "server", "tools")
# folder -> the folders it may import (besides itself)
ALLOWED = {
    "model": {"model.layers", "model.kernels"},
    "model.layers": set(),
    "model.kernels": {"model", "model.layers"},
    "server": {"server.api", "server.engine", "server.engine.multiproc", "server.engine.worker", "server.bench",
               "model", "model.kernels", "model.layers"},
    "server.api": {"server.engine", "server.engine.worker", "model", "model.layers"},
    "server.engine": {"server.engine.worker", "model", "model.kernels", "model.layers"},
    "server.engine.worker": {"server.engine", "model", "model.kernels", "model.layers"},
    "server.engine.multiproc": {"server.engine", "server.engine.worker", "model", "model.kernels", "model.layers"},
    "server.bench": set(),
    "server.distributed": {"server", "server.api", "server.engine", "server.engine.multiproc"},
    "tools": {"tools.train_tiny"},
    "tools.train_tiny": {"model"},
}


def folder_of(module: str) -> str:
    """The deepest folder of ``ALLOWED`` that holds ``module``."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        name = ".".join(parts[:end])
        if name in ALLOWED:
            return name
    return parts[0]


def imports() -> dict[str, set[str]]:
    """folder -> folders it imports, for every .py file of the packages."""
    graph: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            source = folder_of(module.removesuffix(".__init__"))
            for node in ast.walk(ast.parse(path.read_text())):
                names: list[str] = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                for name in names:
                    if name.split(".")[0] in PACKAGES:
                        graph.setdefault(source, set()).add(folder_of(name))
    return graph


def test_imports_follow_the_architecture() -> None:
    bad = {
        f"{source} -> {target}"
        for source, targets in imports().items()
        for target in targets
        if target != source and target not in ALLOWED.get(source, set())
    }
    assert not bad, f"imports against docs/architecture.md: {sorted(bad)}"


def test_model_never_imports_server_and_nothing_ships_tools() -> None:
    graph = imports()
    for source, targets in graph.items():
        if source.startswith("model"):
            assert not any(t.startswith(("server", "tools")) for t in targets), source
        if source.startswith(("model", "server")):
            assert not any(t.startswith("tools") for t in targets), source


def module_imports() -> dict[str, set[str]]:
    """module -> the modules of the packages it imports at module level (what can form an import cycle)."""
    modules = {
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): path
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets = graph.setdefault(module, set())
        for node in ast.parse(path.read_text()).body:  # top-level statements only
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            targets.update(n for n in names if n in modules and n != module)
    return graph


def test_no_import_cycles() -> None:
    graph = module_imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(target):] + [target]))
            if target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert len(state) > 50  # every module was read
