"""The pool's reset after a block's end (sparc.sa.connections.resets): a block's COMMIT
or ROLLBACK is the last thing its connection sends before the pool takes it
back, so the pool's own ROLLBACK is skipped; every other use of the engine
is reset as SQLAlchemy resets it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from sparc.sa.connections import resets

from .conftest import checked_out, count_rows, names

# SQLAlchemy 2.0.0 leaves a connection counted as checked out when an
# interruption lands inside the pool's reset on return (seen in CI; 2.1
# returns it), which this module's interrupted blocks can reach.
OLD_SQLALCHEMY = tuple(int(p) for p in sa.__version__.split(".")[:2]) < (2, 1)


class Boom(Exception):
    pass


@pytest.fixture
def sent(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """COMMITs and ROLLBACKs that reach the driver, in order (counted at the
    dialect class, which sparc.sa's per-engine wrappers call)."""
    log: list[str] = []
    cls = type(engine.dialect)
    for name in ("do_commit", "do_rollback"):
        real = getattr(cls, name)

        def counted(self: Any, dbapi_connection: Any, real: Any = real, name: str = name) -> None:
            if self is engine.dialect:
                log.append(name[3:].upper())
            real(self, dbapi_connection)

        monkeypatch.setattr(cls, name, counted)
    yield log


def reset_after(engine: Engine) -> list[str]:
    """The pool's reset ROLLBACK, unless sparc.sa skips it on this engine:
    everywhere but on a pool of one shared connection (in-memory SQLite)."""
    shared = type(engine.pool).__name__ in ("StaticPool", "SingletonThreadPool")
    assert resets.is_installed(engine) is not shared
    return ["ROLLBACK"] if shared else []


def test_a_committed_block_sends_no_rollback_after_its_commit(
    engine: Engine, models: Any, transaction: Any, sent: list[str]
) -> None:
    with transaction():
        transaction.session.add(models.Item(name="kept"))
    assert sent == ["COMMIT", *reset_after(engine)]
    assert names(engine, models.Item) == ["kept"]
    assert checked_out(engine) == 0


def test_a_block_that_raised_rolls_back_once(
    engine: Engine, models: Any, transaction: Any, sent: list[str]
) -> None:
    with pytest.raises(Boom), transaction():
        transaction.session.add(models.Item(name="lost"))
        transaction.session.flush()
        raise Boom
    assert sent == ["ROLLBACK", *reset_after(engine)]
    assert count_rows(engine, models.Item) == 0
    assert checked_out(engine) == 0


def test_a_block_whose_commit_fails_is_rolled_back(
    engine: Engine, models: Any, transaction: Any, sent: list[str]
) -> None:
    with transaction():
        transaction.session.add(models.Counter(id=1))
    del sent[:]
    with pytest.raises(sa.exc.IntegrityError), transaction():
        transaction.session.add(models.Item(name="lost"))
        transaction.session.add(models.Counter(id=1))  # fails in the COMMIT's flush
    assert sent == ["ROLLBACK", *reset_after(engine)]
    assert count_rows(engine, models.Item) == 0
    assert checked_out(engine) == 0


def test_plain_sessions_on_the_engine_are_reset_as_sqlalchemy_resets_them(
    engine: Engine, models: Any, transaction: Any, sent: list[str]
) -> None:
    with transaction():
        transaction.session.add(models.Item(name="block"))
    del sent[:]
    with sa.orm.Session(engine) as session, session.begin():
        session.add(models.Item(name="plain"))
    assert sent == ["COMMIT", "ROLLBACK"]  # SQLAlchemy's own reset after its COMMIT
    assert names(engine, models.Item) == ["block", "plain"]


def test_a_connection_used_raw_after_a_block_is_still_rolled_back(
    engine: Engine, models: Any, transaction: Any
) -> None:
    """What a block's end skips is the one reset that follows it: the next
    user of the connection, even through the raw DBAPI connection, which
    SQLAlchemy does not see begin, is rolled back on return."""
    with transaction():
        transaction.session.add(models.Item(name="block"))
    for _ in range(3):  # whichever connection the pool hands out
        raw = engine.raw_connection()
        cursor = raw.cursor()
        table = models.Item.__table__.name
        cursor.execute(f"INSERT INTO {table} (name) VALUES ('uncommitted')")
        cursor.close()
        raw.close()
    assert names(engine, models.Item) == ["block"]
    assert checked_out(engine) == 0


def test_an_engine_connect_after_a_block_is_rolled_back(
    engine: Engine, models: Any, transaction: Any
) -> None:
    with transaction():
        transaction.session.add(models.Item(name="block"))
    with engine.connect() as conn:
        conn.execute(sa.insert(models.Item.__table__), {"name": "not committed"})
    assert names(engine, models.Item) == ["block"]


def test_no_interrupted_block_leaves_a_mark_that_skips_a_later_reset(
    engine: Engine, models: Any, transaction: Any
) -> None:
    """Interrupt the n-th line sparc.sa runs during a block, for every n (as
    test_blocks does); after each, a connection used through the raw DBAPI
    connection, which SQLAlchemy does not see begin, is still rolled back
    when it goes back to the pool."""
    import sys

    from sparc.sa.tx.gate import gate_for

    from .test_blocks import InterruptAtLine, interrupted

    gate_for(engine.pool)  # made before the loop, as in test_blocks
    table = models.Item.__table__.name
    n = 0
    while True:
        n += 1
        tracer = InterruptAtLine(n)
        sys.settrace(tracer)
        try:
            with transaction():
                transaction.session.add(models.Item(name=f"block-{n}"))
        except BaseException as error:
            if not interrupted(error):
                raise
        finally:
            sys.settrace(None)
        raw = engine.raw_connection()
        cursor = raw.cursor()
        cursor.execute(f"INSERT INTO {table} (name) VALUES ('raw-{n}')")
        cursor.close()
        raw.close()
        assert f"raw-{n}" not in names(engine, models.Item), f"step {n}: not rolled back"
        if not OLD_SQLALCHEMY:
            assert checked_out(engine) == 0, f"step {n} left a connection checked out"
        if not tracer.fired:
            break
    assert n > 20


def test_a_joined_transaction_sends_no_rollback_after_its_commit_and_the_session_keeps_its_class(
    engine: Engine, models: Any, joined: Any, sent: list[str]
) -> None:
    """Joined to a transaction of the ``transaction`` package, as in a Zope
    request: the data manager's COMMIT is not followed by the pool's
    ROLLBACK, and once the transaction ended the thread's session is of its
    sessionmaker's class again (whose listeners, the pysqlite BEGIN and the
    mark above, apply to its later blocks)."""
    tm = pytest.importorskip("transaction").manager
    own_class = type(joined.session)
    tm.begin()
    with joined():
        joined.session.add(models.Item(name="request"))
    assert isinstance(joined.session, own_class)  # a subclass while joined
    tm.commit()
    assert sent == ["COMMIT", *reset_after(engine)]
    assert type(joined.session) is own_class
    del sent[:]
    with joined():
        joined.session.add(models.Item(name="after"))
    assert sent == ["COMMIT", *reset_after(engine)]
    assert names(engine, models.Item) == ["after", "request"]
    assert checked_out(engine) == 0
