"""The package's shape (README, "Layout"): wings by role, each importing only the wings
below it, no cycles; and no module longer than a reader can hold."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVICE = Path(__file__).resolve().parent.parent / "service"
# Bottom to top: a wing imports its own modules and those of the wings before it. The
# entry points (cli, server, worker) sit above every wing.
WINGS = ["core", "hotpath", "durable", "selling", "web"]
TOP = len(WINGS)
MAX_LINES = 500


def _rank(module: str) -> int:
    """service.<wing>.<name> → the wing's place; service.<name> → the top."""
    parts = module.split(".")
    return WINGS.index(parts[1]) if len(parts) > 2 and parts[1] in WINGS else TOP


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node but those under `if TYPE_CHECKING:` (annotations only: no import runs)."""
    nodes: list[ast.AST] = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            nodes.extend(_runtime_nodes(ast.Module(body=node.orelse, type_ignores=[])))
            continue
        nodes.append(node)
        nodes.extend(_runtime_nodes(node))
    return nodes


def _imports(path: Path) -> set[str]:
    """The service modules that `path` imports when it runs, by their dotted names."""
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("service"):
            # `from <package> import <module>`: the module (a package's __init__ is empty).
            if (SERVICE.parent / node.module.replace(".", "/")).is_dir():
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("service."))
    return found


def _modules() -> dict[str, Path]:
    return {
        ".".join(("service", *p.relative_to(SERVICE).with_suffix("").parts)): p
        for p in SERVICE.rglob("*.py")
        if p.name != "__init__.py"
    }


def test_every_module_lives_in_a_wing_or_is_an_entry_point() -> None:
    loose = {m for m in _modules() if _rank(m) == TOP} - {
        "service.cli",
        "service.server",
        "service.worker",
    }
    assert not loose


@pytest.mark.parametrize("module", sorted(_modules()))
def test_a_wing_imports_only_the_wings_below_it(module: str) -> None:
    upward = {
        imported for imported in _imports(_modules()[module]) if _rank(imported) > _rank(module)
    }
    assert not upward, f"{module} imports upward: {sorted(upward)}"


@pytest.mark.parametrize("root", ["service", "loadtest"])
def test_no_module_is_longer_than_a_reader_can_hold(root: str) -> None:
    long = {
        str(p.relative_to(SERVICE.parent)): n
        for p in (SERVICE.parent / root).rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long


def test_no_import_cycles() -> None:
    modules = _modules()
    graph = {m: _imports(p) & modules.keys() for m, p in modules.items()}
    done: set[str] = set()

    def visit(m: str, path: list[str]) -> None:
        if m in path:
            pytest.fail("import cycle: " + " → ".join([*path[path.index(m) :], m]))
        if m in done:
            return
        for n in graph[m]:
            visit(n, [*path, m])
        done.add(m)

    for m in graph:
        visit(m, [])
