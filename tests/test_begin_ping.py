"""On PostgreSQL, the liveness check of a block's checkout is its BEGIN
(sparc.sa.tx.liveness): one round trip fewer per transaction, the same
guarantee that a connection the server killed in the pool is never seen,
and every other checkout pinged as before.

Round trips are read from libpq's own protocol trace of the connection: a
simple query, or the Sync that ends an extended-protocol statement, is one
trip to the server and back."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import sqlalchemy as sa
import transaction as zope_transaction
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

from sparc.sa.engine import engine_from_config
from sparc.sa.orm import scoped_transaction
from sparc.sa.tx import liveness

from .conftest import build_models, make_engine, managed_engine, names, server_dsn
from .test_async import async_database
from .test_faults import backend_id, kill


@pytest.fixture
def pg() -> Iterator[tuple[Engine, Any, Any]]:
    """A factory engine with one connection, so that each checkout reuses
    (and pings) the one before; models; a manager."""
    yield from managed_engine(server_dsn("postgresql"), pool_size=1, max_overflow=0)


@contextmanager
def trips(engine: Engine) -> Iterator[list[str]]:
    """The round trips the pool's one connection makes inside the ``with``:
    a simple query by its text, an extended-protocol statement as "Sync"."""
    from psycopg import pq

    with engine.connect() as conn:
        raw = conn.connection.dbapi_connection
    sent: list[str] = []
    with tempfile.TemporaryFile("w+") as trace:
        raw.pgconn.trace(trace.fileno())
        raw.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
        try:
            yield sent
        finally:
            raw.pgconn.untrace()
            trace.seek(0)
            for line in trace:
                fields = line.rstrip("\n").split("\t")
                if fields[0] == "F" and fields[2] == "Query":
                    sent.append(fields[3].strip().strip('"'))
                elif fields[0] == "F" and fields[2] == "Sync":
                    sent.append("Sync")


@contextmanager
def class_pings(engine: Engine) -> Iterator[list[int]]:
    """Calls of the dialect class's own do_ping: SQLAlchemy's ping."""
    cls = type(engine.dialect)
    real = cls.do_ping
    calls: list[int] = []

    def counted(self: Any, dbapi_connection: Any) -> Any:
        calls.append(1)
        return real(self, dbapi_connection)

    cls.do_ping = counted  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        cls.do_ping = real  # type: ignore[method-assign]


def test_a_blocks_checkout_is_checked_by_its_begin(pg: tuple[Engine, Any, Any]) -> None:
    engine, ns, tx = pg
    assert liveness.begins_on_checkout(engine)
    with trips(engine) as sent, tx():
        tx.session.add(ns.Item(name="one"))
    assert sent == ["BEGIN", "Sync", "COMMIT"]
    # Anything else on the engine is pinged as before: ";" outside a transaction.
    with trips(engine) as sent, engine.connect() as conn:
        conn.execute(sa.text("select 1"))
    assert sent == [";", "BEGIN", "select 1", "ROLLBACK"]
    with trips(engine) as sent, sessionmaker(engine).begin() as session:
        session.add(ns.Item(name="plain"))
    assert sent[0] == ";"
    assert names(engine, ns.Item) == ["one", "plain"]


def test_a_connection_killed_in_the_pool_is_replaced_at_the_begin(
    pg: tuple[Engine, Any, Any],
) -> None:
    engine, ns, tx = pg
    admin = sa.create_engine(server_dsn("postgresql"), poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        victim = backend_id(engine, conn)
    kill(admin, victim)
    with class_pings(engine) as pinged, tx():
        tx.session.add(ns.Item(name="after"))
        assert backend_id(engine, tx.session) != victim
    assert pinged == []  # the BEGIN found the dead connection, not a ping
    assert names(engine, ns.Item) == ["after"]
    assert engine.pool.checkedout() == 0


def test_a_joined_transaction_is_checked_by_its_begin(pg: tuple[Engine, Any, Any]) -> None:
    engine, ns, tx = pg
    with trips(engine) as sent, zope_transaction.manager, tx():
        tx.session.add(ns.Item(name="joined"))
    assert sent == ["BEGIN", "Sync", "COMMIT"]
    assert names(engine, ns.Item) == ["joined"]


def show(session: Any, setting: str) -> str:
    return str(session.execute(sa.text(f"show {setting}")).scalar())


def test_the_begin_is_the_connections_own(pg: tuple[Engine, Any, Any]) -> None:
    """An engine's isolation level (set on each connection as it connects)
    is in the BEGIN psycopg would have sent."""
    _, ns, _ = pg
    engine = make_engine(
        server_dsn("postgresql"), pool_size=1, max_overflow=0, isolation_level="REPEATABLE READ"
    )
    try:
        tx = scoped_transaction(engine, ns.Base)
        with trips(engine) as sent, tx():
            level = show(tx.session, "transaction_isolation")
        assert sent[0] == "BEGIN ISOLATION LEVEL REPEATABLE READ" and level == "repeatable read"
    finally:
        engine.dispose()


def test_execution_options_keep_the_ping(pg: tuple[Engine, Any, Any]) -> None:
    """A checkout with execution options may still set how the transaction
    begins: it is pinged, and the options apply."""
    engine, _, tx = pg
    with trips(engine) as sent, tx():
        tx.session.connection(execution_options={"isolation_level": "SERIALIZABLE"})
        level = show(tx.session, "transaction_isolation")
    assert sent[0] == ";" and level == "serializable"


def test_an_engine_with_characteristics_in_its_options_keeps_the_ping() -> None:
    engine = engine_from_config(
        {
            "dsn": server_dsn("postgresql"),
            "kwargs": {"execution_options": {"isolation_level": "SERIALIZABLE"}},
        }
    )
    try:
        assert liveness.is_checked(engine) and not liveness.begins_on_checkout(engine)
        ns = build_models()
        tx = scoped_transaction(engine, ns.Base)
        with engine.connect():
            pass
        with tx():
            assert show(tx.session, "transaction_isolation") == "serializable"
    finally:
        engine.dispose()


def test_a_read_only_block_keeps_the_ping(pg: tuple[Engine, Any, Any]) -> None:
    engine, _, tx = pg
    with trips(engine) as sent, tx(readonly=True):
        read_only = show(tx.session, "transaction_read_only")
    assert sent[0] == ";" and read_only == "on"


def test_other_checkouts_inside_a_block_can_still_switch_to_autocommit(
    pg: tuple[Engine, Any, Any],
) -> None:
    """Only the session's own checkout begins at once: a connection taken
    beside it, before or after the session's first statement, can still be
    switched to autocommit, which psycopg refuses inside a transaction."""
    _, ns, _ = pg
    engine = make_engine(server_dsn("postgresql"), pool_size=2, max_overflow=0)
    try:
        tx = scoped_transaction(engine, ns.Base)
        with engine.connect(), engine.connect():
            pass  # both connections pooled, so both are pinged when taken
        with tx():
            bind = tx.session.get_bind()
            raw = bind.raw_connection()
            try:
                raw.driver_connection.autocommit = True
                raw.cursor().execute("select 1")
            finally:
                raw.driver_connection.autocommit = False
                raw.close()
            tx.session.add(ns.Item(name="kept"))
            tx.session.flush()
            with bind.connect() as conn:
                conn = conn.execution_options(isolation_level="AUTOCOMMIT")
                assert conn.execute(sa.text("select 1")).scalar() == 1
        assert names(engine, ns.Item) == ["kept"]
        assert engine.pool.checkedout() == 0
    finally:
        engine.dispose()


@pytest.fixture(params=["asyncpg", "psycopg_async"])
def adb(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Any]:
    yield from async_database(request.param, tmp_path)


def test_an_async_blocks_checkout_is_checked_by_its_begin(adb: Any) -> None:
    engine = adb.engine.sync_engine
    assert liveness.begins_on_checkout(engine)
    admin = sa.create_engine(server_dsn("postgresql"), poolclass=sa.pool.NullPool)

    async def main() -> list[int]:
        async with adb.engine.connect() as conn:  # one pooled connection, then killed
            victim = await conn.scalar(sa.text("select pg_backend_pid()"))
        kill(admin, victim)
        with class_pings(engine) as pinged:
            for i in range(3):
                async with adb.tx():
                    adb.tx.session.add(adb.Item(id=i, name="x"))
                    pid = await adb.tx.session.scalar(sa.text("select pg_backend_pid()"))
                    assert pid != victim
            async with adb.tx(readonly=True):  # pinged: it begins READ ONLY
                on = await adb.tx.session.scalar(sa.text("show transaction_read_only"))
        assert on == "on" and len(pinged) == 1
        async with adb.engine.connect() as conn:
            found = await conn.execute(sa.select(adb.Item.id).order_by(adb.Item.id))
            return list(found.scalars())

    assert adb.run(main) == [0, 1, 2]


def test_the_factory_installs_it_only_where_it_can() -> None:
    sqlite = engine_from_config({"dsn": "sqlite://"})
    assert not liveness.begins_on_checkout(sqlite)
    pg = engine_from_config({"dsn": server_dsn("postgresql")})
    asked = engine_from_config({"dsn": server_dsn("postgresql"), "kwargs": {"pool_pre_ping": True}})
    off = engine_from_config({"dsn": server_dsn("postgresql"), "kwargs": {"pool_pre_ping": False}})
    try:
        assert liveness.begins_on_checkout(pg) and liveness.begins_on_checkout(asked)
        assert not liveness.is_checked(off) and not liveness.begins_on_checkout(off)
    finally:
        for engine in (sqlite, pg, asked, off):
            engine.dispose()
