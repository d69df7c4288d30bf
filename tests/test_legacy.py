"""sparc.sa 1.x's import paths, ZCML packages, test layer and its own doctests."""

from __future__ import annotations

import doctest
import gc
import importlib
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import sqlalchemy as sa
from zope.component import (
    createObject,
    getGlobalSiteManager,
    getMultiAdapter,
    getUtility,
    queryUtility,
)
from zope.component.interfaces import IFactory
from zope.configuration import xmlconfig

import sparc.sa
from sparc.sa import interfaces, query
from sparc.sa.interfaces import ISAResultRowModel, ISAScopedTransaction

ROOT = pathlib.Path(__file__).resolve().parent.parent
ORIGINAL = pathlib.Path(
    os.environ.get("SPARC_SA_ORIGINAL_1X") or ROOT.parent / "shared" / "original-1.3.2"
)
ORIGINAL_FILES = (
    "sparc/sa/engine/engine.txt",
    "sparc/sa/ext/interfaces.txt",
    "sparc/sa/orm/session.txt",
    "sparc/sa/orm/attributes/interfaces.txt",
    "sparc/sa/orm/attributes/mapping.txt",
    "sparc/sa/orm/mapper/interfaces.txt",
    "sparc/sa/orm/query/interfaces.txt",
    "sparc/sa/orm/query/query.txt",
    "sparc/sa/orm/query/sequence.txt",
)

# Every public name of sparc.sa 1.3.2, at its 1.x module path.
NAMES_1X = {
    "sparc.sa.engine": ["ISAEngine"],
    "sparc.sa.engine.interfaces": ["ISAEngine"],
    "sparc.sa.engine.engine": ["SAEngineFromConfig", "SAEngineFromConfigFactory"],
    "sparc.sa.ext": ["ISADeclarativeMeta"],
    "sparc.sa.ext.interfaces": ["ISADeclarativeMeta"],
    "sparc.sa.orm": ["ISAScopedSession", "ISASession", "ISAScopedTransaction"],
    "sparc.sa.orm.interfaces": ["ISAScopedSession", "ISASession", "ISAScopedTransaction"],
    "sparc.sa.orm.session": ["ThreadLocalSASessionTransaction"],
    "sparc.sa.orm.attributes": ["ISAInstrumentedAttribute"],
    "sparc.sa.orm.attributes.interfaces": ["ISAInstrumentedAttribute"],
    "sparc.sa.orm.attributes.mapping": ["ModelMappingForUniqueInstrumentedAttribute"],
    "sparc.sa.orm.mapper": ["ISAMapper"],
    "sparc.sa.orm.mapper.interfaces": ["ISAMapper"],
    "sparc.sa.orm.query": [
        "ISAConjunction",
        "ISAExpression",
        "ISAInstrumentedAttribute",
        "ISAModelFilterExpression",
        "ISAModelFilterExpressionGroup",
        "IORMRelatedModelsAdder",
        "IORMRelatedModels",
        "ISAQuery",
        "ISAResultRowModel",
    ],
    "sparc.sa.orm.query.interfaces": ["ISAQuery", "IORMRelatedModelsAdder"],
    "sparc.sa.orm.query.query": [
        "ORMRelatedModelsAdder",
        "ORMRelatedModelsAdderFactory",
        "SAInstrumentedAttributeFromDottedString",
        "SAInstrumentedAttributeFromDottedStringFactory",
        "SAOuterJoinQuery",
        "SAOuterJoinQueryFactory",
    ],
    "sparc.sa.orm.query.filter": [
        "SAModelFilterExpression",
        "SAModelFilterExpressionFactory",
        "SAExpressionFromSAModelFilterExpression",
        "SAModelFilterExpressionGroup",
        "SAModelFilterExpressionGroupFactory",
        "SAConjunctionFromSAModelFilterExpressionGroup",
        "SAModelFilterExpressionGroupFromContainer",
        "SAModelFilterExpressionGroupFromContainerFactory",
    ],
    "sparc.sa.orm.query.result": ["SAResultRowModel"],
    "sparc.sa.orm.query.sequence": ["ModelSequenceForQuery"],
    "sparc.sa.orm.query.testing": ["related_models"],
    "sparc.sa.orm.testing": [
        "Base",
        "get_transaction",
        "populate_tables",
        "create_model",
        "Test1",
        "Test2",
        "Test3",
        "Test4",
        "ITest1",
        "ITest2",
        "ITest3",
        "ITest4",
    ],
    "sparc.sa.testing": ["SPARC_SA_INTEGRATION_LAYER"],
}


@pytest.mark.parametrize("module", sorted(NAMES_1X))
def test_every_1x_name_imports_from_its_1x_path(module: str) -> None:
    loaded = importlib.import_module(module)
    for name in NAMES_1X[module]:
        assert getattr(loaded, name) is not None, f"{module}.{name}"


def test_an_old_path_gives_the_very_objects_of_the_new_one() -> None:
    from sparc.sa.orm.query import ISAQuery
    from sparc.sa.orm.query.filter import SAModelFilterExpression
    from sparc.sa.orm.session import ThreadLocalSASessionTransaction

    assert ISAQuery is interfaces.ISAQuery
    assert SAModelFilterExpression is query.SAModelFilterExpression
    assert ThreadLocalSASessionTransaction is sparc.sa.orm.ThreadLocalSASessionTransaction


def test_the_threaded_managers_1x_name_is_its_new_name() -> None:
    """Renamed ScopedTransaction (its scopes are tasks too); the 1.x name is
    the same class, from every path that gave it."""
    from sparc.sa.orm.session import ThreadLocalSASessionTransaction

    assert ThreadLocalSASessionTransaction is sparc.sa.orm.ScopedTransaction
    assert sparc.sa.ThreadLocalSASessionTransaction is sparc.sa.ScopedTransaction
    assert "ThreadLocalSASessionTransaction" in sparc.sa.orm.__all__

    class Base(sa.orm.DeclarativeBase):
        pass

    manager = ThreadLocalSASessionTransaction(sa.create_engine("sqlite://"), Base)
    assert isinstance(manager, sparc.sa.orm.ScopedTransaction)
    assert repr(manager).startswith("<ScopedTransaction engine=Engine(sqlite://)")


def test_old_paths_leave_the_real_modules_alone() -> None:
    """Importing ``sparc.sa.orm.query.filter`` must not bind ``filter`` (nor any
    other 1.x submodule name) inside the module that holds the code."""
    script = textwrap.dedent(
        f"""
        import importlib
        for name in {sorted(NAMES_1X)!r}:
            importlib.import_module(name)
        for real in ("query", "attributes", "interfaces", "testing"):
            module = importlib.import_module("sparc.sa." + real)
            for name in ("filter", "query", "result", "sequence", "testing", "mapping"):
                assert name not in vars(module), (module.__name__, name)
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.stdout.strip() == "ok", done.stderr


def test_an_unknown_old_path_is_still_an_import_error() -> None:
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("sparc.sa.orm.nothing_here")


def _include(package: str) -> None:
    namespace = "http://namespaces.zope.org/zope"
    xmlconfig.string(f'<configure xmlns="{namespace}"><include package="{package}" /></configure>')


def _registered(name: str) -> bool:
    return queryUtility(IFactory, name) is not None


def test_include_sparc_sa_engine_registers_the_engine_factory_only() -> None:
    _include("sparc.sa.engine")
    assert _registered("sparc.sa.engine.engine_from_config")
    assert not _registered("sparc.sa.orm.query.outer_joined_query")


def test_include_sparc_sa_orm_registers_the_orm_components() -> None:
    _include("sparc.sa.orm")
    for name in (
        "orm_related_models_adder",
        "instrumented_attribute",
        "outer_joined_query",
        "filter_expression",
        "filter_expression_group",
        "filter_expression_group_from_container",
    ):
        assert _registered(f"sparc.sa.orm.query.{name}"), name
    assert isinstance(getUtility(ISAResultRowModel), query.SAResultRowModel)
    engine = sa.create_engine("sqlite://")
    manager = getMultiAdapter((engine, sparc.sa.testing.Base), ISAScopedTransaction)
    assert manager.engine is engine
    assert not _registered("sparc.sa.engine.engine_from_config")


def test_include_sparc_sa_with_its_parts_again_does_not_conflict() -> None:
    zcml = """<configure xmlns="http://namespaces.zope.org/zope">
        <include package="sparc.sa.engine" />
        <include package="sparc.sa" />
        <include package="sparc.sa.orm" />
    </configure>"""
    xmlconfig.string(zcml)
    assert _registered("sparc.sa.engine.engine_from_config")
    assert _registered("sparc.sa.orm.query.filter_expression")


def test_the_integration_layer_loads_ftesting_zcml_and_cleans_up() -> None:
    from sparc.sa.testing import SPARC_SA_INTEGRATION_LAYER as layer

    assert not _registered("sparc.sa.engine.engine_from_config")
    layer.setUp()
    try:
        engine = createObject("sparc.sa.engine.engine_from_config", {"dsn": "sqlite://"})
        assert interfaces.ISAEngine.providedBy(engine)
        engine.dispose()
    finally:
        layer.tearDown()
    assert not _registered("sparc.sa.engine.engine_from_config")
    assert list(getGlobalSiteManager().registeredUtilities()) == []


def test_get_transaction_gives_a_new_database_with_foreign_keys_enforced() -> None:
    from sparc.sa.orm import testing

    first, second = testing.get_transaction(), testing.get_transaction()
    testing.populate_tables(first)
    assert first.session.query(testing.Test1).count() == 3
    assert second.session.query(testing.Test1).count() == 0
    with pytest.raises(sa.exc.IntegrityError), second():
        testing.create_model(second, testing.Test4, name="orphan", test2_id=99)
    for manager in (first, second):
        manager.session.close()
        manager.engine.dispose()


# -- the nine doctests of 1.3.2, verbatim ---------------------------------------


@pytest.mark.filterwarnings("ignore::sqlalchemy.exc.MovedIn20Warning")
@pytest.mark.parametrize("name", ORIGINAL_FILES)
def test_original_1_3_2_doctest(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Each file runs as 1.x ran it: zope.component and sparc.sa's ZCML loaded
    into a fresh global registry."""
    path = ORIGINAL / name
    if not path.is_file():
        pytest.skip(
            f"sparc.sa 1.3.2's doctests are not at {ORIGINAL} "
            "(set SPARC_SA_ORIGINAL_1X to the folder holding them: see DEVELOPERS.md, "
            "section: sparc.sa 1.3.2's own doctests)"
        )
    xmlconfig.file("ftesting.zcml", package=sparc.sa)
    result = doctest.testfile(
        str(path), module_relative=False, optionflags=doctest.ELLIPSIS, verbose=False
    )
    gc.collect()  # the file's managers close their sessions before the next test
    assert result.attempted > 0
    assert result.failed == 0, capsys.readouterr().out


RACE = """
import importlib, sys, threading

# SQLAlchemy itself cannot be imported for the first time by several threads
# at once (CPython hands one of them a half-initialised sqlalchemy.engine), so
# it is loaded before the race: the race under test is sparc.sa's own. The
# same holds for the `transaction` package, whose __init__ and interfaces
# import each other: two threads importing it first can meet CPython's
# _DeadlockError (seen under load), whoever imports them.
import sqlalchemy.ext.asyncio, sqlalchemy.orm, zope.component, zope.configuration.xmlconfig
try:
    import transaction, transaction.interfaces
except ImportError:
    pass

sys.setswitchinterval(1e-4)
NAMES = {names!r}
errors = []
done = threading.Event()

def worker(name):
    # from the moment sparc/sa/__init__.py has run its first line, the import
    # of the legacy module (1.3.2's import did the same)
    while True:
        legacy = sys.modules.get("sparc.sa.legacy")
        spec = getattr(legacy, "__spec__", None)
        if spec is not None and not getattr(spec, "_initializing", True):
            break
    while True:
        last = done.is_set()
        try:
            module = importlib.import_module(name)
        except Exception as exc:
            errors.append(f"{{name}}: {{type(exc).__name__}}: {{exc}}")
        else:
            if "_sparc_target" not in vars(module):
                errors.append(f"{{name}}: {{module!r}}")
        if last:
            return

threads = [threading.Thread(target=worker, args=(n,)) for n in NAMES for _ in range(2)]
for thread in threads:
    thread.start()
try:
    import sparc.sa
    sparc.sa.ThreadLocalSASessionTransaction
except Exception as exc:
    errors.append(f"import sparc.sa: {{type(exc).__name__}}: {{exc}}")
done.set()
for thread in threads:
    thread.join()
for name in NAMES:
    if "_sparc_target" not in vars(importlib.import_module(name)):
        errors.append(f"{{name}} is cached as {{sys.modules[name]!r}}")
print("\\n".join(sorted(set(errors))) or "ok")
"""


def test_1x_paths_import_from_threads_while_sparc_sa_is_first_imported() -> None:
    """Threads import every 1.x path while the main thread imports sparc.sa for
    the first time: each import works, ``import sparc.sa`` itself works, and no
    1.x path is left cached as an empty namespace package (its ZCML directory)."""
    from sparc.sa.legacy import ALIASES

    script = RACE.format(names=sorted(ALIASES))
    for _ in range(3):  # each run is a fresh interpreter: a first import
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
        )
        assert done.stdout.strip() == "ok", done.stdout[-3000:] + done.stderr[-3000:]


def test_a_failed_1x_import_never_leaves_a_namespace_package() -> None:
    """A 1.x path found before the finder was installed (its directory holds
    only ZCML, which the default finders take for a namespace package) is
    dropped when the finder is installed, and imports as the alias after."""
    script = textwrap.dedent(
        """
        import importlib, importlib.machinery, sys, types
        import sparc.sa.orm
        from sparc.sa import legacy
        finder = next(f for f in sys.meta_path if isinstance(f, legacy.LegacyFinder))
        sys.meta_path.remove(finder)  # as before sparc/sa/__init__.py ran
        stray = importlib.import_module("sparc.sa.orm.query")
        assert stray.__spec__.loader.__class__.__name__ == "NamespaceLoader", stray
        legacy.install()
        module = importlib.import_module("sparc.sa.orm.query")
        assert isinstance(module, legacy.Alias), module
        assert module.ISAQuery is importlib.import_module("sparc.sa.interfaces").ISAQuery
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.stdout.strip() == "ok", done.stderr
