"""The house: sparc/sa's modules import one way, and none grows too large to read."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).parent.parent / "sparc" / "sa"


def module_names() -> dict[str, pathlib.Path]:
    """Every module of sparc.sa by its name under it: ``orm``, ``tx.block``,
    ``replicas`` (a package's ``__init__.py``)."""
    names: dict[str, pathlib.Path] = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts) or "__init__"] = path
    return names


def resolve(dotted: str, names: dict[str, pathlib.Path]) -> str | None:
    """The module of sparc.sa that ``sparc.sa.<dotted>`` names, or None."""
    if dotted in names:
        return dotted
    return None


def module_imports() -> dict[str, set[str]]:
    """For each module, the sparc.sa modules it imports when it is imported
    (top level, outside ``if TYPE_CHECKING:``)."""
    names = module_names()
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        deps: set[str] = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "sparc.sa" or node.module.startswith("sparc.sa."):
                    base = node.module[len("sparc.sa.") :] if node.module != "sparc.sa" else ""
                    for alias in node.names:
                        sub = resolve(f"{base}.{alias.name}".lstrip("."), names)
                        if sub is not None:
                            deps.add(sub)
                        elif base:
                            deps.add(resolve(base, names) or base)
            elif isinstance(node, ast.Import):
                deps.update(
                    alias.name[len("sparc.sa.") :]
                    for alias in node.names
                    if alias.name.startswith("sparc.sa.")
                )
        graph[name] = deps - {name}
    return graph


def test_no_circular_imports() -> None:
    graph = module_imports()
    assert "tx.joined" in graph["tx.block"]  # the walk sees real edges
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
    for name in (
        "tx/joined",
        "aio",
        "tx/block",
        "tx/scope",
        "tx/gate",
        "tx/sessions",
        "tx/retry",
        "tx/cache",
    ):
        tree = ast.parse((ROOT / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "sparc.sa.orm":
                raise AssertionError(f"{name}.py imports from orm.py")
            if isinstance(node, ast.ImportFrom) and node.module == "sparc.sa":
                assert "orm" not in {alias.name for alias in node.names}, name
