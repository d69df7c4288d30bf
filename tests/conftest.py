"""Fixtures: one engine per backend, and models in every declarative style.

Backends:

* ``sqlite``       in-memory SQLite, as the factory configures it (StaticPool);
* ``sqlite-file``  SQLite on a file in the test's tmp dir (a real pool);
* ``postgresql``   the server named by ``TEST_PG_DSN``;
* ``mysql``        the server named by ``TEST_MYSQL_DSN`` (MariaDB or MySQL).

Without the environment variable the server cases are skipped with the reason.
With it, a server that cannot be reached fails the test.

``FLAVOURS`` lists each database with each flavour of driver that reaches
it, threaded or asyncio; the ``either`` fixture runs one test body on every
entry (tests/test_behaviour.py).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import pathlib
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import (
    DeclarativeBase,
    DeclarativeBaseNoMeta,
    Mapped,
    MappedAsDataclass,
    declarative_base,
    mapped_column,
    registry,
)
from zope.interface import provider

from sparc.sa.engine import engine_from_config
from sparc.sa.interfaces import ISADeclarativeMeta
from sparc.sa.orm import ThreadLocalSASessionTransaction, scoped_transaction

SERVER_ENV = {"postgresql": "TEST_PG_DSN", "mysql": "TEST_MYSQL_DSN"}
SERVERS = ("postgresql", "mysql")


@dataclass(frozen=True)
class Flavour:
    """A database, and the driver that reaches it: the threaded manager's
    (``asyncio=False``: the driver the DSN names, SQLite's own for SQLite) or
    the asyncio manager's (that driver's asyncio sibling)."""

    database: str  # "sqlite" (in memory), "sqlite-file", "postgresql", "mysql" (MariaDB)
    driver: str  # SQLAlchemy's name of the asyncio driver; "sync" for the threaded one
    asyncio: bool

    @property
    def id(self) -> str:
        return f"{self.database}-{self.driver}"


#: Every database, threaded and asyncio: one list for both managers. The
#: asyncio drivers are tests/test_async.py's.
FLAVOURS = (
    Flavour("sqlite", "sync", False),
    Flavour("sqlite-file", "sync", False),
    Flavour("postgresql", "sync", False),
    Flavour("mysql", "sync", False),
    Flavour("sqlite", "aiosqlite", True),
    Flavour("sqlite-file", "aiosqlite", True),
    Flavour("postgresql", "asyncpg", True),
    Flavour("postgresql", "psycopg_async", True),
    Flavour("mysql", "asyncmy", True),
)
BACKENDS = tuple(f.database for f in FLAVOURS if not f.asyncio)


def server_dsn(name: str) -> str:
    var = SERVER_ENV[name]
    dsn = os.environ.get(var)
    if not dsn:
        pytest.skip(f"{var} is not set, so there is no {name} server to test against")
    return dsn


def backend_dsn(name: str, tmp_path: pathlib.Path) -> str:
    if name == "sqlite":
        return "sqlite://"
    if name == "sqlite-file":
        return f"sqlite:///{tmp_path / 'test.db'}"
    return server_dsn(name)


def flavour_dsn(flavour: Flavour, tmp_path: pathlib.Path) -> str:
    """The DSN of *flavour*; its server cases skip as the other tests' do,
    with the same reasons (a server variable unset)."""
    if not flavour.asyncio:
        return backend_dsn(flavour.database, tmp_path)
    if flavour.database == "sqlite":
        return "sqlite+aiosqlite://"
    if flavour.database == "sqlite-file":
        return f"sqlite+aiosqlite:///{tmp_path / 'test.db'}"
    var = SERVER_ENV[flavour.database]
    dsn = os.environ.get(var)
    if not dsn:  # tests/test_async.py's words
        pytest.skip(f"{var} is not set, so there is no server for {flavour.driver} to test against")
    url = sa.make_url(dsn).set(drivername=f"{sa.make_url(dsn).get_backend_name()}+{flavour.driver}")
    return str(url.render_as_string(hide_password=False))


def make_engine(dsn: str, **kwargs: Any) -> Engine:
    """An engine from the factory; raises at once if the server is unreachable."""
    engine = engine_from_config({"dsn": dsn, "kwargs": kwargs})
    with engine.connect():
        pass
    return engine


class CheckoutCounter:
    """Counts pool checkouts minus checkins through pool events, so that pools
    without ``checkedout()`` (StaticPool, SingletonThreadPool) are counted too."""

    def __init__(self, engine: Engine) -> None:
        self.out = 0
        sa.event.listen(engine, "checkout", self._checkout)
        sa.event.listen(engine, "checkin", self._checkin)

    def _checkout(self, *args: Any) -> None:
        self.out += 1

    def _checkin(self, *args: Any) -> None:
        self.out -= 1


def checked_out(engine: Engine) -> int:
    """``engine.pool.checkedout()``, or the event count where there is none."""
    pool = engine.pool
    if hasattr(pool, "checkedout"):
        return pool.checkedout()  # type: ignore[no-any-return]
    counter = engine.__dict__.get("_test_counter")
    return counter.out if counter is not None else 0


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def dsn(backend: str, tmp_path: pathlib.Path) -> str:
    return backend_dsn(backend, tmp_path)


@pytest.fixture
def engine(dsn: str) -> Iterator[Engine]:
    """The backend's engine, built by the factory; the test must leave the
    pool with nothing checked out."""
    engine = make_engine(dsn)
    engine.__dict__["_test_counter"] = CheckoutCounter(engine)
    yield engine
    left = checked_out(engine)
    engine.dispose()
    assert left == 0, f"{left} connection(s) still checked out after the test"


# -- models ---------------------------------------------------------------------


def _legacy_base() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sa.exc.MovedIn20Warning)
        from sqlalchemy.ext.declarative import declarative_base as legacy

        return legacy()


def _declarative_base_subclass() -> Any:
    class Base(DeclarativeBase):
        pass

    return Base


def _dataclass_base() -> Any:
    class Base(MappedAsDataclass, DeclarativeBase):
        pass

    return Base


def _no_meta_base() -> Any:
    @provider(ISADeclarativeMeta)
    class Base(DeclarativeBaseNoMeta):
        pass

    return Base


STYLES: dict[str, Callable[[], Any]] = {
    "declarative_base": declarative_base,
    "ext.declarative_base": _legacy_base,
    "registry.generate_base": lambda: registry().generate_base(),
    "DeclarativeBase": _declarative_base_subclass,
    "MappedAsDataclass": _dataclass_base,
    "DeclarativeBaseNoMeta": _no_meta_base,
}


def build_models(style: str = "declarative_base") -> SimpleNamespace:
    """A fresh Base with an ``Item`` and a ``Counter`` in uniquely named tables
    (runs share the server databases)."""
    Base = STYLES[style]()
    token = uuid.uuid4().hex[:10]
    dc: dict[str, Any] = {"init": False} if style == "MappedAsDataclass" else {}

    class Item(Base):  # type: ignore[valid-type,misc]
        __tablename__ = f"sparc_item_{token}"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True, **dc)
        name: Mapped[str] = mapped_column(sa.String(100), default="")

    class Counter(Base):  # type: ignore[valid-type,misc]
        __tablename__ = f"sparc_counter_{token}"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        value: Mapped[int] = mapped_column(default=0)

    return SimpleNamespace(Base=Base, Item=Item, Counter=Counter, token=token)


@pytest.fixture
def models(engine: Engine) -> Iterator[SimpleNamespace]:
    ns = build_models()
    ns.Base.metadata.create_all(engine)
    yield ns
    ns.Base.metadata.drop_all(engine)


@pytest.fixture
def transaction(engine: Engine, models: SimpleNamespace) -> ThreadLocalSASessionTransaction:
    """The shared manager for the backend's engine and the test's Base."""
    return scoped_transaction(engine, models.Base)


@pytest.fixture
def joined(engine: Engine, models: SimpleNamespace) -> Iterator[ThreadLocalSASessionTransaction]:
    """The shared manager (join='auto'), inside the ``transaction`` package's
    thread manager in explicit mode; its transaction is aborted after."""
    tm = pytest.importorskip("transaction").manager
    tm.explicit = True
    try:
        yield scoped_transaction(engine, models.Base)
    finally:
        if tm.manager._txn is not None:
            tm.abort()
        tm.explicit = False


class ReadOnlyTables:
    """For a module whose tests only read the same tables: per backend one
    engine and the tables ``fill(engine)`` makes and fills, made when a test
    first asks for them and dropped when the module ends, rather than
    created, filled and dropped for every test. A test that writes takes
    tables of its own instead.

    A module uses it as its ``shared`` fixture (module scope), with an
    ``engine`` fixture that returns :meth:`engine` and checks
    :func:`checked_out` after the test, as ``engine`` above does."""

    def __init__(self, fill: Callable[[Engine], SimpleNamespace], tmp: pathlib.Path) -> None:
        self.fill = fill
        self.tmp = tmp
        self.engines: dict[str, Engine] = {}
        self.tables: dict[str, SimpleNamespace] = {}

    def engine(self, backend: str) -> Engine:
        if backend not in self.engines:
            engine = make_engine(backend_dsn(backend, self.tmp))
            engine.__dict__["_test_counter"] = CheckoutCounter(engine)
            self.engines[backend] = engine
        return self.engines[backend]

    def filled(self, backend: str) -> SimpleNamespace:
        if backend not in self.tables:
            self.tables[backend] = self.fill(self.engine(backend))
        return self.tables[backend]

    def close(self) -> None:
        for backend, ns in self.tables.items():
            ns.Base.metadata.drop_all(self.engines[backend])
        for engine in self.engines.values():
            engine.dispose()


def shared_engine(shared: ReadOnlyTables, backend: str) -> Iterator[Engine]:
    """The body of a module's ``engine`` fixture over :class:`ReadOnlyTables`."""
    engine = shared.engine(backend)
    yield engine
    left = checked_out(engine)
    assert left == 0, f"{left} connection(s) still checked out after the test"


def managed_engine(dsn: str, **kwargs: Any) -> Iterator[tuple[Engine, Any, Any]]:
    """The body of a fixture: a factory engine with *kwargs*, models created
    on it and their manager; after the test, the tables dropped and nothing
    left checked out."""
    engine = make_engine(dsn, **kwargs)
    ns = build_models()
    ns.Base.metadata.create_all(engine)
    yield engine, ns, scoped_transaction(engine, ns.Base)
    ns.Base.metadata.drop_all(engine)
    assert engine.pool.checkedout() == 0
    engine.dispose()


def count_rows(engine: Engine, model: Any) -> int:
    """Rows as a fresh connection sees them, outside any session."""
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(model.__table__)).scalar_one()


def names(engine: Engine, model: Any) -> list[str]:
    with engine.connect() as conn:
        return sorted(conn.execute(sa.select(model.__table__.c.name)).scalars())


# -- one test body for both managers --------------------------------------------------


class Awaiting:
    """An AsyncSession (or the AsyncConnection it gives) for plain code that
    runs inside ``greenlet_spawn``: each coroutine method is awaited in place
    with ``await_only``, as ``await session.flush()`` would await it."""

    def __init__(self, target: Any) -> None:
        self.target = target

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.target, name)
        if not inspect.iscoroutinefunction(attr):
            return attr  # add(), add_all(), info ...: not awaited in asyncio either

        def awaited(*args: Any, **kwargs: Any) -> Any:
            from sqlalchemy.ext.asyncio import AsyncConnection
            from sqlalchemy.util import await_only

            result = await_only(attr(*args, **kwargs))
            return Awaiting(result) if isinstance(result, AsyncConnection) else result

        return awaited

    def __contains__(self, instance: object) -> bool:
        return instance in self.target

    def __iter__(self) -> Iterator[Any]:
        return iter(self.target)


class AwaitedBlock:
    """``with`` over one block of the asyncio manager: its own ``__aenter__``
    and ``__aexit__``, awaited in place, given what ``async with`` gives
    them (the exception, if any, and the answer whether to swallow it)."""

    def __init__(self, block: Any) -> None:
        self.block = block

    def __enter__(self) -> Awaiting:
        from sqlalchemy.util import await_only

        return Awaiting(await_only(self.block.__aenter__()))

    def __exit__(self, *exc_info: Any) -> bool:
        from sqlalchemy.util import await_only

        return bool(await_only(self.block.__aexit__(*exc_info)))


class Either:
    """One database, with the threaded or the asyncio manager, for a test
    body written once as plain code: ``with either.block() as session:``.

    Threaded, that is ``with tx() as session:`` and session is what the
    block gives (the scoped session). Asyncio, the whole test body runs in
    ``greenlet_spawn`` on this fixture's event loop (``pytest_pyfunc_call``
    below): ``block()`` is an :class:`AwaitedBlock` of the real asyncio
    block, and session the block's AsyncSession, :class:`Awaiting`.

    The models are conftest's ``Item`` (id, name) and ``Counter``; the test
    must leave nothing checked out."""

    def __init__(self, flavour: Flavour, dsn: str) -> None:
        self.flavour = flavour
        self.database = flavour.database
        self.asyncio = flavour.asyncio
        models = build_models()
        self.Base, self.Item, self.Counter = models.Base, models.Item, models.Counter
        self.loop: asyncio.AbstractEventLoop | None = None
        if flavour.asyncio:
            from sparc.sa import aio

            self.engine: Any = engine_from_config({"dsn": dsn})
            self.sync_engine: Engine = self.engine.sync_engine
            self.tx: Any = aio.async_scoped_transaction(self.engine, self.Base)
            # One loop for the whole test, set-up and tear-down too: an
            # in-memory database lives in its one connection, which belongs to
            # the loop that opened it.
            self.loop = asyncio.new_event_loop()
        else:
            self.engine = self.sync_engine = make_engine(dsn)
            self.tx = scoped_transaction(self.engine, self.Base)
        self.sync_engine.__dict__["_test_counter"] = CheckoutCounter(self.sync_engine)

    def drive(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``; asyncio, in ``greenlet_spawn`` on the fixture's loop."""
        if self.loop is None:
            return fn(*args)
        from sqlalchemy.util import greenlet_spawn

        return self.loop.run_until_complete(greenlet_spawn(fn, *args))

    def block(self, *args: Any, **kwargs: Any) -> Any:
        """A block, ``tx(*args, **kwargs)``, for ``with``."""
        block = self.tx(*args, **kwargs)
        return AwaitedBlock(block) if self.asyncio else block

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``tx.run(fn, *args, **kwargs)``: *fn* is plain code, given the session."""
        if not self.asyncio:
            return self.tx.run(fn, *args, **kwargs)
        from sqlalchemy.util import await_only, greenlet_spawn

        return await_only(
            self.tx.run(lambda session: greenlet_spawn(fn, Awaiting(session)), *args, **kwargs)
        )

    @property
    def session(self) -> Any:
        """The manager's ``tx.session``: the Session, or the AsyncSession."""
        return self.tx.session

    @staticmethod
    def unwrapped(session: Any) -> Any:
        """What a block gave, as ``tx.session`` gives it."""
        return session.target if isinstance(session, Awaiting) else session()

    def open_blocks(self) -> int:
        """How many blocks of the manager the current thread or task has open."""
        if self.asyncio:
            scope = self.tx.scopes.get(asyncio.current_task())
        else:
            scope = self.tx._existing_scope()
        return 0 if scope is None else len(scope.blocks)

    def names(self) -> list[str]:
        """The Item names committed, as a fresh connection sees them."""
        return names(self.sync_engine, self.Item)

    def count(self, model: Any = None) -> int:
        return count_rows(self.sync_engine, model or self.Item)

    def checked_out(self) -> int:
        return checked_out(self.sync_engine)

    def close(self) -> None:
        left = self.checked_out()
        try:
            if self.database in SERVERS:  # runs share the servers' databases
                self.drive(self.Base.metadata.drop_all, self.sync_engine)
        finally:
            if self.loop is None:
                self.engine.dispose()
            else:
                self.loop.run_until_complete(self.engine.dispose())
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
                self.loop.close()
        assert left == 0, f"{left} connection(s) still checked out after the test"


@pytest.fixture(params=FLAVOURS, ids=lambda flavour: flavour.id)
def either(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> Iterator[Either]:
    """Each database with each manager (``FLAVOURS``), the models' tables made."""
    either = Either(request.param, flavour_dsn(request.param, tmp_path))
    try:
        either.drive(either.Base.metadata.create_all, either.sync_engine)
    except BaseException:
        either.close()
        raise
    yield either
    either.close()


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """A test of the ``either`` fixture's asyncio flavour runs in
    ``greenlet_spawn`` on the fixture's event loop (see :class:`Either`)."""
    either = pyfuncitem.funcargs.get("either")
    if not isinstance(either, Either) or not either.asyncio:
        return None  # pytest calls the test as usual
    kwargs = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    either.drive(lambda: pyfuncitem.obj(**kwargs))
    return True


# -- pytest-xdist: what must not run on two workers at once -------------------------------

#: Modules whose tests change state outside the process that other tests of
#: the same group read or change too: one worker runs each group, in file
#: order (``--dist loadgroup``, DEVELOPERS.md "Running the tests in parallel").
GROUPED_MODULES = {
    # the shared PostgreSQL replica on 5433 (its replay delayed by ALTER SYSTEM)
    # and the throwaway fault replica (replay paused, stopped, promoted, re-made)
    "test_replicas.py": "pg-replicas",
    "test_replica_trust.py": "pg-replicas",
    # the MariaDB GTID pair on 3316/3317 (replication or a server stopped)
    "test_mariadb_replicas.py": "mariadb-replicas",
    # the process's own state: os.fork(), gevent's monkey patching (in a child)
    "test_fork.py": "process-fork",
    "test_gevent.py": "process-gevent",
}
#: Single tests in otherwise parallel modules, by test function name.
GROUPED_TESTS = {
    "test_async_readonly_on_replica_reads_own_writes": "pg-replicas",
    "test_signal_interrupts_during_many_blocks_never_wedge": "process-signals",
}


def group_of(nodeid: str) -> str | None:
    """The xdist group of the test *nodeid* (``tests/x.py::test_y[z]``), if any."""
    _, at, suffix = nodeid.rpartition("@")
    # A group pytest-xdist took from an xdist_group mark follows the whole
    # node id; an "@" inside a parameter's id (a URL's user@host) is followed
    # by the rest of the id, up to its "]".
    if at and "]" not in suffix and "::" not in suffix:
        return suffix
    path, _, name = nodeid.partition("::")
    function = name.rsplit("::", 1)[-1].split("[", 1)[0]
    return GROUPED_TESTS.get(function) or GROUPED_MODULES.get(path.rsplit("/", 1)[-1])


def pytest_itemcollected(item: pytest.Item) -> None:
    """The group as a mark too, for ``-m xdist_group`` and for readers."""
    group = group_of(item.nodeid)
    if group is not None:
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """``-n auto``: one worker more than pytest-xdist counts cores. Much of
    a test's time is spent waiting, not computing: on the servers' DDL and
    locks, on a replica's replay, on sleeps between tasks, on a subprocess
    starting; a third worker on two cores runs while the others wait
    (DEVELOPERS.md, "Running the tests in parallel", has the measurements).
    ``PYTEST_XDIST_AUTO_NUM_WORKERS`` still sets the number outright."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # pytest-xdist reads it
    from xdist.plugin import pytest_xdist_auto_num_workers as counted

    return int(counted(config)) + 1


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadgroup``, with the groups above read from the node ids.

    pytest-xdist 3.8 passes a mark's group to the controller by rewriting
    ``item._nodeid``, which pytest 9.2 no longer reads (its node ids come
    from ``item._id``): the marks alone would group nothing."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid) or nodeid

    return GroupScheduling(config, log)
