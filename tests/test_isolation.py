"""Isolation per block: ``tx(isolation_level=...)``; what both managers do
alike is in tests/test_behaviour.py (this module's ``level_in_force``).

zope.sqlalchemy code sets the level on the session's connection
(``session.connection(execution_options={"isolation_level": ...})``). Inside
a block whose transaction has begun, SQLAlchemy ignores that with a warning
and the update it guarded could be lost; sparc.sa raises
IsolationLevelError instead, and gives the level to the block that begins
the transaction.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from sparc.sa.exceptions import IsolationLevelError
from sparc.sa.orm import ThreadLocalSASessionTransaction, scoped_transaction

from .conftest import checked_out, count_rows

txnpkg = pytest.importorskip("transaction")


def level_in_force(backend: str, session: Any) -> str:
    """The isolation level the session's transaction runs at, as the server says."""
    if backend.startswith("postgresql"):
        return str(session.execute(sa.text("SHOW transaction_isolation")).scalar_one()).upper()
    if backend.startswith("mysql"):
        value = session.execute(sa.text("SELECT @@session.tx_isolation")).scalar_one()
        return str(value).replace("-", " ").upper()
    uncommitted = session.execute(sa.text("PRAGMA read_uncommitted")).scalar_one()
    return "READ UNCOMMITTED" if uncommitted else "SERIALIZABLE"


OTHER_LEVEL = {
    "sqlite": "READ UNCOMMITTED",
    "sqlite-file": "READ UNCOMMITTED",
    "postgresql": "SERIALIZABLE",
    "mysql": "SERIALIZABLE",
}


# -- joined -----------------------------------------------------------------------------


def test_joined_the_first_block_sets_the_level_and_others_must_agree(
    backend: str, engine: Engine, models: Any, joined: Any
) -> None:
    level = OTHER_LEVEL[backend]
    txnpkg.begin()
    with joined(isolation_level=level) as session:
        assert level_in_force(backend, session()) == level
        joined.session.add(models.Item(name="first"))
    with joined(isolation_level=level):
        joined.session.add(models.Item(name="second"))
    with pytest.raises(IsolationLevelError, match="give the level to the first block"):  # noqa: SIM117
        with joined(
            isolation_level="REPEATABLE READ" if level != "REPEATABLE READ" else "SERIALIZABLE"
        ):
            pass
    txnpkg.commit()
    assert count_rows(engine, models.Item) == 2
    assert checked_out(engine) == 0


def test_joined_options_after_the_transaction_began_raise(
    backend: str, engine: Engine, models: Any, joined: Any
) -> None:
    """The zope.sqlalchemy habit, inside a joined block: the request's SQL
    transaction holds its connection already, so the level cannot apply."""
    txnpkg.begin()
    with pytest.raises(IsolationLevelError), joined():
        joined.session.add(models.Item(name="guarded"))
        joined.session.connection(execution_options={"isolation_level": OTHER_LEVEL[backend]})
    txnpkg.commit()
    assert count_rows(engine, models.Item) == 0
    assert checked_out(engine) == 0


# -- no lost update ------------------------------------------------------------------


@pytest.fixture
def counter(engine: Engine, models: Any) -> Iterator[Any]:
    with engine.begin() as conn:
        conn.execute(sa.insert(models.Counter.__table__).values(id=1, value=0))
    yield models.Counter


def _increment_concurrently(
    tx: ThreadLocalSASessionTransaction, model: Any, level: str | None
) -> list[BaseException]:
    """Two threads read the counter, wait for each other, then write
    value + 1, through run() (which retries serialization failures)."""
    barrier = threading.Barrier(2, timeout=20)
    errors: list[BaseException] = []
    waited: set[int] = set()

    def increment(session: Any) -> None:
        row = session.get(model, 1)
        value = row.value
        # Only a first attempt waits: the retry of a conflicting attempt runs
        # alone, and would otherwise wait out the barrier's timeout.
        if threading.get_ident() not in waited:
            waited.add(threading.get_ident())
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait()  # broken: the other thread failed
        row.value = value + 1
        session.flush()

    def worker() -> None:
        try:
            tx.run(increment, attempts=5, isolation_level=level)
        except BaseException as error:
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return errors


@pytest.mark.parametrize("backend", ["postgresql", "mysql"], indirect=True)
def test_serializable_blocks_lose_no_update(
    backend: str, engine: Engine, models: Any, counter: Any
) -> None:
    tx = scoped_transaction(engine, models.Base)
    assert _increment_concurrently(tx, counter, "SERIALIZABLE") == []
    with engine.connect() as conn:
        assert conn.execute(sa.select(counter.value)).scalar_one() == 2
    assert checked_out(engine) == 0


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_without_a_level_the_same_increments_lose_one(
    backend: str, engine: Engine, models: Any, counter: Any
) -> None:
    """The control: at PostgreSQL's default READ COMMITTED the second write
    overwrites the first, which the serializable test above rules out."""
    tx = scoped_transaction(engine, models.Base)
    assert _increment_concurrently(tx, counter, None) == []
    with engine.connect() as conn:
        assert conn.execute(sa.select(counter.value)).scalar_one() == 1
