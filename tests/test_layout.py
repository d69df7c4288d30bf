"""The house: sparc/sa's modules import one way, and none grows too large to read."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).parent.parent / "sparc" / "sa"


def module_imports() -> dict[str, set[str]]:
    """For each module, the sparc.sa modules it imports when it is imported
    (top level, outside ``if TYPE_CHECKING:``)."""
    graph: dict[str, set[str]] = {}
    for path in ROOT.glob("*.py"):
        name = path.stem
        deps: set[str] = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "sparc.sa":
                    deps.update(alias.name for alias in node.names)
                elif node.module.startswith("sparc.sa."):
                    deps.add(node.module.split(".")[2])
            elif isinstance(node, ast.Import):
                deps.update(
                    alias.name.split(".")[2]
                    for alias in node.names
                    if alias.name.startswith("sparc.sa.")
                )
        graph[name] = deps - {name}
    return graph


def test_no_circular_imports() -> None:
    graph = module_imports()
    assert "block" in graph and "joined" in graph["block"]  # the walk sees real edges
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        for dep in sorted(graph.get(name, ())):
            assert dep not in path, "import cycle: " + " -> ".join([*path, dep])
            if dep not in done:
                visit(dep, [*path, dep])
        done.add(name)

    for name in sorted(graph):
        visit(name, [name])


def test_joined_mode_and_asyncio_use_no_private_name_of_orm() -> None:
    for name in ("joined", "aio", "block", "scope", "gate", "sessions", "retry", "cache"):
        tree = ast.parse((ROOT / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "sparc.sa.orm":
                raise AssertionError(f"{name}.py imports from orm.py")
            if isinstance(node, ast.ImportFrom) and node.module == "sparc.sa":
                assert "orm" not in {alias.name for alias in node.names}, name
