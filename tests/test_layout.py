"""The house: sparc/sa's folders each hold one concern, its modules import
one way, and none grows too large to read (docs/developers.rst draws the map)."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).parent.parent / "sparc" / "sa"

#: The transaction core and the connection work under it: they import no feature.
CORE = ("tx", "connections")
#: Modules that build on the core; the core imports none of them.
FEATURES = (
    "aio",
    "attributes",
    "check",
    "components",
    "engine",
    "mismatch",
    "options",
    "orm",
    "pyramid",
    "query",
    "replicas",
    "testing",
    "zcml",
)
#: The largest module sparc/sa may hold, in lines.
MAX_LINES = 500
#: Over the limit today, each to be split by concern; the list only shrinks
#: (a module listed here and back under the limit fails, so it is removed).
TOO_LARGE_TODAY: set[str] = set()
#: How many modules may sit directly in sparc/sa (the public face).
MAX_TOP_MODULES = 20
#: The longest class and the longest function (or method) sparc/sa may hold,
#: in lines from its ``class`` or ``def`` line to its end, docstring included.
MAX_CLASS_LINES = 200
MAX_FUNCTION_LINES = 60
#: Classes and functions over those limits today, as ``module:Qual.name``;
#: the set only shrinks (one listed here and back under its limit fails).
TOO_LONG_TODAY: set[str] = set()


def module_names() -> dict[str, pathlib.Path]:
    """Every module of sparc.sa by its dotted name under it: ``orm``,
    ``tx.block``, ``replicas`` (a package's ``__init__.py``)."""
    names: dict[str, pathlib.Path] = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts) or "__init__"] = path
    return names


NAMES = module_names()


def imported(node: ast.Import | ast.ImportFrom) -> list[tuple[str, list[str]]]:
    """The sparc.sa modules *node* imports, each with the names it takes
    from it (empty for a module imported whole)."""
    found: list[tuple[str, list[str]]] = []
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name.startswith("sparc.sa."):
                found.append((alias.name[len("sparc.sa.") :], []))
        return found
    if node.level or node.module is None:
        return [("<relative>", [])]  # refused below: sparc.sa imports by absolute path
    if node.module != "sparc.sa" and not node.module.startswith("sparc.sa."):
        return found
    base = node.module[len("sparc.sa.") :] if node.module != "sparc.sa" else ""
    taken: list[str] = []
    for alias in node.names:
        sub = f"{base}.{alias.name}".lstrip(".")
        if sub in NAMES:
            found.append((sub, []))  # a module: `from sparc.sa.tx import block`
        else:
            taken.append(alias.name)
    if taken:
        found.append((base or "__init__", taken))
    return found


def all_imports() -> dict[str, list[tuple[str, list[str], int]]]:
    """For each module, every sparc.sa import it makes anywhere: at the top,
    under ``if TYPE_CHECKING:``, and inside functions."""
    graph: dict[str, list[tuple[str, list[str], int]]] = {}
    for name, path in NAMES.items():
        edges: list[tuple[str, list[str], int]] = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges.extend((dep, names, node.lineno) for dep, names in imported(node))
        graph[name] = edges
    return graph


GRAPH = all_imports()


def module_imports() -> dict[str, set[str]]:
    return {name: {dep for dep, _, _ in edges} - {name} for name, edges in GRAPH.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> list[str] | None:
        for dep in sorted(graph.get(name, ())):
            if dep in path:
                return [*path[path.index(dep) :], dep]
            if dep not in done:
                cycle = visit(dep, [*path, dep])
                if cycle:
                    return cycle
        done.add(name)
        return None

    for name in sorted(graph):
        cycle = visit(name, [name])
        if cycle:
            return cycle
    return None


def test_the_walk_sees_every_kind_of_import() -> None:
    graph = module_imports()
    assert "tx.joined" in graph["tx.block"]  # top level
    assert "tx.datamanager" in graph["tx.scope"]  # under TYPE_CHECKING
    assert "orm" in graph["components"]  # the real edges of a feature
    # an import inside a function counts (pyramid imports the components
    # only when included)
    inner = {
        dep
        for node in ast.walk(ast.parse(NAMES["__init__"].read_text()))
        if isinstance(node, ast.FunctionDef)
        for sub in ast.walk(node)
        if isinstance(sub, (ast.Import, ast.ImportFrom))
        for dep, _ in imported(sub)
    }
    assert inner <= graph["__init__"]


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_circular_imports() -> None:
    """Counting imports under TYPE_CHECKING and inside functions."""
    cycle = find_cycle(module_imports())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or ())


def test_no_circle_between_folders() -> None:
    """Folder by folder, too: tx/ may import connections/, never the reverse."""
    folders: dict[str, set[str]] = {}
    for name, deps in module_imports().items():
        top = name.split(".")[0]
        folders.setdefault(top, set()).update(dep.split(".")[0] for dep in deps)
    for top, deps in folders.items():
        deps.discard(top)
    cycle = find_cycle(folders)
    # sparc.sa's __init__ reaches every module lazily; it is the face, not a folder
    assert cycle is None or "__init__" in cycle, "folder cycle: " + " -> ".join(cycle)
    for top in [t for t in folders if t != "__init__"]:
        assert not ({"__init__"} & folders[top]) or top == "legacy", top


def test_no_relative_imports() -> None:
    for name, edges in GRAPH.items():
        assert all(dep != "<relative>" for dep, _, _ in edges), name


def test_the_core_imports_no_feature() -> None:
    for name, edges in GRAPH.items():
        if name.split(".")[0] not in CORE:
            continue
        for dep, _, line in edges:
            assert dep.split(".")[0] not in FEATURES, (
                f"sparc/sa/{name.replace('.', '/')} line {line} imports the feature {dep}"
            )
    for name, edges in GRAPH.items():
        if name.startswith("connections"):
            for dep, _, line in edges:
                assert not dep.startswith("tx"), f"{name} line {line} imports {dep}"


def test_no_module_imports_another_modules_private_name() -> None:
    for name, edges in GRAPH.items():
        for dep, taken, line in edges:
            private = [n for n in taken if n.startswith("_")]
            assert not private, f"{name} line {line} imports {private} from {dep}"
            assert not any(part.startswith("_") for part in dep.split(".")), (
                f"{name} line {line} imports the private module {dep}"
            )


@pytest.mark.parametrize("name", sorted(NAMES))
def test_no_module_over_the_size_limit(name: str) -> None:
    lines = len(NAMES[name].read_text().splitlines())
    if name in TOO_LARGE_TODAY:
        assert lines > MAX_LINES, f"{name} is under the limit now: take it off TOO_LARGE_TODAY"
    else:
        assert lines <= MAX_LINES, f"sparc/sa/{name.replace('.', '/')}: {lines} lines"


def units(source: str) -> list[tuple[str, bool, int]]:
    """Every class and function of *source*, nested ones too: its qualified
    name, whether it is a class, and its length in lines."""
    found: list[tuple[str, bool, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                assert child.end_lineno is not None
                lines = child.end_lineno - child.lineno + 1
                found.append((name, isinstance(child, ast.ClassDef), lines))
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return found


def test_units_measures_classes_and_functions() -> None:
    source = "class A:\n    def f(self):\n        def g():\n            pass\n\n        return g\n"
    assert units(source) == [("A", True, 6), ("A.f", False, 5), ("A.f.g", False, 2)]


@pytest.mark.parametrize("name", sorted(NAMES))
def test_no_class_or_function_over_the_size_limit(name: str) -> None:
    for qualname, is_class, lines in units(NAMES[name].read_text()):
        unit = f"{name}:{qualname}"
        limit = MAX_CLASS_LINES if is_class else MAX_FUNCTION_LINES
        if unit in TOO_LONG_TODAY:
            assert lines > limit, f"{unit} is under the limit now: take it off TOO_LONG_TODAY"
        else:
            assert lines <= limit, f"sparc/sa/{name.replace('.', '/')}: {qualname}, {lines} lines"


def test_too_long_today_names_units_that_exist() -> None:
    every = {
        f"{name}:{qualname}"
        for name, path in NAMES.items()
        for qualname, _, _ in units(path.read_text())
    }
    assert not TOO_LONG_TODAY - every, TOO_LONG_TODAY - every


def test_few_modules_directly_in_sparc_sa() -> None:
    top = sorted(path.name for path in ROOT.glob("*.py"))
    assert len(top) <= MAX_TOP_MODULES, top


def test_every_folder_is_a_package_or_1x_zcml() -> None:
    """A folder holds Python with an __init__.py, or (under legacy/) only ZCML."""
    for folder in (p for p in ROOT.rglob("*") if p.is_dir() and p.name != "__pycache__"):
        if (folder / "__init__.py").exists():
            continue
        rel = folder.relative_to(ROOT).as_posix()
        assert rel.startswith("legacy/"), rel
        assert not list(folder.glob("*.py")), rel


def test_joined_mode_and_asyncio_use_no_private_name_of_orm() -> None:
    for name in NAMES:
        if name.split(".")[0] in ("tx", "aio"):
            for dep, _, line in GRAPH[name]:
                assert dep != "orm", f"{name} line {line} imports orm"


def test_a_package_face_imports_nothing_when_imported() -> None:
    """A sub-package's ``__init__`` runs no import of sparc.sa at import time
    (its names come on first use): a thread importing one of its modules
    would otherwise wait for another thread's import of the package, which
    waits for that module in turn, and Python hands one of them a module
    half made (tests/test_legacy.py's thread race)."""
    for name, path in NAMES.items():
        if path.name != "__init__.py" or name == "__init__":
            continue
        for node in ast.parse(path.read_text()).body:  # top level, not under TYPE_CHECKING
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                assert not imported(node), f"sparc/sa/{name.replace('.', '/')} line {node.lineno}"


# -- other packages' private names -------------------------------------------------------

#: Other packages' private names that sparc.sa relies on, each reached only
#: from its package's module in sparc/sa/foreign/ (docs/developers.rst lists
#: them and why; tests/test_foreign.py pins each).
FOREIGN_PRIVATE = {
    "foreign.of_transaction": {
        "_txn",
        "_synchs",
        "_after_commit",
        "_after_abort",
        "_callAfterCommitHooks",
        "_callAfterAbortHooks",
    },
    "foreign.of_sqlalchemy": {
        "_connections",
        "_savepoint",
        "_is_clean",
        "_pre_ping",
        "_max_overflow",
        "_timeout",
        "_is_asyncio",
        "_isolation_lookup",
        "_limit_clause",
        "_connection_for_bind",
        "_connection",
        "_started",
        "_transaction",
        "_start_transaction",
        "_start_query",
        "_transport",
        "_writer",
    },
    "foreign.of_asyncio": {"_get_running_loop", "_must_cancel", "_call_connection_lost"},
    "foreign.of_zope_configuration": {"_details"},
}
#: Private names a public hook replaced: used nowhere any more.
REPLACED = {
    "_parent": "SessionTransaction.parent",
    "_nested_transaction": "Connection.get_nested_transaction()",
}
#: The modules that look at frames (sys._getframe); docs/developers.rst says why.
FRAME_READERS = {"tx.block", "tx.stack", "tx.asyncblock", "tx.liveness", "tx.joined", "orm"}


def private_reaches(source: str, watched: set[str]) -> list[tuple[int, str]]:
    """Where *source* reaches another package's private name: a *watched*
    name as an attribute or a string (sparc.sa's own attributes never take
    those names, so no use of one is ambiguous), an underscore name imported
    from, or read off, a module that is not sparc's, and ``sys._getframe``."""
    tree = ast.parse(source)
    foreign_modules: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if not alias.name.startswith("sparc"):
                    foreign_modules.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and not (node.module or "").startswith("sparc"):
            foreign_modules.update(alias.asname or alias.name for alias in node.names)
    found: list[tuple[int, str]] = []

    def private(name: str) -> bool:
        return name.startswith("_") and not name.startswith("__")

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            base = node.value
            if isinstance(base, ast.Name) and base.id == "sys" and node.attr == "_getframe":
                found.append((node.lineno, "sys._getframe"))
            elif node.attr in watched:
                found.append((node.lineno, f".{node.attr}"))
            elif private(node.attr) and isinstance(base, ast.Name) and base.id in foreign_modules:
                found.append((node.lineno, f"{base.id}.{node.attr}"))
        elif isinstance(node, ast.Constant) and node.value in watched:
            found.append((node.lineno, repr(node.value)))
        elif isinstance(node, ast.ImportFrom) and not (node.module or "").startswith("sparc"):
            module = node.module or ""
            for alias in node.names:
                if module != "__future__" and (
                    private(alias.name) or any(private(p) for p in module.split("."))
                ):
                    found.append((node.lineno, f"from {module} import {alias.name}"))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if any(private(p) for p in alias.name.split(".")):
                    found.append((node.lineno, f"import {alias.name}"))
    return sorted(found)


WATCHED = set().union(*FOREIGN_PRIVATE.values(), REPLACED)


def test_private_reaches_finds_each_kind() -> None:
    source = (
        "import sys\n"
        "import asyncio.events as ev\n"
        "from asyncio.events import _get_running_loop\n"
        "from sqlalchemy.orm import session as s\n"
        "class Block:\n"
        "    __slots__ = ('_savepoint',)\n"
        "    def f(self, t):\n"
        "        self._savepoint = 1\n"
        "        t._connections\n"
        "        getattr(t, '_txn', None)\n"
        "        ev._whatever\n"
        "        s._private\n"
        "        sys._getframe(1)\n"
        "        t._parent\n"
        "        return self._savepoint, t._not_watched\n"
    )
    assert [what for _, what in private_reaches(source, WATCHED)] == [
        "from asyncio.events import _get_running_loop",
        "'_savepoint'",  # an own attribute may not take a watched name either
        "._savepoint",
        "._connections",
        "'_txn'",
        "ev._whatever",
        "s._private",
        "sys._getframe",
        "._parent",
        "._savepoint",
    ]


def test_other_packages_private_names_are_reached_from_one_module_each() -> None:
    owner_of = {name: owner for owner, names in FOREIGN_PRIVATE.items() for name in names}
    assert len(owner_of) == sum(len(names) for names in FOREIGN_PRIVATE.values())
    for name, path in NAMES.items():
        if name in FOREIGN_PRIVATE:
            continue
        for line, what in private_reaches(path.read_text(), WATCHED):
            if what == "sys._getframe" and name in FRAME_READERS:
                continue
            where = f"sparc/sa/{name.replace('.', '/')} line {line}"
            bare = what.strip(".'")
            assert bare not in REPLACED, f"{where}: {what}; use {REPLACED.get(bare)}"
            raise AssertionError(
                f"{where} reaches {what}: another package's private name belongs in "
                f"{owner_of.get(bare, 'its module in sparc/sa/foreign/')}, behind an accessor"
            )


def test_each_foreign_module_uses_the_names_it_is_listed_for() -> None:
    """So that the test above cannot pass for lack of anything to find."""
    for owner, names in FOREIGN_PRIVATE.items():
        used = {
            what.split(" import ")[-1].strip(".'")
            for _, what in private_reaches(NAMES[owner].read_text(), WATCHED)
        }
        assert names <= used, f"{owner} does not use {sorted(names - used)}"
        others = set().union(*(n for o, n in FOREIGN_PRIVATE.items() if o != owner))
        assert not (used & others), f"{owner} uses {sorted(used & others)}, listed elsewhere"
    assert set(FOREIGN_PRIVATE) == {n for n in NAMES if n.startswith("foreign.")}
    for name in FRAME_READERS:
        reaches = private_reaches(NAMES[name].read_text(), WATCHED)
        assert "sys._getframe" in {what for _, what in reaches}, f"{name} reads no frame"


def test_the_foreign_modules_import_nothing_of_sparc_sa() -> None:
    """Every layer may use them, the core too."""
    for name, edges in GRAPH.items():
        if name.split(".")[0] == "foreign":
            assert not edges, f"{name} imports {edges}"


def test_each_foreign_name_is_pinned_and_documented() -> None:
    """Each accessor is exercised by tests/test_foreign.py, and each name is
    listed in docs/developers.rst (DEVELOPERS.md)."""
    tests = (pathlib.Path(__file__).parent / "test_foreign.py").read_text()
    guide = (ROOT.parent.parent / "DEVELOPERS.md").read_text()
    for owner, names in FOREIGN_PRIVATE.items():
        tree = ast.parse(NAMES[owner].read_text())
        exported = next(
            ast.literal_eval(node.value)
            for node in tree.body
            if isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets)
        )
        short = owner.split(".")[-1]
        for accessor in exported:
            assert f"{short}.{accessor}" in tests, f"tests/test_foreign.py uses no {accessor}"
        for name in names | set(REPLACED):
            assert f"`{name}`" in guide, f"DEVELOPERS.md lists no `{name}`"
