"""Nested blocks: SAVEPOINTs, joining with savepoint=False, and SQLite's driver."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from sparc.sa.exceptions import DoomedTransactionError

from .conftest import checked_out, count_rows, names


class Boom(Exception):
    pass


def test_failed_inner_block_undoes_only_its_own_work(
    engine: Engine, models: Any, transaction: Any
) -> None:
    with transaction():
        outer = models.Item(name="outer")
        transaction.session.add(outer)
        transaction.session.flush()
        with pytest.raises(Boom), transaction():
            transaction.session.add(models.Item(name="inner"))
            transaction.session.flush()
            raise Boom
        # the outer block carries on, its objects still attached and usable
        assert outer in transaction.session
        assert outer.name == "outer"
        transaction.session.add(models.Item(name="after"))
    assert names(engine, models.Item) == ["after", "outer"]
    assert checked_out(engine) == 0


def test_successful_inner_block_is_undone_when_the_outer_rolls_back(
    engine: Engine, models: Any, transaction: Any
) -> None:
    with pytest.raises(Boom), transaction():
        with transaction():
            transaction.session.add(models.Item(name="inner"))
        raise Boom
    assert count_rows(engine, models.Item) == 0


def test_released_savepoint_after_only_reads_is_undone_by_outer_rollback(
    engine: Engine, models: Any, transaction: Any
) -> None:
    """pysqlite begins no transaction before a SAVEPOINT, so a RELEASE of the
    first savepoint would commit; the outer rollback must still undo it."""
    with pytest.raises(Boom), transaction():
        transaction.session.scalars(sa.select(models.Item)).all()  # reads only
        with transaction():
            transaction.session.add(models.Item(name="inner"))
        raise Boom
    assert count_rows(engine, models.Item) == 0


def test_savepoint_first_thing_in_the_block(engine: Engine, models: Any, transaction: Any) -> None:
    with pytest.raises(Boom), transaction():
        with transaction():
            transaction.session.add(models.Item(name="inner"))
        raise Boom
    assert count_rows(engine, models.Item) == 0
    with transaction(), transaction():
        transaction.session.add(models.Item(name="kept"))
    assert names(engine, models.Item) == ["kept"]


def test_three_levels(engine: Engine, models: Any, transaction: Any) -> None:
    with transaction():
        transaction.session.add(models.Item(name="1"))
        with transaction():
            transaction.session.add(models.Item(name="2"))
            with pytest.raises(Boom), transaction():
                transaction.session.add(models.Item(name="3"))
                transaction.session.flush()
                raise Boom
            transaction.session.add(models.Item(name="2b"))
    assert names(engine, models.Item) == ["1", "2", "2b"]


def test_inner_flush_error_rolls_back_to_the_savepoint(
    engine: Engine, models: Any, transaction: Any
) -> None:
    with transaction():
        transaction.session.add(models.Counter(id=1))
    with transaction():
        transaction.session.add(models.Item(name="outer"))
        with pytest.raises(sa.exc.IntegrityError), transaction():
            transaction.session.add(models.Counter(id=1))  # fails at RELEASE's flush
        transaction.session.add(models.Counter(id=2))
    assert names(engine, models.Item) == ["outer"]
    assert count_rows(engine, models.Counter) == 2


def test_savepoint_false_joins_the_outer_transaction(
    engine: Engine, models: Any, transaction: Any
) -> None:
    with transaction():
        transaction.session.add(models.Item(name="outer"))
        with transaction(savepoint=False):
            transaction.session.add(models.Item(name="joined"))
    assert names(engine, models.Item) == ["joined", "outer"]

    statements: list[str] = []
    sa.event.listen(engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    with transaction(), transaction(savepoint=False):
        transaction.session.add(models.Item(name="x"))
    assert not any("SAVEPOINT" in s.upper() for s in statements)


def test_failed_joined_block_dooms_the_outer_block(
    engine: Engine, models: Any, transaction: Any
) -> None:
    with pytest.raises(DoomedTransactionError), transaction():
        transaction.session.add(models.Item(name="outer"))
        try:
            with transaction(savepoint=False):
                transaction.session.add(models.Item(name="half"))
                transaction.session.flush()
                raise Boom
        except Boom:
            pass  # swallowed: the outer block must still not commit half of it
    assert count_rows(engine, models.Item) == 0
    assert checked_out(engine) == 0
    with transaction():  # the doom does not outlive its transaction
        transaction.session.add(models.Item(name="next"))
    assert names(engine, models.Item) == ["next"]


def test_failed_joined_block_propagates_through_the_outer(
    engine: Engine, models: Any, transaction: Any
) -> None:
    with pytest.raises(Boom), transaction():
        transaction.session.add(models.Item(name="outer"))
        with transaction(savepoint=False):
            raise Boom
    assert count_rows(engine, models.Item) == 0


# Not in-memory SQLite: on its one shared connection the other thread's block
# waits for ours to end (tests/test_shared_connection.py).
@pytest.mark.parametrize("backend", ["sqlite-file", "postgresql", "mysql"])
def test_nesting_is_per_scope(engine: Engine, models: Any, transaction: Any) -> None:
    """A block in another thread, while this thread's block is open, is an
    outermost block of its own, not a savepoint of ours."""
    import threading

    with transaction():
        transaction.session.add(models.Item(name="mine"))

        def other() -> None:
            with transaction():
                transaction.session.add(models.Item(name="theirs"))

        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert names(engine, models.Item) == ["theirs"]  # committed on its own
    assert names(engine, models.Item) == ["mine", "theirs"]
