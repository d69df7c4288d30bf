"""The asyncio manager: ``async with tx()`` on aiosqlite, asyncpg, psycopg async and asyncmy.

Each test runs its own event loop with ``asyncio.run()``. Server cases read
the same DSN variables as the threaded tests, with the driver swapped for its
asyncio sibling; without the variable they are skipped with the reason.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import random
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.util import await_only
from zope.component import getMultiAdapter, getUtility
from zope.configuration import xmlconfig

from sparc.sa import aio
from sparc.sa.engine import engine_from_config
from sparc.sa.exceptions import (
    BlockOrderError,
    CrossScopeSessionError,
    ForeignEventLoopError,
    InterleavedTransactionError,
)
from sparc.sa.interfaces import ISAAsyncEngine, ISAAsyncScopedTransaction, ISAEngine

from .conftest import CheckoutCounter

ASYNC_BACKENDS = ("aiosqlite", "aiosqlite-file", "asyncpg", "psycopg_async", "asyncmy")
SERVER = {
    "asyncpg": ("TEST_PG_DSN", "postgresql+asyncpg"),
    "psycopg_async": ("TEST_PG_DSN", "postgresql+psycopg_async"),
    "asyncmy": ("TEST_MYSQL_DSN", "mysql+asyncmy"),
}


def async_dsn(name: str, tmp_path: pathlib.Path) -> str:
    if name == "aiosqlite":
        return "sqlite+aiosqlite://"
    if name == "aiosqlite-file":
        return f"sqlite+aiosqlite:///{tmp_path / 'async.db'}"
    var, driver = SERVER[name]
    dsn = os.environ.get(var)
    if not dsn:
        pytest.skip(f"{var} is not set, so there is no server for {name} to test against")
    return str(sa.make_url(dsn).set(drivername=driver).render_as_string(hide_password=False))


def checked_out(engine: AsyncEngine) -> int:
    """The pool's ``checkedout()``; counted through pool events for StaticPool."""
    pool = engine.sync_engine.pool
    if hasattr(pool, "checkedout"):
        return pool.checkedout()  # type: ignore[no-any-return]
    return engine.sync_engine.__dict__["_test_counter"].out  # type: ignore[no-any-return]


@pytest.fixture(params=ASYNC_BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def db(backend: str, tmp_path: pathlib.Path) -> Iterator[SimpleNamespace]:
    """An async engine from the factory, a fresh Base with an Item table, and
    the shared manager; the test must leave nothing checked out."""
    yield from async_database(backend, tmp_path)


def async_database(backend: str, tmp_path: pathlib.Path) -> Iterator[SimpleNamespace]:
    """The body of the ``db`` fixture, for other test modules' fixtures."""
    engine = engine_from_config({"dsn": async_dsn(backend, tmp_path)})
    assert isinstance(engine, AsyncEngine)
    engine.sync_engine.__dict__["_test_counter"] = CheckoutCounter(engine.sync_engine)
    token = uuid.uuid4().hex[:10]

    class Base(DeclarativeBase):
        pass

    class Item(Base):
        __tablename__ = f"sparc_async_item_{token}"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        name: Mapped[str] = mapped_column(sa.String(50), default="")

    ns = SimpleNamespace(engine=engine, Base=Base, Item=Item, backend=backend, left=[])
    ns.tx = aio.async_scoped_transaction(engine, Base)

    async def around(main: Callable[[], Awaitable[Any]]) -> Any:
        # One event loop for the whole test: an in-memory database lives in
        # its one connection, which belongs to the loop that opened it.
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        try:
            return await main()
        finally:
            ns.left.append(checked_out(engine))
            # Dropped on every backend: the servers' because runs share those
            # databases, SQLite's because a DROP fails while anything of the
            # test still holds the table (a statement left running).
            async with engine.begin() as conn:
                await conn.run_sync(Base.metadata.drop_all)

    ns.run = lambda main: _run(engine, lambda: around(main))
    yield ns
    assert ns.left, "the test never ran its main coroutine"
    assert ns.left == [0], f"{ns.left} connection(s) still checked out after the test"


def _run(engine: AsyncEngine, main: Callable[[], Awaitable[Any]]) -> Any:
    """asyncio.run(main()), then close the engine's connections on that loop."""

    async def wrapper() -> Any:
        try:
            return await main()
        finally:
            await engine.dispose()

    return asyncio.run(wrapper())


async def ids(db: SimpleNamespace) -> list[int]:
    async with db.engine.connect() as conn:
        found = await conn.execute(sa.select(db.Item.id).order_by(db.Item.id))
        return list(found.scalars())


# -- blocks -----------------------------------------------------------------------


def test_a_blocks_first_read_runs_inside_its_transaction(db: SimpleNamespace) -> None:
    async def main() -> bool:
        async with db.tx() as session:
            await session.execute(sa.select(db.Item.id))
            connection = await session.connection()
            raw = await connection.get_raw_connection()
            driver = raw.driver_connection
            if db.backend.startswith("aiosqlite"):
                return bool(driver.in_transaction)  # type: ignore[union-attr]
            return connection.in_transaction()

    assert db.run(main) is True


def test_two_tasks_interleaving_never_share_a_session(db: SimpleNamespace) -> None:
    async def worker(n: int, seen: dict[int, AsyncSession], turn: asyncio.Event) -> None:
        async with db.tx() as session:
            seen[n] = session
            session.add(db.Item(id=n))
            await session.flush()
            turn.set()
            await asyncio.sleep(0.01)
            assert db.tx.session is session
            if n == 2:
                raise RuntimeError("task 2 fails")

    async def main() -> list[int]:
        seen: dict[int, AsyncSession] = {}
        events = [asyncio.Event(), asyncio.Event()]
        results = await asyncio.gather(
            worker(1, seen, events[0]), worker(2, seen, events[1]), return_exceptions=True
        )
        assert seen[1] is not seen[2]
        assert isinstance(results[1], RuntimeError)
        return await ids(db)

    assert db.run(main) == [1]


def test_joining_a_transaction_manager_is_refused_with_the_reason(db: SimpleNamespace) -> None:
    """The `transaction` package commits synchronously: an asyncio block
    cannot join it. Refused before anything opens, block and run() alike."""
    import transaction

    tm = transaction.TransactionManager(explicit=True)

    async def main() -> list[int]:
        with pytest.raises(TypeError, match="commits synchronously"):
            db.tx(transaction_manager=tm)
        with pytest.raises(TypeError, match="commits synchronously"):
            await db.tx.run(lambda session: None, transaction_manager=tm)
        async with db.tx() as session:  # nothing was left open
            session.add(db.Item(id=1))
        return await ids(db)

    assert db.run(main) == [1]


def test_a_child_task_does_not_use_its_parents_session(db: SimpleNamespace) -> None:
    async def child() -> str:
        with pytest.raises(CrossScopeSessionError):
            db.tx.session  # noqa: B018 - the lookup itself must fail
        if db.backend == "aiosqlite":  # one connection for all tasks
            with pytest.raises(InterleavedTransactionError):
                async with db.tx():
                    pass
            return "refused"
        async with db.tx() as session:
            session.add(db.Item(id=2))
            return "own block"

    async def main() -> tuple[str, list[int]]:
        async with db.tx() as session:
            session.add(db.Item(id=1))
            outcome = await asyncio.create_task(child())
        return outcome, await ids(db)

    outcome, found = db.run(main)
    assert found == ([1] if outcome == "refused" else [1, 2])


def test_objects_are_readable_after_the_block(db: SimpleNamespace) -> None:
    async def main() -> str:
        async with db.tx() as session:
            item = db.Item(id=1, name="still here")
            session.add(item)
        async with db.tx() as session:
            loaded = await session.get(db.Item, 1)
        assert loaded is not None
        return f"{item.name}/{loaded.name}/{loaded.id}"  # no MissingGreenlet

    assert db.run(main) == "still here/still here/1"


def test_the_session_outside_a_block_is_an_error(db: SimpleNamespace) -> None:
    async def main() -> None:
        with pytest.raises(CrossScopeSessionError, match="async with tx"):
            db.tx.session  # noqa: B018
        with pytest.raises(TypeError, match="async with"), db.tx:
            pass

    db.run(main)


def test_a_block_ending_before_its_inner_blocks_rolls_back_at_once(db: SimpleNamespace) -> None:
    """The middle of three blocks ends first: the state machine the threaded
    blocks use (sparc.sa.tx.stack) rolls the whole transaction back there and
    then, and gives the connection back; each block still open raises when
    it ends, and what the innermost's code wrote after that is rolled back
    at its end, leaving no connection out."""

    async def main() -> tuple[list[int], list[int]]:
        outer, middle, inner = db.tx(), db.tx(), db.tx()
        session = await outer.__aenter__()
        session.add(db.Item(id=1))
        await middle.__aenter__()
        await inner.__aenter__()
        session.add(db.Item(id=2))
        await session.flush()
        with pytest.raises(BlockOrderError, match="1 block"):
            await middle.__aexit__(None, None, None)
        out = [checked_out(db.engine)]
        session.add(db.Item(id=3))
        await session.flush()  # after the rollback: belongs to no block
        with pytest.raises(BlockOrderError, match="rolled back, not committed"):
            await inner.__aexit__(None, None, None)
        with pytest.raises(BlockOrderError, match="rolled back, not committed"):
            await outer.__aexit__(None, None, None)
        out.append(checked_out(db.engine))
        async with db.tx() as fresh:  # the task opens blocks again
            fresh.add(db.Item(id=4))
        return out, await ids(db)

    out, found = db.run(main)
    assert found == [4]
    assert out == [0, 0]


# -- retries ------------------------------------------------------------------------


class _Serialization(Exception):
    sqlstate = "40001"


def test_run_retries_serialization_failures_only(db: SimpleNamespace) -> None:
    calls: list[int] = []

    async def flaky(session: AsyncSession, n: int) -> str:
        calls.append(n)
        session.add(db.Item(id=len(calls)))
        await session.flush()
        if len(calls) < 3:
            raise sa.exc.OperationalError("UPDATE", {}, _Serialization())
        return "done"

    async def main() -> list[int]:
        assert await db.tx.run(flaky, 7, attempts=3) == "done"
        with pytest.raises(ZeroDivisionError):
            await db.tx.run(lambda session: 1 / 0)
        return await ids(db)

    assert db.run(main) == [3]
    assert calls == [7, 7, 7]


def test_concurrent_increments_lose_no_update(backend: str, tmp_path: pathlib.Path) -> None:
    """8 tasks x 5 read-modify-write increments at SERIALIZABLE (SQLite: a
    file, whose writers lock) end at exactly 40, retried by run()."""
    if backend == "aiosqlite":
        pytest.skip("one shared in-memory connection: blocks take turns, nothing conflicts")
    kwargs = {} if backend.startswith("aiosqlite") else {"isolation_level": "SERIALIZABLE"}
    engine = engine_from_config({"dsn": async_dsn(backend, tmp_path), "kwargs": kwargs})
    token = uuid.uuid4().hex[:10]

    class Base(DeclarativeBase):
        pass

    class Counter(Base):
        __tablename__ = f"sparc_async_counter_{token}"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        value: Mapped[int]

    tx = aio.async_scoped_transaction(engine, Base)

    async def bump(session: AsyncSession) -> None:
        counter = await session.get(Counter, 1, with_for_update=backend.startswith("aiosqlite"))
        assert counter is not None
        await asyncio.sleep(random.random() / 1000)
        counter.value += 1

    async def worker() -> None:
        for _ in range(5):
            await tx.run(bump, attempts=50)

    async def main() -> int:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        try:
            async with tx() as session:
                session.add(Counter(id=1, value=0))
            await asyncio.gather(*(worker() for _ in range(8)))
            async with tx() as session:
                found = await session.get(Counter, 1)
                return found.value if found else -1
        finally:
            async with engine.begin() as conn:
                await conn.run_sync(Base.metadata.drop_all)

    assert _run(engine, main) == 40


# -- cancellation and task death --------------------------------------------------


def test_a_task_cancelled_inside_a_block_commits_nothing(db: SimpleNamespace) -> None:
    async def victim(started: asyncio.Event) -> None:
        async with db.tx() as session:
            session.add(db.Item(id=1))
            await session.flush()
            started.set()
            await asyncio.sleep(10)

    async def main() -> list[int]:
        started = asyncio.Event()
        task = asyncio.create_task(victim(started))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert checked_out(db.engine) == 0
        return await ids(db)

    assert db.run(main) == []


class _SlowCommit(AsyncSession):
    async def commit(self) -> None:
        await asyncio.sleep(0.2)  # the task is cancelled during this
        await super().commit()


class _SlowSyncCommit(Session):
    def commit(self) -> None:
        await_only(asyncio.sleep(0.2))  # the same, inside the greenlet
        super().commit()


# A block ends its session in one greenlet (the sync session's COMMIT and
# close) unless the AsyncSession class is the user's own: both ways.
SLOW_COMMITS = {
    "async-session-class": {"class_": _SlowCommit},
    "sync-session-class": {"sync_session_class": _SlowSyncCommit},
}


@pytest.mark.parametrize("slow", sorted(SLOW_COMMITS))
def test_a_task_cancelled_while_its_block_commits_leaves_no_connection(
    db: SimpleNamespace, slow: str
) -> None:
    tx = aio.AsyncScopedTransaction(db.engine, db.Base)
    tx.session_factory = async_sessionmaker(db.engine, expire_on_commit=False, **SLOW_COMMITS[slow])

    async def victim(exiting: asyncio.Event) -> None:
        async with tx() as session:
            session.add(db.Item(id=1))
            await session.flush()
            exiting.set()

    async def main() -> list[int]:
        exiting = asyncio.Event()
        task = asyncio.create_task(victim(exiting))
        await exiting.wait()
        await asyncio.sleep(0.05)  # inside the commit now
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert checked_out(db.engine) == 0
        return await ids(db)

    assert db.run(main) == [1]  # the COMMIT was under way: it completed


def test_a_task_that_ends_with_its_block_open_gives_the_connection_back(
    db: SimpleNamespace,
) -> None:
    async def careless() -> None:
        session = await db.tx().__aenter__()
        session.add(db.Item(id=1))
        await session.flush()

    async def main() -> list[int]:
        await asyncio.create_task(careless())
        for _ in range(50):
            if checked_out(db.engine) == 0:
                break
            await asyncio.sleep(0.01)
        assert checked_out(db.engine) == 0
        return await ids(db)

    assert db.run(main) == []


def test_a_thousand_tasks_a_tenth_cancelled(db: SimpleNamespace) -> None:
    """Cancelled at random points, before, inside or while ending their blocks:
    nothing stays checked out, and the table holds exactly the rows whose
    COMMIT succeeded."""
    committed: set[int] = set()

    def note(session: Any) -> None:
        committed.update(session.info.get("ids", ()))

    sa.event.listen(
        db.tx.session_factory.kw.get("sync_session_class", sa.orm.Session), "after_commit", note
    )
    rng = random.Random(1000)

    async def insert(session: AsyncSession, n: int) -> None:
        session.info["ids"] = [n]
        session.add(db.Item(id=n))
        await asyncio.sleep(rng.random() / 200)
        await session.flush()
        await asyncio.sleep(rng.random() / 200)

    async def work(n: int) -> None:
        await asyncio.sleep(rng.random() / 100)
        # run() retries SQLite's "database is locked" under this many writers
        await db.tx.run(insert, n, attempts=100)

    async def main() -> tuple[list[int], set[int]]:
        tasks = [asyncio.create_task(work(n)) for n in range(1, 1001)]
        victims = rng.sample(tasks, 100)
        for task in victims:
            await asyncio.sleep(rng.random() / 500)
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        succeeded = {n for n, r in enumerate(results, 1) if r is None}
        odd = [r for r in results if r is not None and not isinstance(r, asyncio.CancelledError)]
        assert not odd, odd[:3]
        assert checked_out(db.engine) == 0
        return await ids(db), succeeded

    try:
        found, succeeded = db.run(main)
    finally:
        sa.event.remove(
            db.tx.session_factory.kw.get("sync_session_class", sa.orm.Session), "after_commit", note
        )
    assert set(found) == committed
    assert succeeded <= committed
    assert len(succeeded) >= 900 - 100  # most tasks were never cancelled


# -- event loops --------------------------------------------------------------------


def test_a_second_event_loop_gets_a_clear_error(tmp_path: pathlib.Path) -> None:
    engine = engine_from_config({"dsn": f"sqlite+aiosqlite:///{tmp_path / 'loops.db'}"})

    class Base(DeclarativeBase):
        pass

    tx = aio.async_scoped_transaction(engine, Base)

    async def block() -> int:
        async with tx() as session:
            return int((await session.execute(sa.text("select 1"))).scalar_one())

    first = asyncio.new_event_loop()
    try:
        assert first.run_until_complete(block()) == 1
        result: list[BaseException] = []

        def second_loop() -> None:
            with pytest.raises(ForeignEventLoopError) as caught:
                asyncio.run(block())
            result.append(caught.value)

        thread = threading.Thread(target=second_loop)
        thread.start()
        thread.join(10)
        assert not thread.is_alive() and "another, still open event loop" in str(result[0])
        first.run_until_complete(engine.dispose())
    finally:
        first.close()
    assert _run(engine, block) == 1  # the first loop is closed: a new one takes over


# -- configuration ------------------------------------------------------------------


def test_async_dsns_build_async_engines(zcml: None) -> None:
    from zope.component import createObject

    engine = createObject("sparc.sa.engine.engine_from_config", {"dsn": "sqlite+aiosqlite://"})
    assert ISAAsyncEngine.providedBy(engine) and not ISAEngine.providedBy(engine)

    class Base(DeclarativeBase):
        pass

    manager = getMultiAdapter((engine, Base), ISAAsyncScopedTransaction)
    assert manager is getMultiAdapter((engine, Base), ISAAsyncScopedTransaction)
    assert isinstance(manager, aio.AsyncScopedTransaction)
    pg = engine_from_config(
        {"dsn": "postgresql+asyncpg://app:s3cret@db.invalid/app", "kwargs": {"pool_size": "7"}}
    )
    assert pg.sync_engine.pool.size() == 7
    with pytest.raises(ValueError, match="pool_size") as caught:
        engine_from_config(
            {"dsn": "postgresql+asyncpg://app:s3cret@db.invalid/app", "kwargs": {"pool_size": "x"}}
        )
    assert "s3cret" not in str(caught.value)


def test_zcml_registers_the_async_engine_and_manager() -> None:
    xmlconfig.string(
        """<configure xmlns="http://namespaces.zope.org/zope"
                      xmlns:sa="http://namespaces.zope.org/sparc.sa">
             <include package="sparc.sa" />
             <sa:engine name="aio" dsn="sqlite+aiosqlite://" />
             <sa:transaction name="aio" engine="aio" base="sparc.sa.testing.Base" />
           </configure>"""
    )
    engine = getUtility(ISAAsyncEngine, "aio")
    manager = getUtility(ISAAsyncScopedTransaction, "aio")
    assert manager.engine is engine


def test_missing_greenlet_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "greenlet" else real(name, *a)
    )
    with pytest.raises(ImportError, match=r"sparc\.sa\[async\]"):
        engine_from_config({"dsn": "sqlite+aiosqlite://"})


# -- aiosqlite: the BEGIN a block sends -------------------------------------------


@pytest.fixture(params=["factory", "create_async_engine"])
def aiosqlite_file(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> Iterator[Any]:
    """A SQLite file in WAL mode (a writer beside a reader), an aiosqlite
    engine from sparc.sa's factory or from plain ``create_async_engine()``
    (whose connections are the driver's own), and a manager."""
    from sqlalchemy.ext.asyncio import create_async_engine

    from sparc.sa.tx.sqlitebegin import BeginningConnection

    dsn = f"sqlite+aiosqlite:///{tmp_path / 'begin.db'}"
    engine: Any = (
        engine_from_config({"dsn": dsn}) if request.param == "factory" else create_async_engine(dsn)
    )

    class Base(DeclarativeBase):
        pass

    class Item(Base):
        __tablename__ = "item"
        id: Mapped[int] = mapped_column(primary_key=True)

    async def setup() -> type[Any]:
        async with engine.begin() as conn:
            await conn.exec_driver_sql("PRAGMA journal_mode=WAL")
            await conn.run_sync(Base.metadata.create_all)
            raw = await conn.get_raw_connection()
            return type(raw.driver_connection._connection)  # type: ignore[union-attr]

    kind = asyncio.run(setup())
    assert (kind is BeginningConnection) is (request.param == "factory")
    engine.sync_engine.__dict__["_test_counter"] = CheckoutCounter(engine.sync_engine)
    yield SimpleNamespace(
        engine=engine, Item=Item, tx=aio.async_scoped_transaction(engine, Base), via=request.param
    )
    asyncio.run(engine.dispose())


def test_aiosqlite_a_blocks_reads_share_one_snapshot(aiosqlite_file: Any) -> None:
    """A row another connection commits between two reads of one block is
    not seen by the second read: the block began before its first read."""
    db = aiosqlite_file
    count = sa.select(sa.func.count()).select_from(db.Item)

    async def main() -> tuple[int, int, int]:
        async with db.tx() as session:
            first = await session.scalar(count)
            async with db.engine.begin() as other:
                await other.execute(sa.insert(db.Item))
            second = await session.scalar(count)
        async with db.tx() as session:
            after = await session.scalar(count)
        return first, second, after

    assert asyncio.run(main()) == (0, 0, 1)
    assert checked_out(db.engine) == 0


def test_aiosqlite_a_block_that_sent_nothing_leaves_no_begin_behind(aiosqlite_file: Any) -> None:
    """A block that took its connection and sent no statement: the next user
    of that connection, outside any block, is not put in a transaction."""
    db = aiosqlite_file

    async def main() -> bool:
        async with db.tx() as session:
            await session.connection()
        async with db.engine.connect() as conn:
            await conn.exec_driver_sql("SELECT 1")
            raw = await conn.get_raw_connection()
            return bool(raw.driver_connection.in_transaction)  # type: ignore[union-attr]

    assert asyncio.run(main()) is False


def test_aiosqlite_a_reading_block_makes_no_more_trips_than_plain(
    aiosqlite_file: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every call into aiosqlite's thread is one trip (counted at aiosqlite's
    queue). A block that reads sends a BEGIN that plain
    ``async_sessionmaker.begin()`` does not, and skips the pool's ROLLBACK
    after its COMMIT (sparc.sa.connections.resets): on the factory's engine the BEGIN
    rides on the first statement's trip, so the block makes one trip fewer
    than plain; elsewhere the BEGIN is a trip of its own."""
    import aiosqlite

    db = aiosqlite_file
    trips = [0]
    execute = aiosqlite.Connection._execute

    async def counted(self: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
        trips[0] += 1
        return await execute(self, fn, *args, **kwargs)

    plain = async_sessionmaker(db.engine)

    async def plain_read() -> None:
        async with plain.begin() as session:
            await session.get(db.Item, 1)

    async def block_read() -> None:
        async with db.tx() as session:
            await session.get(db.Item, 1)

    async def main() -> tuple[int, int]:
        await plain_read()  # a connection in the pool
        await block_read()
        monkeypatch.setattr(aiosqlite.Connection, "_execute", counted)
        counts = []
        for read in (plain_read, block_read):
            trips[0] = 0
            await read()
            counts.append(trips[0])
        return counts[0], counts[1]

    plain_trips, block_trips = asyncio.run(main())
    if db.via == "factory":
        assert block_trips == plain_trips - 1, (plain_trips, block_trips)
    else:
        # The BEGIN as a statement of its own: one trip through SQLAlchemy
        # 2.1's aiosqlite adapter, three through 2.0.0's (cursor, execute,
        # close); less the reset's.
        assert plain_trips <= block_trips <= plain_trips + 2, (plain_trips, block_trips)
