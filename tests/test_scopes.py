"""Scopes: threads and asyncio tasks own their sessions, and give them back when they end."""

from __future__ import annotations

import asyncio
import gc
import pathlib
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from .conftest import (
    SERVERS,
    backend_dsn,
    build_models,
    checked_out,
    count_rows,
    make_engine,
    managed_engine,
    names,
)

POOLED = ("sqlite-file", *SERVERS)  # backends with a real pool of connections


class Boom(Exception):
    pass


@pytest.fixture(params=POOLED)
def pooled(
    request: pytest.FixtureRequest, tmp_path: pathlib.Path
) -> Iterator[tuple[Engine, Any, Any]]:
    """An engine with a pool of 5 and no overflow, a Base and its manager."""
    yield from managed_engine(
        backend_dsn(request.param, tmp_path), pool_size=5, max_overflow=0, pool_timeout=10
    )


@pytest.fixture
def no_gc() -> Iterator[None]:
    """Prove clean-up does not wait for the garbage collector."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


# -- tasks ----------------------------------------------------------------------


def test_tasks_in_one_thread_never_share_a_session(transaction: Any) -> None:
    async def session_of_task() -> Session:
        await asyncio.sleep(0)
        first = transaction.session
        await asyncio.sleep(0)
        assert transaction.session is first  # stable within the task
        return first

    async def main() -> list[Session]:
        return list(await asyncio.gather(session_of_task(), session_of_task()))

    a, b = asyncio.run(main())
    assert a is not b
    assert transaction.session is not a and transaction.session is not b


def test_two_tasks_interleaving_blocks_in_one_thread(pooled: tuple[Engine, Any, Any]) -> None:
    """Task A opens a block and awaits; task B opens, fails and rolls back in
    the middle of A's block; A then commits. A's work is kept, B's is not."""
    engine, ns, transaction = pooled
    # SQLite admits one writer at a time: B's write would wait on A's lock
    # and stall the event loop, so there B's block only stages its row.
    b_writes = engine.dialect.name != "sqlite"
    a_open, b_done = asyncio.Event(), asyncio.Event()
    seen_threads: set[int] = set()

    async def task_a() -> None:
        seen_threads.add(threading.get_ident())
        with transaction():
            transaction.session.add(ns.Item(name="a"))
            transaction.session.flush()
            a_open.set()
            await b_done.wait()  # B's whole block runs here
            transaction.session.add(ns.Item(name="a2"))

    async def task_b() -> None:
        seen_threads.add(threading.get_ident())
        await a_open.wait()
        try:
            with transaction():
                transaction.session.add(ns.Item(name="b"))
                if b_writes:
                    transaction.session.flush()
                raise Boom
        except Boom:
            pass
        finally:
            b_done.set()

    async def main() -> None:
        await asyncio.gather(task_a(), task_b())

    asyncio.run(main())
    assert len(seen_threads) == 1
    assert names(engine, ns.Item) == ["a", "a2"]


def test_a_block_closed_by_another_task_finishes_the_session_it_opened(
    pooled: tuple[Engine, Any, Any],
) -> None:
    engine, ns, transaction = pooled

    async def main() -> None:
        block = transaction()

        async def opener() -> Session:
            block.__enter__()
            transaction.session.add(ns.Item(name="opened-elsewhere"))
            return transaction.session

        session = await asyncio.create_task(opener())
        assert transaction.session is not session  # main task has its own
        block.__exit__(None, None, None)  # closed by the main task
        assert not session.in_transaction()

    asyncio.run(main())
    assert names(engine, ns.Item) == ["opened-elsewhere"]


def test_a_block_outlives_the_task_that_opened_it(pooled: tuple[Engine, Any, Any]) -> None:
    """The opening task ends, its done-callbacks run, other tasks run; only
    then is the block closed. Its work must still be committed."""
    engine, ns, transaction = pooled

    async def main() -> None:
        block = transaction()

        async def opener() -> None:
            block.__enter__()
            transaction.session.add(ns.Item(name="survives-its-task"))

        await asyncio.create_task(opener())
        for _ in range(3):  # let every pending callback run first
            await asyncio.sleep(0)
        assert not transaction._tasks
        block.__exit__(None, None, None)

    asyncio.run(main())
    assert names(engine, ns.Item) == ["survives-its-task"]
    assert engine.pool.checkedout() == 0


def test_a_block_outlives_the_thread_that_opened_it(pooled: tuple[Engine, Any, Any]) -> None:
    engine, ns, transaction = pooled
    block = transaction()

    def opener() -> None:
        block.__enter__()
        transaction.session.add(ns.Item(name="survives-its-thread"))
        transaction.session.flush()

    t = threading.Thread(target=opener)
    t.start()
    t.join()  # the thread and its thread-local are gone
    gc.collect()
    block.__exit__(None, None, None)
    assert names(engine, ns.Item) == ["survives-its-thread"]
    assert engine.pool.checkedout() == 0


def test_ended_task_returns_its_connection_at_once(
    pooled: tuple[Engine, Any, Any], no_gc: None
) -> None:
    engine, ns, transaction = pooled

    async def reader() -> int:
        return len(transaction.session.scalars(sa.select(ns.Item)).all())

    async def main() -> None:
        tasks = [asyncio.create_task(reader()) for _ in range(5)]
        await asyncio.wait(tasks)
        # gather()/wait() resume only after the tasks' done-callbacks ran, so
        # every ended task's session is already closed here.
        assert engine.pool.checkedout() == 0
        assert not transaction._tasks

    asyncio.run(main())


# -- threads --------------------------------------------------------------------


def test_a_block_closed_by_another_thread_finishes_the_session_it_opened(
    pooled: tuple[Engine, Any, Any],
) -> None:
    engine, ns, transaction = pooled
    block = transaction()
    block.__enter__()
    transaction.session.add(ns.Item(name="handed-over"))
    opened_session = transaction.session
    closer = threading.Thread(target=block.__exit__, args=(None, None, None))
    closer.start()
    closer.join()
    assert names(engine, ns.Item) == ["handed-over"]
    assert not opened_session.in_transaction()
    assert engine.pool.checkedout() == 0


def test_twenty_short_lived_threads_against_a_pool_of_five(
    pooled: tuple[Engine, Any, Any], no_gc: None
) -> None:
    """Each thread reads through transaction.session outside any block and
    ends. Without immediate clean-up the sixth thread would wait for a
    connection until pool_timeout and fail."""
    engine, ns, transaction = pooled
    with transaction():
        transaction.session.add(ns.Item(name="row"))
    errors: list[BaseException] = []
    counts: list[int] = []

    def reader() -> None:
        try:
            counts.append(len(transaction.session.scalars(sa.select(ns.Item)).all()))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    for wave in range(4):  # 4 waves of 5 threads: 20 threads, never more than 5 alive
        threads = [threading.Thread(target=reader) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert engine.pool.checkedout() == 0, f"after wave {wave}"
    assert not errors and counts == [1] * 20


def test_twenty_threads_at_once_against_a_pool_of_five(
    pooled: tuple[Engine, Any, Any], no_gc: None
) -> None:
    engine, ns, transaction = pooled
    release = threading.Event()
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            transaction.session.scalars(sa.select(ns.Item)).all()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(20)]
    for t in threads:
        t.start()
    release.set()
    for t in threads:
        t.join()
    assert not errors
    assert engine.pool.checkedout() == 0


def test_ended_thread_discards_its_uncommitted_work(
    pooled: tuple[Engine, Any, Any], no_gc: None
) -> None:
    engine, ns, transaction = pooled

    def writer() -> None:
        transaction.session.add(ns.Item(name="never-committed"))
        transaction.session.flush()

    t = threading.Thread(target=writer)
    t.start()
    t.join()
    assert engine.pool.checkedout() == 0
    assert count_rows(engine, ns.Item) == 0


def test_no_resource_warning_when_threads_end(pooled: tuple[Engine, Any, Any]) -> None:
    """ResourceWarnings in a finaliser are 'unraisable'; pytest turns those
    into errors under filterwarnings=error, so a clean pass proves none."""
    import warnings

    _, ns, transaction = pooled
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        threads = [
            threading.Thread(target=lambda: transaction.session.scalars(sa.select(ns.Item)).all())
            for _ in range(10)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        gc.collect()
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []


def test_dropping_the_manager_closes_its_sessions(tmp_path: pathlib.Path, no_gc: None) -> None:
    from sparc.sa.orm import ThreadLocalSASessionTransaction

    engine = make_engine(f"sqlite:///{tmp_path / 'd.db'}")
    ns = build_models()
    ns.Base.metadata.create_all(engine)
    manager = ThreadLocalSASessionTransaction(engine, ns.Base)
    manager.session.scalars(sa.select(ns.Item)).all()
    assert engine.pool.checkedout() == 1
    del manager
    gc.collect()  # the manager sits in a reference cycle, as any with a registry
    assert checked_out(engine) == 0
    engine.dispose()
