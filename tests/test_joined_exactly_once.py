"""Joined mode for every transaction manager, exactly once or not at all.

Each test here is a way a joined transaction used to commit part of its work,
nothing while reporting success, or crash: a manager other than the thread's,
a statement that failed and was caught, ``transaction.savepoint()`` around and
inside blocks (in two-phase mode too), a session reset between blocks, blocks
in a transaction's ending hooks, and two declarative bases on one engine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

transaction = pytest.importorskip("transaction")

from sparc.sa import configure_transaction  # noqa: E402
from sparc.sa.exceptions import (  # noqa: E402
    AbortedTransactionError,
    JoinedTransactionError,
    RetryableDatabaseError,
)
from sparc.sa.orm import ThreadLocalSASessionTransaction, scoped_transaction  # noqa: E402

from .conftest import SERVERS, build_models, checked_out, names  # noqa: E402


class Boom(Exception):
    pass


@pytest.fixture
def always(engine: Engine, models: Any) -> Iterator[ThreadLocalSASessionTransaction]:
    """A private manager that joins the thread's transaction, begun here."""
    manager = ThreadLocalSASessionTransaction(engine, models.Base, join="always")
    transaction.begin()
    try:
        yield manager
    finally:
        transaction.abort()


def fail_a_statement(session: Session) -> None:
    """Run a statement that fails on every backend, and swallow its error."""
    with contextlib.suppress(sa.exc.DBAPIError):
        session.execute(sa.text("SELECT * FROM sparc_no_such_table_at_all"))


# -- any transaction manager -----------------------------------------------------------


def test_a_block_joins_the_transaction_manager_it_is_given(engine: Engine, models: Any) -> None:
    tx = scoped_transaction(engine, models.Base)
    tm = transaction.TransactionManager(explicit=True)
    tm.begin()
    with tx(transaction_manager=tm):
        tx.session.add(models.Item(name="mine"))
    assert transaction.manager.manager._txn is None, "the thread's manager was touched"
    if type(engine.pool).__name__ != "StaticPool":
        assert names(engine, models.Item) == [], "committed before its transaction"
    tm.commit()
    assert names(engine, models.Item) == ["mine"]

    tm.begin()
    with tx(transaction_manager=tm):
        tx.session.add(models.Item(name="aborted"))
    tm.abort()
    assert names(engine, models.Item) == ["mine"]
    assert checked_out(engine) == 0


def test_a_read_only_block_reads_in_the_transaction_of_the_manager_it_is_given(
    engine: Engine, models: Any
) -> None:
    """A read-only block never joins a transaction, but inside one its scope
    wrote in, it reads there (seeing the uncommitted rows), and then the
    manager it was given must be that transaction's; run() too."""
    tx = scoped_transaction(engine, models.Base)
    tm = transaction.TransactionManager(explicit=True)
    tm.begin()
    with tx(transaction_manager=tm):
        tx.session.add(models.Item(name="pending"))
    with tx(readonly=True, transaction_manager=tm) as session:
        assert [item.name for item in session.query(models.Item)] == ["pending"]
    assert (
        tx.run(
            lambda session: session.query(models.Item).count(),
            readonly=True,
            transaction_manager=tm,
        )
        == 1
    )
    other = transaction.TransactionManager(explicit=True)
    other.begin()
    with (
        pytest.raises(JoinedTransactionError, match="already inside another transaction"),
        tx(readonly=True, transaction_manager=other),
    ):
        pass  # pragma: no cover - refused at entry
    with pytest.raises(JoinedTransactionError):
        tx.run(lambda session: None, readonly=True, transaction_manager=other)
    other.abort()
    with pytest.raises(TypeError, match="must be a transaction manager"):
        tx(readonly=True, transaction_manager="transaction.manager")
    tm.commit()
    assert names(engine, models.Item) == ["pending"]
    with tx(readonly=True, transaction_manager=tm) as session:  # no transaction: reads alone
        assert session.query(models.Item).count() == 1
    assert checked_out(engine) == 0


def test_a_transaction_manager_argument_is_checked(engine: Engine, models: Any) -> None:
    tx = scoped_transaction(engine, models.Base)
    with pytest.raises(TypeError, match="must be a transaction manager"):
        tx(transaction_manager="transaction.manager")
    never = ThreadLocalSASessionTransaction(engine, models.Base, join="never")
    with pytest.raises(ValueError, match="join mode is 'never'"):
        never(transaction_manager=transaction.TransactionManager())


def test_python_code_configures_the_shared_manager(engine: Engine, models: Any) -> None:
    manager = configure_transaction(engine, models.Base, join="always")
    assert manager is scoped_transaction(engine, models.Base)
    assert manager.join == "always"
    assert configure_transaction(engine, models.Base, join="always") is manager
    with pytest.raises(ValueError, match=r"disagrees with .* at .*test_joined_exactly_once"):
        configure_transaction(engine, models.Base, join="never")
    transaction.begin()
    try:
        with manager():
            manager.session.add(models.Item(name="joined"))
        transaction.commit()
    finally:
        transaction.abort()
    assert names(engine, models.Item) == ["joined"]


# -- a statement that failed and was caught --------------------------------------------


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_a_caught_failure_rolls_the_block_back_not_the_earlier_ones(
    engine: Engine, models: Any, always: Any
) -> None:
    with always():
        always.session.add(models.Item(name="first"))
    with pytest.raises(AbortedTransactionError), always():
        always.session.add(models.Item(name="second"))
        always.session.flush()
        fail_a_statement(always.session)
    with always():
        always.session.add(models.Item(name="third"))
    transaction.commit()
    assert names(engine, models.Item) == ["first", "third"]


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_a_caught_failure_in_the_first_block_is_not_committed_silently(
    engine: Engine, models: Any, always: Any
) -> None:
    with pytest.raises(AbortedTransactionError), always():
        always.session.add(models.Item(name="first"))
        always.session.flush()
        fail_a_statement(always.session)
    with always():
        always.session.add(models.Item(name="second"))
    transaction.commit()
    assert names(engine, models.Item) == ["second"]


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_a_caught_failure_outside_blocks_fails_the_commit(
    engine: Engine, models: Any, always: Any
) -> None:
    with always():
        always.session.add(models.Item(name="first"))
    fail_a_statement(always.session)  # outside any block, in the transaction
    with pytest.raises(AbortedTransactionError):
        transaction.commit()
    transaction.abort()
    assert names(engine, models.Item) == []


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_a_failed_release_leaves_the_transaction_usable(
    engine: Engine, models: Any, transaction: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RELEASE itself fails (here: a driver that cannot report an aborted
    transaction): the savepoint is rolled back before the error propagates,
    so the outer block commits the rest instead of a COMMIT that silently
    rolls everything back."""
    tx = transaction
    monkeypatch.setattr(tx, "checks_aborted", False)
    with tx():
        tx.session.add(models.Item(name="outer"))
        with pytest.raises(sa.exc.DBAPIError, match="RELEASE SAVEPOINT"), tx():
            tx.session.add(models.Item(name="inner"))
            tx.session.flush()
            fail_a_statement(tx.session)
    assert names(engine, models.Item) == ["outer"]
    assert checked_out(engine) == 0


# -- transaction.savepoint() -----------------------------------------------------------


@pytest.fixture(params=[False, True], ids=["one-phase", "two-phase"])
def twophase(request: pytest.FixtureRequest, backend: str) -> bool:
    if request.param and backend not in SERVERS:
        pytest.skip("SQLite has no prepared transactions")
    return bool(request.param)


def test_savepoints_before_inside_and_after_blocks_commit(
    engine: Engine, models: Any, twophase: bool
) -> None:
    """Plone takes savepoints all the time; in two-phase mode they used to
    make the commit crash."""
    tx = ThreadLocalSASessionTransaction(engine, models.Base, join="always", twophase=twophase)
    txn = transaction.begin()
    try:
        with tx():
            tx.session.add(models.Item(name="one"))
        before = txn.savepoint()
        with tx():
            tx.session.add(models.Item(name="two"))
            txn.savepoint()
            tx.session.add(models.Item(name="three"))
        txn.savepoint()
        with tx():
            tx.session.add(models.Item(name="four"))
        before.rollback()  # undoes two, three and four
        with tx():
            tx.session.add(models.Item(name="five"))
        txn.savepoint()
        transaction.commit()
    finally:
        transaction.abort()
    assert names(engine, models.Item) == ["five", "one"]
    assert checked_out(engine) == 0


def test_a_savepoint_taken_inside_a_block_rolls_back_after_it(
    engine: Engine, models: Any, always: Any
) -> None:
    with always():
        always.session.add(models.Item(name="kept"))
    with always():
        always.session.add(models.Item(name="early"))
        inside = transaction.get().savepoint()
        always.session.add(models.Item(name="late"))
    inside.rollback()
    transaction.commit()
    assert names(engine, models.Item) == ["early", "kept"]


def test_a_savepoint_that_no_longer_exists_refuses_to_roll_back(
    engine: Engine, models: Any, always: Any
) -> None:
    with always():
        always.session.add(models.Item(name="kept"))
    with pytest.raises(Boom), always():
        always.session.add(models.Item(name="undone"))
        inside = transaction.get().savepoint()
        raise Boom
    with pytest.raises(JoinedTransactionError, match="no longer exists"):
        inside.rollback()
    with pytest.raises(transaction.interfaces.TransactionFailedError):
        transaction.commit()
    transaction.abort()
    assert names(engine, models.Item) == []


def test_rolling_back_inside_a_later_block_a_savepoint_taken_before_it(
    engine: Engine, models: Any, always: Any
) -> None:
    with always():
        always.session.add(models.Item(name="one"))
    before = transaction.get().savepoint()
    with always():
        always.session.add(models.Item(name="two"))
        always.session.flush()
        before.rollback()  # undoes two
        always.session.add(models.Item(name="three"))
    transaction.commit()
    assert names(engine, models.Item) == ["one", "three"]


# -- session resets between joined blocks ----------------------------------------------


@pytest.mark.parametrize("reset", ["rollback", "close", "remove"])
def test_a_session_reset_between_blocks_dooms_the_transaction(
    engine: Engine, models: Any, always: Any, reset: str
) -> None:
    with always() as Session:
        always.session.add(models.Item(name="first"))
    if reset == "remove":
        Session.remove()  # the 1.x spelling
    else:
        getattr(always.session, reset)()
    with pytest.raises(JoinedTransactionError, match="rolled back, closed or removed"), always():
        always.session.add(models.Item(name="second"))
    with pytest.raises(transaction.interfaces.DoomedTransaction):
        transaction.commit()
    transaction.abort()
    assert names(engine, models.Item) == []
    assert checked_out(engine) == 0


def test_a_session_reset_after_the_last_block_fails_the_commit(
    engine: Engine, models: Any, always: Any
) -> None:
    with always():
        always.session.add(models.Item(name="first"))
    always.session.rollback()
    with pytest.raises(JoinedTransactionError):
        transaction.commit()
    transaction.abort()
    assert names(engine, models.Item) == []


@pytest.mark.parametrize("join", ["always", "auto"])
def test_removing_the_session_after_a_commit_leaves_no_transaction_behind(
    engine: Engine, models: Any, join: str
) -> None:
    """zope.sqlalchemy's habit: ``Session.remove()`` once a transaction ended.
    It closes the session; it does not join (nor, joining always, begin) a
    transaction on the way, which left a closed session in a transaction
    that the thread's next commit then refused."""
    tx = ThreadLocalSASessionTransaction(engine, models.Base, join=join)
    with transaction.manager, tx() as Session:
        tx.session.add(models.Item(name="first"))
    Session.remove()
    assert checked_out(engine) == 0
    # A script goes on without begin(): joining always, this block joins the
    # thread's transaction; joining when begun, it commits by itself.
    with tx():
        tx.session.add(models.Item(name="second"))
    transaction.commit()
    Session.remove()
    with transaction.manager, tx():
        tx.session.add(models.Item(name="third"))
    assert names(engine, models.Item) == ["first", "second", "third"]
    assert checked_out(engine) == 0


# -- the hooks of a transaction that is ending -----------------------------------------


@pytest.mark.parametrize("hook", ["addAfterCommitHook", "addAfterAbortHook"])
def test_a_block_in_an_ending_hook_commits_by_itself(
    engine: Engine, models: Any, always: Any, hook: str
) -> None:
    seen: list[str] = []

    def audit(*args: Any) -> None:
        with always():
            always.session.add(models.Item(name="audit"))
        seen.append("done")

    txn = transaction.get()
    with always():
        always.session.add(models.Item(name="request"))
    if hook == "addAfterCommitHook":
        txn.addAfterCommitHook(audit)
        transaction.commit()
        expected = ["audit", "request"]
    else:
        getattr(txn, hook)(audit)
        transaction.abort()
        expected = ["audit"]
    assert seen == ["done"]
    assert names(engine, models.Item) == expected
    assert checked_out(engine) == 0


# -- several declarative bases on one engine -------------------------------------------


@pytest.fixture
def second(engine: Engine) -> Iterator[Any]:
    other = build_models("DeclarativeBase")
    other.Base.metadata.create_all(engine)
    yield other
    other.Base.metadata.drop_all(engine)


@pytest.mark.parametrize("end", ["commit", "abort"])
def test_two_bases_share_the_transaction(
    engine: Engine, models: Any, second: Any, always: Any, end: str
) -> None:
    other = ThreadLocalSASessionTransaction(engine, second.Base, join="always")
    with always():
        always.session.add(models.Item(name="first add-on"))
    with other():
        other.session.add(second.Item(name="second add-on"))
        with always():  # the first add-on, called from the second's code
            always.session.add(models.Item(name="nested"))
    getattr(transaction, end)()
    if end == "commit":
        assert names(engine, models.Item) == ["first add-on", "nested"]
        assert names(engine, second.Item) == ["second add-on"]
    else:
        assert names(engine, models.Item) == names(engine, second.Item) == []
    assert checked_out(engine) == 0


def test_a_failing_block_of_the_second_base_undoes_only_itself(
    engine: Engine, models: Any, second: Any, always: Any
) -> None:
    other = ThreadLocalSASessionTransaction(engine, second.Base, join="always")
    with always():
        always.session.add(models.Item(name="kept"))
    with pytest.raises(Boom), other():
        other.session.add(second.Item(name="undone"))
        other.session.flush()
        raise Boom
    with other():
        other.session.add(second.Item(name="after"))
    transaction.commit()
    assert names(engine, models.Item) == ["kept"]
    assert names(engine, second.Item) == ["after"]


@pytest.mark.parametrize("backend", SERVERS, indirect=True)
def test_two_bases_commit_atomically_on_one_connection(
    engine: Engine, models: Any, second: Any, twophase: bool
) -> None:
    one = ThreadLocalSASessionTransaction(engine, models.Base, join="always", twophase=twophase)
    other = ThreadLocalSASessionTransaction(engine, second.Base, join="always")
    transaction.begin()
    try:
        with one():
            one.session.add(models.Item(name="a"))
            first = one.session.connection().connection.dbapi_connection
        with other():
            other.session.add(second.Item(name="b"))
            assert other.session.connection().connection.dbapi_connection is first
        transaction.savepoint()
        with one():
            one.session.add(models.Item(name="c"))
        transaction.commit()
    finally:
        transaction.abort()
    assert names(engine, models.Item) == ["a", "c"] and names(engine, second.Item) == ["b"]
    assert checked_out(engine) == 0


# -- an application's own Session class ------------------------------------------------


class AppSession(Session):
    pass


def test_an_own_session_class_releases_its_savepoints(engine: Engine, models: Any) -> None:
    tx = ThreadLocalSASessionTransaction(engine, models.Base, join="always", class_=AppSession)
    transaction.begin()
    try:
        with tx():
            tx.session.add(models.Item(name="outer"))
            nested = tx.session.begin_nested()
            tx.session.add(models.Item(name="nested"))
            nested.commit()  # RELEASE SAVEPOINT: the application's own
            with pytest.raises(JoinedTransactionError):
                tx.session.commit()
        transaction.commit()
    finally:
        transaction.abort()
    assert names(engine, models.Item) == ["nested", "outer"]


def test_a_block_with_its_manager_given_and_another_open_is_refused(
    engine: Engine, models: Any
) -> None:
    tx = scoped_transaction(engine, models.Base)
    tm = transaction.TransactionManager()
    with (
        tx(),
        pytest.raises(JoinedTransactionError, match="already inside another transaction"),
        tx(transaction_manager=tm),
    ):
        pass
    tm.abort()
    assert checked_out(engine) == 0


# -- optimistic concurrency ---------------------------------------------------------


def _someone_else_saves(engine: Engine, update: sa.Update) -> None:
    """Another connection saves version 2 of the document. On a SQLite file
    the block's read lock keeps that writer's COMMIT waiting until its busy
    timeout ends in "database is locked", the error the block then meets
    and the attempt retries; the wait is cut from pysqlite's 5 s to 0.1 s,
    which ends the same way, and put back after."""
    with engine.connect() as conn:
        driver: Any = None
        if engine.dialect.name == "sqlite":
            driver = conn.connection.dbapi_connection
            waits = driver.execute("PRAGMA busy_timeout").fetchone()[0]
            driver.execute("PRAGMA busy_timeout = 100")
        try:
            with conn.begin():
                conn.execute(update.values(title="theirs", version=2))
        finally:
            if driver is not None:
                driver.execute(f"PRAGMA busy_timeout = {int(waits)}")


def test_a_stale_versioned_row_is_retried_as_zope_sqlalchemy_does(engine: Engine) -> None:
    if type(engine.pool).__name__ == "StaticPool":
        pytest.skip("one shared connection: nobody else can change the row meanwhile")
    if engine.dialect.name == "sqlite" and sa.__version__ == "2.0.0":
        pytest.skip("SQLAlchemy 2.0.0 cannot verify row versions on pysqlite (no updated rowcount)")

    class Base(DeclarativeBase):
        pass

    class Doc(Base):
        __tablename__ = f"sparc_doc_{id(Base):x}"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        title: Mapped[str] = mapped_column(sa.String(40))
        version: Mapped[int] = mapped_column(nullable=False)
        __mapper_args__ = {"version_id_col": version}

    Base.metadata.create_all(engine)
    try:
        tx = ThreadLocalSASessionTransaction(engine, Base, join="always")
        with engine.begin() as conn:
            conn.execute(sa.insert(Doc.__table__).values(id=1, title="draft", version=1))
        attempts = 0
        for attempt in transaction.manager.attempts(3):
            with attempt:
                attempts += 1
                with tx():
                    doc = tx.session.get(Doc, 1)
                    assert doc is not None
                    if attempts == 1:  # someone else saves the document meanwhile
                        _someone_else_saves(engine, sa.update(Doc.__table__))
                    doc.title = "mine"
        assert attempts == 2
        with engine.connect() as conn:
            assert conn.execute(sa.select(Doc.__table__.c.title)).scalar_one() == "mine"
        assert issubclass(RetryableDatabaseError, transaction.interfaces.TransientError)
    finally:
        Base.metadata.drop_all(engine)
