"""One connection shared by every thread (StaticPool, the in-memory SQLite default).

On such an engine a commit or rollback from any session ends the one
transaction of the one connection. Blocks must therefore take turns, and
nothing outside a block may end a block's transaction.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.pool import SingletonThreadPool, StaticPool

from sparc.sa.exceptions import InterleavedTransactionError
from sparc.sa.orm import ThreadLocalSASessionTransaction, scoped_transaction

from .conftest import build_models, make_engine, names


class Boom(Exception):
    pass


def memory_database(poolclass: type[Any]) -> Iterator[tuple[Engine, Any, Any]]:
    """In-memory SQLite with the given pool, a Base with tables, its manager."""
    engine = make_engine("sqlite://", poolclass=poolclass.__name__)
    assert type(engine.pool) is poolclass
    ns = build_models()
    ns.Base.metadata.create_all(engine)
    yield engine, ns, scoped_transaction(engine, ns.Base)
    engine.dispose()


@pytest.fixture
def shared() -> Iterator[tuple[Engine, Any, ThreadLocalSASessionTransaction]]:
    yield from memory_database(StaticPool)


def test_another_threads_commit_cannot_save_a_rolled_back_block(
    shared: tuple[Engine, Any, Any],
) -> None:
    """Thread A flushes a row and then fails. Meanwhile thread B runs a block
    that commits. Interleaved on one connection, B's COMMIT would save A's
    row for good before A rolls back."""
    engine, ns, transaction = shared
    a_flushed = threading.Event()
    b_entered = threading.Event()
    order: list[str] = []

    def thread_a() -> None:
        try:
            with transaction():
                transaction.session.add(ns.Item(name="a-rolled-back"))
                transaction.session.flush()
                a_flushed.set()
                # give B every chance to get in; it must not
                assert not b_entered.wait(0.3)
                order.append("a-exit")
                raise Boom
        except Boom:
            pass

    def thread_b() -> None:
        a_flushed.wait()
        with transaction():
            b_entered.set()
            order.append("b-enter")
            transaction.session.add(ns.Item(name="b-committed"))

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert order == ["a-exit", "b-enter"]
    assert names(engine, ns.Item) == ["b-committed"]


def test_many_threads_with_failing_and_committing_blocks(shared: tuple[Engine, Any, Any]) -> None:
    engine, ns, transaction = shared

    def work(i: int) -> None:
        for j in range(10):
            try:
                with transaction():
                    transaction.session.add(ns.Item(name=f"{i}-{j}"))
                    transaction.session.flush()
                    time.sleep(0)
                    if j % 2:
                        raise Boom
            except Boom:
                pass

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert names(engine, ns.Item) == sorted(f"{i}-{j}" for i in range(6) for j in range(0, 10, 2))


def test_ended_thread_does_not_roll_back_a_running_block(shared: tuple[Engine, Any, Any]) -> None:
    """A thread that read outside any block ends while this thread is inside
    one. Closing its session rolls the shared connection back, so that close
    must wait until the block is over."""
    engine, ns, transaction = shared
    with transaction():
        transaction.session.add(ns.Item(name="kept"))
        transaction.session.flush()
        reader = threading.Thread(
            target=lambda: transaction.session.scalars(sa.select(ns.Item)).all()
        )
        reader.start()
        reader.join()  # the reader ended inside our block; joining must not deadlock
        transaction.session.add(ns.Item(name="kept-too"))
    assert names(engine, ns.Item) == ["kept", "kept-too"]


@pytest.fixture(params=[StaticPool, SingletonThreadPool], ids=lambda cls: cls.__name__)
def one_connection(request: pytest.FixtureRequest) -> Iterator[tuple[Engine, Any, Any]]:
    """In-memory SQLite whose tasks of one thread share one connection:
    StaticPool (shared by every thread) or SingletonThreadPool (per thread)."""
    yield from memory_database(request.param)


def test_tasks_of_one_thread_cannot_interleave_on_one_connection(
    one_connection: tuple[Engine, Any, Any],
) -> None:
    _, ns, transaction = one_connection
    a_open, b_tried = asyncio.Event(), asyncio.Event()
    refused: list[BaseException] = []

    async def task_a() -> None:
        with transaction():
            transaction.session.add(ns.Item(name="a"))
            a_open.set()
            await b_tried.wait()

    async def task_b() -> None:
        await a_open.wait()
        try:
            with transaction():
                transaction.session.add(ns.Item(name="b"))
        except InterleavedTransactionError as exc:
            refused.append(exc)
        b_tried.set()

    async def main() -> None:
        await asyncio.gather(task_a(), task_b())

    asyncio.run(main())
    assert len(refused) == 1 and "connection" in str(refused[0])
    with transaction():  # task A's block committed; B's never began
        assert transaction.session.scalars(sa.select(ns.Item.name)).all() == ["a"]


def test_tasks_taking_turns_on_one_connection_work(shared: tuple[Engine, Any, Any]) -> None:
    engine, ns, transaction = shared

    async def writer(name: str) -> None:
        await asyncio.sleep(0)
        with transaction():
            transaction.session.add(ns.Item(name=name))

    async def main() -> None:
        await asyncio.gather(*(writer(str(i)) for i in range(5)))

    asyncio.run(main())
    assert names(engine, ns.Item) == ["0", "1", "2", "3", "4"]


def test_a_second_manager_in_the_same_thread_is_refused_not_deadlocked(
    shared: tuple[Engine, Any, Any],
) -> None:
    engine, ns, transaction = shared
    other = build_models()
    other.Base.metadata.create_all(engine)
    other_transaction = scoped_transaction(engine, other.Base)
    with transaction():
        transaction.session.add(ns.Item(name="outer"))
        with pytest.raises(InterleavedTransactionError), other_transaction():
            pass
    with other_transaction():  # once the first block is over it is free
        other_transaction.session.add(other.Item(name="later"))
    assert names(engine, ns.Item) == ["outer"]
    assert names(engine, other.Item) == ["later"]
