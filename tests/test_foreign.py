"""Other packages' private names, pinned: each one sparc.sa reaches (through
sparc/sa/foreign/) exists and behaves as relied on, so that a release of
``transaction``, SQLAlchemy, a driver, asyncio or zope.configuration that
changes one fails here, by name, rather than somewhere downstream.
docs/developers.rst lists them with the reason for each."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import socket
import sqlite3
import sys
from collections.abc import Iterator
from types import FrameType
from typing import Any

import pytest
import sqlalchemy as sa
import transaction
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.orm.session import SessionTransaction
from sqlalchemy.pool import AsyncAdaptedQueuePool, QueuePool, StaticPool

from sparc.sa.foreign import of_asyncio, of_sqlalchemy, of_transaction, of_zope_configuration
from tests.conftest import server_dsn

# -- transaction ----------------------------------------------------------------------


def test_transaction_a_manager_keeps_its_running_transaction_as__txn() -> None:
    tm = transaction.TransactionManager()
    assert of_transaction.running(tm) is None  # and asking begins none
    assert tm.__dict__.get(of_transaction.RUNNING) is None
    txn = tm.begin()
    assert of_transaction.running(tm) is txn
    assert tm.__dict__.get(of_transaction.RUNNING) is txn  # the inline read of a block
    tm.commit()
    assert of_transaction.running(tm) is None
    tm.get()  # implicit mode: get() begins one, which is then running
    assert of_transaction.running(tm) is tm.get()
    tm.abort()
    assert of_transaction.running(tm) is None


def test_transaction_the_thread_manager_holds_the_threads_own_as_manager() -> None:
    inner = transaction.manager.manager
    assert isinstance(inner, transaction.TransactionManager)
    assert of_transaction.RUNNING in vars(inner) or of_transaction.running(inner) is None


class _Synch:
    def beforeCompletion(self, txn: Any) -> None:
        pass

    def afterCompletion(self, txn: Any) -> None:
        pass

    def newTransaction(self, txn: Any) -> None:
        pass


def test_transaction_a_manager_keeps_its_synchronizers_as__synchs() -> None:
    tm = transaction.TransactionManager()
    synch = _Synch()
    tm.registerSynch(synch)
    assert synch in of_transaction.synchronizers(tm)
    tm.clearSynchs()  # what test layers and ZODB do
    assert synch not in of_transaction.synchronizers(tm)
    assert of_transaction.synchronizers(object()) is None


def test_transaction_ending_hooks_are_pending_until_all_have_run() -> None:
    tm = transaction.TransactionManager()
    txn = tm.begin()
    assert not of_transaction.ending_hooks_pending(txn)
    seen: list[bool] = []
    txn.addAfterCommitHook(lambda ok: seen.append(of_transaction.ending_hooks_pending(txn)))
    assert of_transaction.ending_hooks_pending(txn)
    tm.commit()
    assert seen == [True]  # still pending while they run
    assert not of_transaction.ending_hooks_pending(txn)
    txn = tm.begin()
    txn.addAfterAbortHook(lambda: seen.append(of_transaction.ending_hooks_pending(txn)))
    assert of_transaction.ending_hooks_pending(txn)
    tm.abort()
    assert seen == [True, True] and not of_transaction.ending_hooks_pending(txn)
    # Transaction objects that are not the package's: never pending.
    assert of_transaction.ending_hooks_pending(object())


def _ending_hook_on_stack(txn: Any) -> bool:
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if (
            frame.f_code.co_name in of_transaction.ENDING_HOOKS
            and frame.f_locals.get("self") is txn
        ):
            return True
        frame = frame.f_back
    return False


def test_transaction_ending_hooks_run_inside_methods_of_these_names() -> None:
    tm = transaction.TransactionManager()
    seen: list[tuple[str, bool]] = []
    for ending in ("commit", "abort", "failed commit"):
        txn = tm.begin()
        assert not _ending_hook_on_stack(txn)
        if ending == "abort":
            txn.addAfterAbortHook(
                lambda txn=txn: seen.append(("abort", _ending_hook_on_stack(txn)))
            )
            tm.abort()
            continue
        txn.addAfterCommitHook(
            lambda ok, txn=txn, ending=ending: seen.append((ending, _ending_hook_on_stack(txn)))
        )
        if ending == "commit":
            tm.commit()
            continue

        class Failing:
            def __getattr__(self, name: str) -> Any:
                if name == "sortKey":
                    return lambda: "failing"
                if name == "tpc_vote":

                    def vote(txn: Any) -> None:
                        raise RuntimeError("vote fails")

                    return vote
                return lambda *args: None

        txn.join(Failing())
        with pytest.raises(RuntimeError):
            tm.commit()
        tm.abort()
    assert seen == [("commit", True), ("abort", True), ("failed commit", True)]


# -- SQLAlchemy -----------------------------------------------------------------------


class Base(DeclarativeBase):
    pass


class Pinned(Base):
    __tablename__ = "sparc_sa_foreign_pinned"
    id: Mapped[int] = mapped_column(primary_key=True)


@pytest.fixture
def sqlite_engine() -> Iterator[sa.Engine]:
    engine = sa.create_engine("sqlite://", poolclass=StaticPool)
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


def test_sqlalchemy_a_session_transaction_keeps_its_connections_as__connections(
    sqlite_engine: sa.Engine,
) -> None:
    with Session(sqlite_engine) as session:
        session.begin()
        transaction = session.get_transaction()
        assert list(of_sqlalchemy.connections_of(transaction)) == []  # none taken yet
        connection = session.connection()
        # by bind, and by the connection too: each entry is the same
        (held,) = set(of_sqlalchemy.connections_of(transaction))
        assert held[0] is connection
        assert held[1] is connection.get_transaction()
        nested = session.begin_nested()
        assert session.connection() is connection  # the SAVEPOINT is taken now
        (held,) = set(of_sqlalchemy.connections_of(nested))
        assert held[0] is connection and held[1] is connection.get_nested_transaction()
        # a Core SAVEPOINT knows its name; the root transaction has none
        assert isinstance(of_sqlalchemy.savepoint_name(held[1]), str)
        assert of_sqlalchemy.savepoint_name(connection.get_transaction()) is None
    assert list(of_sqlalchemy.connections_of(object())) == []


def test_sqlalchemy_a_session_is_clean_until_something_is_to_flush(
    sqlite_engine: sa.Engine,
) -> None:
    with Session(sqlite_engine) as session, session.begin():
        assert of_sqlalchemy.is_clean(session)
        row = Pinned(id=1)
        session.add(row)
        assert not of_sqlalchemy.is_clean(session)  # new
        session.flush()
        assert of_sqlalchemy.is_clean(session)
        row.id = 2
        assert not of_sqlalchemy.is_clean(session)  # modified
        session.flush()
        session.delete(row)
        assert not of_sqlalchemy.is_clean(session)  # deleted
        session.flush()
        assert of_sqlalchemy.is_clean(session)


def test_sqlalchemy_pool_settings() -> None:
    pinging = sa.create_engine("sqlite://", pool_pre_ping=True)
    plain = sa.create_engine("sqlite://")
    assert of_sqlalchemy.pre_pings(pinging.pool) is True
    assert of_sqlalchemy.pre_pings(plain.pool) is False
    queue = QueuePool(lambda: sqlite3.connect(":memory:"), max_overflow=7, timeout=12)
    assert of_sqlalchemy.max_overflow(queue) == 7
    assert of_sqlalchemy.pool_timeout(queue) == 12 == queue.timeout()
    static = StaticPool(lambda: sqlite3.connect(":memory:"))
    assert of_sqlalchemy.max_overflow(static, "?") == "?"
    assert of_sqlalchemy.pool_timeout(static) is None
    assert of_sqlalchemy.pool_class_is_asyncio(AsyncAdaptedQueuePool)
    assert not of_sqlalchemy.pool_class_is_asyncio(QueuePool)
    assert not of_sqlalchemy.pool_class_is_asyncio(StaticPool)


def test_sqlalchemy_a_dialect_class_may_keep_its_isolation_levels_in_a_table() -> None:
    lookup = of_sqlalchemy.isolation_lookup(make_url("sqlite://").get_dialect())
    assert isinstance(lookup, (set, frozenset, dict))
    assert {"SERIALIZABLE", "READ UNCOMMITTED"} <= set(lookup)
    assert of_sqlalchemy.isolation_lookup(object()) is None


def test_sqlalchemy_a_query_keeps_its_limit_as__limit_clause(sqlite_engine: sa.Engine) -> None:
    with Session(sqlite_engine) as session:
        assert of_sqlalchemy.limit_clause(session.query(Pinned)) is None
        assert of_sqlalchemy.limit_clause(session.query(Pinned).limit(3)) is not None
        assert of_sqlalchemy.limit_clause(session.query(Pinned)[1:4]) is None  # a list


def test_sqlalchemy_a_sessions_checkout_runs_inside_connection_for_bind() -> None:
    """What tx/liveness.py reads off the stack: the checkout of a session's
    transaction runs inside SessionTransaction._connection_for_bind, whose
    locals say for which transaction, bind and execution options."""
    method = getattr(SessionTransaction, of_sqlalchemy.CONNECTION_FOR_BIND)
    params = list(inspect.signature(method).parameters)
    assert params[:3] == ["self", "bind", "execution_options"]
    engine = sa.create_engine("sqlite://")
    found: list[dict[str, Any]] = []

    def on_checkout(*args: Any) -> None:
        frame: FrameType | None = sys._getframe(1)
        while frame is not None:
            if frame.f_code.co_name == of_sqlalchemy.CONNECTION_FOR_BIND:
                found.append(dict(frame.f_locals))
                return
            frame = frame.f_back

    event.listen(engine, "checkout", on_checkout)
    with Session(engine) as session:
        session.connection(execution_options={"isolation_level": "SERIALIZABLE"})
        root = session.get_transaction()
    with engine.connect():
        pass  # not a session's: no such frame
    engine.dispose()
    (local,) = [f for f in found if isinstance(f.get("self"), SessionTransaction)]
    assert local["self"] is root and root.parent is None
    assert local["bind"] is engine
    assert local["execution_options"] == {"isolation_level": "SERIALIZABLE"}


# -- SQLAlchemy's adapters and the drivers (servers) -----------------------------------


def _async_url(driver: str) -> sa.URL:
    url = make_url(server_dsn("postgresql"))
    return url.set(drivername=f"postgresql+{driver}")


def test_psycopg_begins_its_transaction_with__start_query() -> None:
    psycopg = pytest.importorskip("psycopg")
    url = make_url(server_dsn("postgresql"))
    assert of_sqlalchemy.psycopg_has_start_query(psycopg.Connection)
    assert of_sqlalchemy.psycopg_has_start_query(psycopg.AsyncConnection)
    engine = sa.create_engine(url.set(drivername="postgresql+psycopg"), poolclass=sa.NullPool)
    try:
        raw = engine.raw_connection()
        try:
            conn = raw.driver_connection
            assert conn is not None
            assert conn.pgconn.transaction_status == 0  # idle
            with conn.lock:
                conn.wait(of_sqlalchemy.psycopg_start_query(conn))
            assert conn.pgconn.transaction_status == 2  # in a transaction: BEGIN sent
            with conn.lock:
                conn.wait(of_sqlalchemy.psycopg_start_query(conn))  # begun: sends nothing
            assert conn.pgconn.transaction_status == 2
            conn.rollback()
        finally:
            raw.close()
    finally:
        engine.dispose()


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
def test_sqlalchemys_asyncio_adapters(driver: str) -> None:
    pytest.importorskip(driver)
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(_async_url(driver), poolclass=sa.NullPool)

    def look(sync_conn: sa.Connection) -> None:
        adapter = sync_conn.connection.dbapi_connection
        if driver == "psycopg":
            import psycopg

            assert isinstance(of_sqlalchemy.adapted_connection(adapter), psycopg.AsyncConnection)
            return
        assert not of_sqlalchemy.adapter_began(adapter)
        await_ = getattr(type(adapter), "await_", None) or getattr(
            sa.util.concurrency, "await_", None
        )
        if await_ is None:
            await_ = sa.util.concurrency.await_only
        await_(of_sqlalchemy.start_adapter_transaction(adapter))
        assert of_sqlalchemy.adapter_began(adapter)
        assert of_sqlalchemy.adapted_connection(adapter).is_in_transaction()
        adapter.rollback()
        assert not of_sqlalchemy.adapter_began(adapter)

    async def main() -> None:
        async with engine.connect() as conn:
            await conn.run_sync(look)
            if driver == "asyncpg":
                raw = await conn.get_raw_connection()
                transport = of_sqlalchemy.driver_transport(raw.driver_connection)
                assert transport.get_extra_info("socket") is not None
        await engine.dispose()

    asyncio.run(main())


def test_aiomysql_keeps_its_transport_on__writer() -> None:
    pytest.importorskip("aiomysql")
    from sqlalchemy.ext.asyncio import create_async_engine

    url = make_url(server_dsn("mysql")).set(drivername="mysql+aiomysql")
    engine = create_async_engine(url, poolclass=sa.NullPool)

    async def main() -> None:
        async with engine.connect() as conn:
            raw = await conn.get_raw_connection()
            transport = of_sqlalchemy.driver_transport(raw.driver_connection)
            assert transport.get_extra_info("socket") is not None
        await engine.dispose()

    asyncio.run(main())


def test_aiosqlite_keeps_its_sqlite3_connection_as__connection() -> None:
    aiosqlite = pytest.importorskip("aiosqlite")

    async def main() -> None:
        driver = await aiosqlite.connect(":memory:")
        assert isinstance(of_sqlalchemy.aiosqlite_connection(driver), sqlite3.Connection)
        await driver.close()
        assert of_sqlalchemy.aiosqlite_connection(driver) is None

    asyncio.run(main())
    assert of_sqlalchemy.driver_transport(object()) is None


# -- asyncio --------------------------------------------------------------------------


def test_asyncio_running_loop_is_none_outside_a_loop() -> None:
    assert of_asyncio.running_loop() is None

    async def main() -> Any:
        return of_asyncio.running_loop() is asyncio.get_running_loop()

    assert asyncio.run(main()) is True


def test_asyncio_a_tasks_cancellation_is_pending_until_delivered() -> None:
    async def main() -> list[bool]:
        seen = [of_asyncio.cancel_pending(asyncio.current_task())]
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        seen.append(of_asyncio.cancel_pending(task))  # requested, not delivered
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            seen.append(of_asyncio.cancel_pending(task))  # delivered
        return seen

    assert asyncio.run(main()) == [False, True, False]
    assert of_asyncio.cancel_pending(object()) is False


def test_asyncio_a_transport_of_a_closed_loop_finishes_by__call_connection_lost() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    lost: list[Any] = []

    class Protocol(asyncio.Protocol):
        def connection_lost(self, exc: Exception | None) -> None:
            lost.append(exc)

    loop = asyncio.new_event_loop()
    try:
        transport, _ = loop.run_until_complete(
            loop.create_connection(Protocol, *server.getsockname())
        )
        sock = transport.get_extra_info("socket")
    finally:
        loop.close()
    accepted, _ = server.accept()
    try:
        with pytest.raises(RuntimeError):  # what tx/asyncblock.py catches
            transport.abort()
        of_asyncio.call_connection_lost(transport)
        assert lost == [None]
        assert sock.fileno() == -1  # closed
        assert accepted.recv(1) == b""  # the peer sees the end
    finally:
        accepted.close()
        server.close()


def test_contextlib_resumes_a_context_managers_generator_from_its_own_file() -> None:
    """Not a private name, a fact tx/suspended.py relies on: a
    ``contextmanager``'s generator is resumed from a frame of contextlib."""
    resumers: list[str] = []

    @contextlib.contextmanager
    def managed() -> Iterator[None]:
        frame = sys._getframe(0).f_back
        assert frame is not None
        resumers.append(frame.f_code.co_filename)
        yield

    with managed():
        pass
    assert resumers == [contextlib.__file__]


# -- zope.configuration ---------------------------------------------------------------


def test_zope_configuration_keeps_an_errors_details_as__details() -> None:
    from zope.configuration import xmlconfig
    from zope.configuration.exceptions import ConfigurationError

    error = ConfigurationError("bad")
    assert list(of_zope_configuration.error_details(error)) == []
    error.add_details('File "site.zcml", line 3.2')
    assert list(of_zope_configuration.error_details(error)) == ['File "site.zcml", line 3.2']
    with pytest.raises(ConfigurationError) as raised:
        xmlconfig.string(
            '<configure xmlns="http://namespaces.zope.org/zope">'
            '<include package="sparc.sa.no_such_package" /></configure>'
        )
    details = of_zope_configuration.error_details(raised.value)
    assert details and any("line" in str(detail) for detail in details)
    assert of_zope_configuration.error_details(ValueError()) is None
