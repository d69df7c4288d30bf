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


# -- SQLite's driver: the BEGIN a block sends ----------------------------------------


def _file_transaction(tmp_path: Any, **connect_args: Any) -> tuple[Engine, Any, Any]:
    from sparc.sa.orm import scoped_transaction

    from .conftest import build_models, make_engine

    engine = make_engine(f"sqlite:///{tmp_path / 'begin.db'}", connect_args=connect_args)
    models = build_models()
    models.Base.metadata.create_all(engine)
    return engine, models, scoped_transaction(engine, models.Base)


def test_a_blocks_reads_on_a_sqlite_file_share_one_snapshot(tmp_path: Any) -> None:
    """pysqlite begins no transaction before a SELECT: a block begins its own,
    so a row another connection commits between two reads of one block is
    not seen by the second (fails if the block's BEGIN is not sent)."""
    import threading

    engine, models, transaction = _file_transaction(tmp_path)
    with engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA journal_mode=WAL")  # a writer beside a reader
    count = sa.select(sa.func.count()).select_from(models.Item)

    def commit_another() -> None:
        with engine.begin() as conn:
            conn.execute(sa.insert(models.Item.__table__), {"name": "meanwhile"})

    with transaction():
        before = transaction.session.scalar(count)
        worker = threading.Thread(target=commit_another)
        worker.start()
        worker.join()
        assert transaction.session.scalar(count) == before == 0
    with transaction():
        assert transaction.session.scalar(count) == 1
    assert checked_out(engine) == 0
    engine.dispose()


class _RefusesBegin(Exception):
    pass


def test_a_begin_the_driver_refuses_once_is_sent_again_by_sqlalchemy(tmp_path: Any) -> None:
    import sqlite3

    refused: list[str] = []

    class Connection(sqlite3.Connection):
        def execute(self, sql: str, *args: Any) -> Any:  # the direct BEGIN only
            if sql == "BEGIN":
                refused.append(sql)
                raise sqlite3.OperationalError("refused for the test")
            return super().execute(sql, *args)

    engine, models, transaction = _file_transaction(tmp_path, factory=Connection)
    with transaction():
        transaction.session.scalars(sa.select(models.Item)).all()
        raw = transaction.session.connection().connection.dbapi_connection
        assert raw.in_transaction  # begun all the same, through SQLAlchemy
        transaction.session.add(models.Item(name="kept"))
    assert refused == ["BEGIN"]
    assert names(engine, models.Item) == ["kept"]
    assert checked_out(engine) == 0
    engine.dispose()


def test_a_begin_the_driver_always_refuses_raises_sqlalchemys_error(tmp_path: Any) -> None:
    import sqlite3

    class Cursor(sqlite3.Cursor):
        def execute(self, sql: str, *args: Any) -> Any:
            if sql == "BEGIN":
                raise sqlite3.OperationalError("refused for the test")
            return super().execute(sql, *args)

    class Connection(sqlite3.Connection):
        def cursor(self, factory: Any = Cursor) -> Any:
            return super().cursor(factory)

        def execute(self, sql: str, *args: Any) -> Any:
            return self.cursor().execute(sql, *args)

    engine, models, transaction = _file_transaction(tmp_path, factory=Connection)
    with pytest.raises(sa.exc.OperationalError, match="refused for the test"), transaction():
        transaction.session.add(models.Item(name="lost"))
        transaction.session.flush()
    assert count_rows(engine, models.Item) == 0
    assert checked_out(engine) == 0
    engine.dispose()
