"""Every block's outcome is the one its caller saw.

A block's work is committed exactly when its ``with`` / ``async with``
statement exited normally: cancellations injected at every await of a block,
interruptions on the one connection of an in-memory database, a block left
open by a suspended generator, a cancellation swallowed inside a block, and
a block left open when its event loop closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import pathlib
import random
import sqlite3
import types
import uuid
from collections.abc import AsyncIterator, Coroutine, Generator, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import SingletonThreadPool, StaticPool

from sparc.sa import aio
from sparc.sa.engine import engine_from_config
from sparc.sa.exceptions import SuspendedBlockError
from sparc.sa.orm import scoped_transaction

from .conftest import build_models, make_engine, names
from .test_async import ASYNC_BACKENDS, async_database, checked_out, ids


@pytest.fixture(params=ASYNC_BACKENDS)
def db(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> Iterator[SimpleNamespace]:
    """tests/test_async.py's ``db``: each async driver, a fresh Item table."""
    yield from async_database(request.param, tmp_path)


# -- committed exactly when the block exited normally ------------------------------


@types.coroutine
def _cancel_at(
    coro: Coroutine[Any, Any, Any], at: int, seen: list[int]
) -> Generator[Any, Any, Any]:
    """Run *coro*, counting the times it suspends; at the *at*-th suspension,
    cancel the running task, as if ``task.cancel()`` had been called while it
    waited there. Deterministic: the same index is the same await."""
    inner = coro.__await__()
    value: Any = None
    failed = False
    count = 0
    while True:
        try:
            step = inner.throw(value) if failed else inner.send(value)
        except StopIteration as stop:
            return stop.value
        count += 1
        seen.append(count)
        if count == at:
            task = asyncio.current_task()
            assert task is not None
            task.cancel()
        try:
            value, failed = (yield step), False
        except BaseException as exc:
            value, failed = exc, True


@pytest.fixture
def no_collector() -> Iterator[None]:
    """The cyclic garbage collector off during the test: what a cancelled
    block leaves behind must be released by sparc.sa at once, not by a
    collection that happens to run (in a busy process none may run for
    seconds, and a test that passes alone then fails in the whole suite)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _locked(path: str) -> str | None:
    """What stops another connection from taking *path*'s SQLite database
    for writing at once (a read lock is enough), or None."""
    probe = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        probe.execute("BEGIN EXCLUSIVE")
        probe.execute("ROLLBACK")
    except sqlite3.OperationalError as error:
        return str(error)
    finally:
        probe.close()
    return None


@pytest.mark.usefixtures("no_collector")
def test_a_cancellation_at_every_await_of_a_block(db: SimpleNamespace) -> None:
    """Cancel a task at its 1st, 2nd, ... await, through the block's entry,
    body, exit (flush, COMMIT, close) and the await after it: the rows are
    exactly those of the blocks that exited normally, and every cancellation
    reaches the task, at the latest at its next await after the block.

    And nothing of a cancelled block holds the database: on SQLite's file,
    another connection can take it for writing after each one, and the
    in-memory database's tables can be dropped at the end. (On SQLAlchemy
    2.0.0's aiosqlite adapter, a cancellation between a SELECT and the close
    of its cursor left that cursor, and its read lock, to the garbage
    collector: sparc.sa.tx.sqlitebegin.)"""
    path = db.engine.url.database if db.backend == "aiosqlite-file" else None
    outcome: dict[int, str] = {}

    async def victim(n: int) -> None:
        try:
            async with db.tx() as session:
                session.add(db.Item(id=n))
                await session.flush()
                await session.execute(sa.select(db.Item.id))
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            outcome[n] = "raised"
            raise
        outcome[n] = "exited"
        await asyncio.sleep(0)  # a cancellation during COMMIT arrives here
        outcome[n] = "finished"

    async def main() -> tuple[list[int], list[int]]:
        fired = []
        for n in range(1, 200):
            seen: list[int] = []
            task = asyncio.ensure_future(_cancel_at(victim(n), n, seen))
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if max(seen) < n:  # past the last await: never cancelled
                assert outcome[n] == "finished"
                break
            fired.append(n)
            assert task.cancelled(), (n, outcome[n])  # the cancellation was not lost
            assert outcome[n] != "finished", n
            if path is not None:
                assert _locked(path) is None, n
        else:
            raise AssertionError("the block never ran out of awaits")
        assert checked_out(db.engine) == 0
        return await ids(db), fired

    found, fired = db.run(main)
    assert len(fired) >= 5
    exited = [n for n, seen in sorted(outcome.items()) if seen in ("exited", "finished")]
    assert found == exited
    assert "raised" in outcome.values() and "exited" in outcome.values()


class _CancelledDuringCommit(AsyncSession):
    """Cancels its task while the COMMIT is under way."""

    victim: asyncio.Task[Any] | None = None

    async def commit(self) -> None:
        assert self.victim is not None
        self.victim.cancel()
        await asyncio.sleep(0.05)
        await super().commit()


def test_a_block_whose_commit_succeeded_exits_normally_when_cancelled_meanwhile(
    db: SimpleNamespace,
) -> None:
    tx = aio.AsyncScopedTransaction(db.engine, db.Base)
    tx.session_factory = async_sessionmaker(
        db.engine, class_=_CancelledDuringCommit, expire_on_commit=False
    )
    seen: list[str] = []

    async def victim() -> None:
        _CancelledDuringCommit.victim = asyncio.current_task()
        async with tx() as session:
            session.add(db.Item(id=1))
        seen.append("exited")
        try:
            await asyncio.sleep(1)
        except asyncio.CancelledError:
            seen.append("cancelled at the next await")
            raise

    async def main() -> list[int]:
        task = asyncio.create_task(victim())
        with pytest.raises(asyncio.CancelledError):
            await task
        assert checked_out(db.engine) == 0
        return await ids(db)

    assert db.run(main) == [1]
    assert seen == ["exited", "cancelled at the next await"]


class _LostDuringCommit(AsyncSession):
    """A COMMIT whose outcome is unknown: the connection fails during it."""

    victim: asyncio.Task[Any] | None = None

    async def commit(self) -> None:
        assert self.victim is not None
        self.victim.cancel()
        await asyncio.sleep(0.05)
        raise sa.exc.OperationalError("COMMIT", None, ConnectionResetError("lost"))


def test_a_commit_of_unknown_outcome_raises_its_error_not_a_cancellation(
    db: SimpleNamespace,
) -> None:
    tx = aio.AsyncScopedTransaction(db.engine, db.Base)
    tx.session_factory = async_sessionmaker(
        db.engine, class_=_LostDuringCommit, expire_on_commit=False
    )

    seen: list[str] = []

    async def victim() -> None:
        _LostDuringCommit.victim = asyncio.current_task()
        try:
            async with tx() as session:
                session.add(db.Item(id=1))
        except sa.exc.OperationalError as exc:
            seen.append(f"error: {exc.orig!r}")
        else:  # pragma: no cover - the failure
            seen.append("exited")
        await asyncio.sleep(1)

    async def main() -> None:
        task = asyncio.create_task(victim())
        with pytest.raises(asyncio.CancelledError):
            await task  # the cancellation still reaches the task, afterwards
        assert checked_out(db.engine) == 0

    db.run(main)
    # Neither success nor a clean rollback: the COMMIT's own error.
    assert seen == ["error: ConnectionResetError('lost')"]


class _OwnRollback(AsyncSession):
    """An application's AsyncSession whose rollback() must run."""

    calls: list[str] = []

    async def rollback(self) -> None:
        self.calls.append("rollback")
        await super().rollback()


def test_an_applications_own_session_class_rolls_back_through_its_own_method(
    db: SimpleNamespace,
) -> None:
    tx = aio.AsyncScopedTransaction(db.engine, db.Base)
    tx.session_factory = async_sessionmaker(db.engine, class_=_OwnRollback, expire_on_commit=False)
    _OwnRollback.calls = []

    async def main() -> list[int]:
        with pytest.raises(LookupError):
            async with tx() as session:
                session.add(db.Item(id=1))
                await session.flush()
                raise LookupError("undo it")
        assert checked_out(db.engine) == 0
        return await ids(db)

    assert db.run(main) == []
    assert _OwnRollback.calls == ["rollback"]


def test_a_thousand_tasks_rows_are_exactly_the_blocks_that_exited(db: SimpleNamespace) -> None:
    rng = random.Random(16)
    exited: set[int] = set()

    async def insert(session: AsyncSession, n: int) -> None:
        session.add(db.Item(id=n))
        await asyncio.sleep(rng.random() / 200)
        await session.flush()
        await asyncio.sleep(rng.random() / 200)

    async def work(n: int) -> None:
        await asyncio.sleep(rng.random() / 100)
        await db.tx.run(insert, n, attempts=100)  # SQLite: "database is locked"
        exited.add(n)  # no await between the block's exit and here

    async def main() -> list[int]:
        tasks = [asyncio.create_task(work(n)) for n in range(1, 1001)]
        for task in rng.sample(tasks, 100):
            await asyncio.sleep(rng.random() / 500)
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        odd = [r for r in results if r is not None and not isinstance(r, asyncio.CancelledError)]
        assert not odd, odd[:3]
        assert checked_out(db.engine) == 0
        return await ids(db)

    found = db.run(main)
    assert set(found) == exited
    assert len(exited) >= 800


# -- a swallowed cancellation ------------------------------------------------------


def test_an_inner_block_that_swallowed_a_cancellation_keeps_its_work(db: SimpleNamespace) -> None:
    async def main() -> list[int]:
        async with db.tx() as session:
            session.add(db.Item(id=1))
            timeout = getattr(asyncio, "timeout", None)
            if timeout is None:  # Python 3.10: cancel by hand
                task = asyncio.current_task()
                assert task is not None
                asyncio.get_running_loop().call_later(0.05, task.cancel)
                scope: Any = contextlib.nullcontext()
            else:
                scope = timeout(0.05)
            async with scope, db.tx() as inner:
                inner.add(db.Item(id=2))
                # the block's code catches the cancellation and carries on
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.sleep(5)
            session.add(db.Item(id=3))
        return await ids(db)

    assert db.run(main) == [1, 2, 3]


# -- one shared connection: interruptions keep it ---------------------------------


class _InterruptOnce:
    def __init__(self, error: type[BaseException], match: str) -> None:
        self.error = error
        self.match = match
        self.armed = True

    def __call__(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if self.armed and self.match in statement:
            self.armed = False
            raise self.error


@pytest.mark.parametrize("poolclass", [StaticPool, SingletonThreadPool])
def test_a_keyboard_interrupt_as_a_statement_returns_keeps_the_in_memory_database(
    poolclass: type[Any],
) -> None:
    engine = make_engine("sqlite://", poolclass=poolclass.__name__)
    ns = build_models()
    ns.Base.metadata.create_all(engine)
    tx = scoped_transaction(engine, ns.Base)
    try:
        with tx():
            tx.session.add(ns.Item(name="committed"))
        interrupt = _InterruptOnce(KeyboardInterrupt, "INSERT")
        sa.event.listen(engine, "after_cursor_execute", interrupt)
        with pytest.raises(KeyboardInterrupt), tx():
            tx.session.add(ns.Item(name="interrupted"))
            tx.session.flush()
        assert not interrupt.armed
        with tx():
            tx.session.add(ns.Item(name="after"))
        assert names(engine, ns.Item) == ["after", "committed"]
    finally:
        engine.dispose()


def test_a_cancellation_a_few_iterations_into_a_block_keeps_the_in_memory_database() -> None:
    engine = engine_from_config({"dsn": "sqlite+aiosqlite://"})
    assert isinstance(engine, AsyncEngine)

    class Base(DeclarativeBase):
        pass

    class Item(Base):
        __tablename__ = "sparc_outcome_item"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)

    tx = aio.async_scoped_transaction(engine, Base)

    async def writer(start: int) -> None:
        async with tx() as session:
            for n in range(start, start + 50):
                session.add(Item(id=n))
                await session.flush()
                await session.execute(sa.select(Item.id).where(Item.id == n))

    async def main() -> list[int]:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        async with tx() as session:
            session.add(Item(id=0))
        for iterations in range(1, 40):
            task = asyncio.create_task(writer(iterations * 1000))
            for _ in range(iterations):
                await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        async with tx() as session:
            found = (await session.execute(sa.select(Item.id).order_by(Item.id))).scalars()
            return [n for n in found if n < 1000]

    async def run() -> list[int]:
        try:
            return await main()
        finally:
            await engine.dispose()

    assert asyncio.run(run()) == [0]


# -- friction ----------------------------------------------------------------------


def test_with_on_an_asyncio_block_says_async_with() -> None:
    engine = engine_from_config({"dsn": "sqlite+aiosqlite://"})

    class Base(DeclarativeBase):
        pass

    tx = aio.AsyncScopedTransaction(engine, Base)
    with pytest.raises(TypeError, match="entered with `async with tx\\(\\):`"), tx():
        pass  # pragma: no cover - never entered


def test_the_wrong_managers_lookup_names_the_right_interface(zcml: None) -> None:
    from zope.component import ComponentLookupError, getMultiAdapter

    from sparc.sa.interfaces import ISAAsyncScopedTransaction, ISAScopedTransaction

    ns = build_models()
    async_engine = engine_from_config({"dsn": "sqlite+aiosqlite://"})
    with pytest.raises(ComponentLookupError, match="look up ISAAsyncScopedTransaction"):
        getMultiAdapter((async_engine, ns.Base), ISAScopedTransaction)
    engine = make_engine("sqlite://")
    with pytest.raises(ComponentLookupError, match="look up ISAScopedTransaction"):
        getMultiAdapter((engine, ns.Base), ISAAsyncScopedTransaction)
    engine.dispose()


# -- suspended generators ----------------------------------------------------------


def test_a_block_opened_while_a_generator_is_suspended_in_its_block_fails_at_entry(
    engine: Engine, models: SimpleNamespace, transaction: Any
) -> None:
    """A streaming response suspended inside its block, while the thread runs
    an ordinary block: that block fails at entry, naming the generator, and
    never reports success for work that the generator's close would undo."""
    tx = transaction

    def stream() -> Iterator[str]:
        with tx():
            tx.session.add(models.Item(name="streamed"))
            yield "first"
            yield "second"  # pragma: no cover - the client hung up

    response = stream()
    assert next(response) == "first"
    with pytest.raises(SuspendedBlockError, match=r"generator .*stream\(\) is suspended"), tx():
        tx.session.add(models.Item(name="ordinary"))  # pragma: no cover - refused
    response.close()  # the server's close: the stream's block rolls back
    with tx():  # the thread carries on
        tx.session.add(models.Item(name="after"))
    assert names(engine, models.Item) == ["after"]


def test_blocks_inside_a_generators_own_code_and_a_context_manager_still_nest(
    engine: Engine, models: SimpleNamespace, transaction: Any
) -> None:
    tx = transaction

    @contextlib.contextmanager
    def unit() -> Iterator[None]:
        with tx():
            yield

    def rows() -> Iterator[int]:
        with tx():
            for n in range(2):
                with tx():  # the generator's own code: nests
                    tx.session.add(models.Item(name=f"row{n}"))
                yield n

    with unit():
        with tx():  # the body of the with-statement that entered unit()
            tx.session.add(models.Item(name="unit-inner"))
        with pytest.raises(ValueError), tx():
            tx.session.add(models.Item(name="unit-failed"))
            raise ValueError
    assert list(rows()) == [0, 1]
    with contextlib.ExitStack() as stack:
        stack.enter_context(unit())
        with tx():
            tx.session.add(models.Item(name="exit-stack"))
    assert names(engine, models.Item) == ["exit-stack", "row0", "row1", "unit-inner"]


def test_an_async_generator_suspended_in_its_block_refuses_a_later_block(
    db: SimpleNamespace,
) -> None:
    async def stream() -> AsyncIterator[int]:
        async with db.tx() as session:
            session.add(db.Item(id=1))
            yield 1
            yield 2  # pragma: no cover - the consumer broke out

    @contextlib.asynccontextmanager
    async def unit() -> AsyncIterator[AsyncSession]:
        async with db.tx() as session:
            yield session

    async def main() -> list[int]:
        rows = stream()
        async for _ in rows:
            break
        with pytest.raises(SuspendedBlockError, match=r"generator .*stream\(\) is suspended"):
            async with db.tx() as session:  # pragma: no cover - refused
                session.add(db.Item(id=2))
        await rows.aclose()
        async with unit(), db.tx() as session:  # nests in unit()'s block
            session.add(db.Item(id=3))
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(unit())
            async with db.tx() as session:
                session.add(db.Item(id=4))
        return await ids(db)

    assert db.run(main) == [3, 4]


# -- the end of an event loop ------------------------------------------------------


_LOCK_TIMEOUT = {
    "aiosqlite-file": "PRAGMA busy_timeout = 3000",
    "asyncpg": "SET LOCAL lock_timeout = '3s'",
    "psycopg_async": "SET LOCAL lock_timeout = '3s'",
    "asyncmy": "SET SESSION innodb_lock_wait_timeout = 3",
}


@pytest.mark.parametrize("driver", sorted(_LOCK_TIMEOUT))
def test_a_block_left_open_when_its_loop_closes_keeps_no_lock(
    driver: str, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A task holds a row lock inside its block when its event loop is closed
    without ending it. The next loop's block takes the same lock at once, and
    the pool logs no failure to close the abandoned connection (SQLAlchemy
    2.0.0's psycopg and aiosqlite adapters await even their terminate)."""
    from .test_async import async_dsn

    dsn = async_dsn(driver, tmp_path)
    engine = engine_from_config({"dsn": dsn})
    assert isinstance(engine, AsyncEngine)

    class Base(DeclarativeBase):
        pass

    class Row(Base):
        __tablename__ = f"sparc_loop_end_{uuid.uuid4().hex[:10]}"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        value: Mapped[int] = mapped_column(default=0)

    tx = aio.async_scoped_transaction(engine, Base)

    async def setup() -> None:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
            await conn.execute(sa.insert(Row).values(id=1, value=0))
        await engine.dispose()

    asyncio.run(setup())
    first = asyncio.new_event_loop()
    locked = asyncio.Event()

    async def holder() -> None:
        async with tx() as session:
            await session.execute(sa.update(Row).where(Row.id == 1).values(value=1))
            locked.set()
            await asyncio.sleep(3600)  # pragma: no cover - its loop closes first

    task = first.create_task(holder())
    first.run_until_complete(locked.wait())
    first.close()  # the task is still inside its block, holding the row lock

    async def second() -> int:
        try:
            async with tx() as session:
                await session.execute(sa.text(_LOCK_TIMEOUT[driver]))
                await session.execute(sa.update(Row).where(Row.id == 1).values(value=2))
            async with tx() as session:
                return int((await session.execute(sa.select(Row.value))).scalar_one())
        finally:
            async with engine.begin() as conn:
                await conn.run_sync(Base.metadata.drop_all)
            await engine.dispose()

    try:
        assert asyncio.run(second()) == 2  # not a lock timeout: the old block was rolled back
    finally:
        task.get_coro().close()  # type: ignore[union-attr]
    failed = [r.getMessage() for r in caplog.records if r.name.startswith("sqlalchemy.pool")]
    assert failed == []
