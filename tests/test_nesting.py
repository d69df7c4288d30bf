"""Nested blocks: per thread, and SQLite's driver. SAVEPOINTs and joining
with savepoint=False, for both managers: tests/test_behaviour.py."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from .conftest import checked_out, count_rows, names


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
