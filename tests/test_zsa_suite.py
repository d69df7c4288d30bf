"""zope.sqlalchemy 4.1's own test suite, ported to sparc.sa's joined mode.

Each scenario of zope.sqlalchemy's ``tests.py`` and of its README doctest is
rewritten here against sparc.sa's API: ``with tx():`` blocks inside
transactions of the ``transaction`` package, on a private manager
``ThreadLocalSASessionTransaction(engine, Base, join="always", twophase=...)``
or the shared one set up by ``configure_transaction``. Every test runs on
SQLite (a file), PostgreSQL and MariaDB, and again in two-phase mode on both
servers. Where sparc.sa deliberately differs from zope.sqlalchemy (no
``mark_changed()``: every write commits; ``session.commit()`` refused with
JoinedTransactionError; no ``keep_session``: the session is reset when the
transaction ends; blocks are all-or-nothing SAVEPOINTs), the test asserts
sparc.sa's documented behaviour.

==========================================  ==============================================
zope.sqlalchemy (tests.py / README.rst)     here
==========================================  ==============================================
testMarkUnknownSession                      test_mark_unknown_session
testAbortBeforeCommit                       test_abort_before_commit
testAbortAfterCommit                        test_abort_after_commit
testSimplePopulation                        test_simple_population
testRelations                               test_relations
testTransactionJoining                      test_transaction_joining
testTransactionJoiningUsingRegister         test_transaction_joining_using_register
testSavepoint                               test_savepoint
testRollbackAttributes                      test_rollback_attributes
testCommit                                  test_commit
testCommitWithSavepoint                     test_commit_with_savepoint
testSessionSavepointCommitAllowed           test_session_savepoint_commit_allowed
testSessionCommitDisallowed                 test_session_commit_disallowed
testTwoPhase                                test_two_phase
testThread                                  test_thread
testBulkDelete                              test_bulk_delete
testBulkUpdate                              test_bulk_update
testBulkDeleteUsingRegister                 test_bulk_delete_using_register
testBulkUpdateUsingRegister                 test_bulk_update_using_register
testFailedJoin                              test_failed_join
testKeepSession                             test_keep_session
testExpireAll                               test_expire_all
RetryTests.testRetry                        test_retry
RetryTests.testRetryThread                  test_retry_thread
MultipleEngineTests.testTwoEngines          test_two_engines
README: full example                        test_readme_full_example
README: mark_changed / register 'changed'   test_readme_manual_sql_needs_no_mark_changed
README: keep_session with mark_changed      test_readme_mark_changed_keep_session
README: long-lasting session scopes         test_readme_long_lasting_session_scopes
==========================================  ==============================================

The adversarial cases of issue 15 follow, each named for what it checks.
"""

from __future__ import annotations

import contextlib
import pathlib
import threading
import uuid
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa
import transaction
from sqlalchemy.engine import Engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
)
from transaction.interfaces import TransactionFailedError

from sparc.sa.exceptions import JoinedTransactionError, RetryableDatabaseError
from sparc.sa.orm import ThreadLocalSASessionTransaction

from .conftest import CheckoutCounter, backend_dsn, checked_out, make_engine

#: (backend, two-phase)
MODES = {
    "sqlite-file": ("sqlite-file", False),
    "postgresql": ("postgresql", False),
    "mysql": ("mysql", False),
    "postgresql-2pc": ("postgresql", True),
    "mysql-2pc": ("mysql", True),
}


def make_models() -> SimpleNamespace:
    """Users with skills and addresses, in uniquely named tables."""

    class Base(DeclarativeBase):
        pass

    token = uuid.uuid4().hex[:10]

    class User(Base):
        __tablename__ = f"zsa_user_{token}"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        firstname: Mapped[str] = mapped_column(sa.String(50))
        lastname: Mapped[str] = mapped_column(sa.String(50))
        skills: Mapped[list[Skill]] = relationship(back_populates="user")
        addresses: Mapped[list[Address]] = relationship(back_populates="user")

    class Skill(Base):
        __tablename__ = f"zsa_skill_{token}"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        user_id: Mapped[int | None] = mapped_column(sa.ForeignKey(User.id))
        name: Mapped[str] = mapped_column(sa.String(50))
        user: Mapped[User | None] = relationship(back_populates="skills")

    class Address(Base):
        __tablename__ = f"zsa_address_{token}"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        user_id: Mapped[int] = mapped_column(sa.ForeignKey(User.id))
        email: Mapped[str] = mapped_column(sa.String(100))
        user: Mapped[User] = relationship(back_populates="addresses")

    return SimpleNamespace(Base=Base, User=User, Skill=Skill, Address=Address)


@pytest.fixture(scope="module")
def server_models() -> Iterator[dict[str, SimpleNamespace]]:
    """Per server, the models' tables, made once for this module's tests
    (``zsa`` empties them before each test); dropped when the module ends."""
    made: dict[str, SimpleNamespace] = {}
    yield made
    for dsn, models in made.items():
        engine = sa.create_engine(dsn)
        try:
            models.Base.metadata.drop_all(engine)
        finally:
            engine.dispose()


def empty(engine: Engine, models: SimpleNamespace) -> None:
    """Delete every row of the models' tables, addresses and skills first."""
    with engine.begin() as conn:
        for table in reversed(models.Base.metadata.sorted_tables):
            conn.execute(table.delete())


@pytest.fixture(params=list(MODES))
def zsa(
    request: pytest.FixtureRequest,
    tmp_path: pathlib.Path,
    server_models: dict[str, SimpleNamespace],
) -> Iterator[SimpleNamespace]:
    """An engine, the models, and a private manager joining always. On a
    server the tables are this module's, emptied first; SQLite's are the
    test's own, in its file."""
    backend, twophase = MODES[request.param]
    dsn = backend_dsn(backend, tmp_path)
    engine = make_engine(dsn)
    engine.__dict__["_test_counter"] = CheckoutCounter(engine)
    shared = backend != "sqlite-file"
    if shared and dsn in server_models:
        models = server_models[dsn]
        empty(engine, models)
    else:
        models = make_models()
        models.Base.metadata.create_all(engine)
        if shared:
            server_models[dsn] = models
    transaction.abort()
    tx = ThreadLocalSASessionTransaction(engine, models.Base, join="always", twophase=twophase)
    ns = SimpleNamespace(
        engine=engine, tx=tx, backend=backend, twophase=twophase, tmp_path=tmp_path, **vars(models)
    )
    yield ns
    transaction.abort()
    try:
        tx.scoped_session.remove()
        left = checked_out(engine)
        if not shared:
            models.Base.metadata.drop_all(engine)
    finally:
        engine.dispose()
    assert left == 0, f"{left} connection(s) still checked out after the test"


def users(ns: SimpleNamespace, engine: Engine | None = None) -> list[tuple[Any, ...]]:
    """The user rows as a connection of its own sees them, by id."""
    table = ns.User.__table__
    with (engine or ns.engine).connect() as conn:
        return [tuple(r) for r in conn.execute(sa.select(table).order_by(table.c.id))]


def add_two(ns: SimpleNamespace, session: Session) -> None:
    session.add(ns.User(id=1, firstname="udo", lastname="juergens"))
    session.add(ns.User(id=2, firstname="heino", lastname="n/a"))


TWO = [(1, "udo", "juergens"), (2, "heino", "n/a")]


class Boom(Exception):
    """What a stand-in data manager raises."""


class Result(Exception):
    """Carries what a stand-in data manager's target returned."""


class StandIn:
    """A data manager of another resource: fails at *fail_at*, or at its
    vote calls *target* and raises its result (as ZODB's vote would fail)."""

    def __init__(
        self,
        key: str = "aaa.first",
        fail_at: str | None = None,
        target: Callable[[], Any] | None = None,
    ) -> None:
        self.key, self.fail_at, self.target = key, fail_at, target
        self.transaction_manager = transaction.manager

    def sortKey(self) -> str:
        return self.key

    def _step(self, name: str) -> None:
        if self.fail_at == name:
            raise Boom(name)

    def abort(self, txn: Any) -> None:
        pass

    def tpc_begin(self, txn: Any) -> None:
        self._step("tpc_begin")

    def commit(self, txn: Any) -> None:
        self._step("commit")

    def tpc_vote(self, txn: Any) -> None:
        if self.target is not None:
            raise Result(self.target())
        self._step("tpc_vote")

    def tpc_finish(self, txn: Any) -> None:
        pass

    def tpc_abort(self, txn: Any) -> None:
        pass


def our_resources(txn: Any) -> list[Any]:
    from sparc.sa.tx.joined import SessionDataManager

    return [r for r in txn._resources if isinstance(r, SessionDataManager)]


# -- tests.py: ZopeSQLAlchemyTests ---------------------------------------------------------


def test_mark_unknown_session(zsa: SimpleNamespace) -> None:
    """zope.sqlalchemy needs mark_changed() for writes it cannot see; sparc.sa
    has none: a textual write in a block commits unmarked."""
    import sparc.sa

    assert not hasattr(sparc.sa, "mark_changed")
    with zsa.tx() as Session:
        Session.execute(
            sa.text(f"INSERT INTO {zsa.User.__tablename__} VALUES (1, 'udo', 'juergens')")
        )
    transaction.commit()
    assert users(zsa) == TWO[:1]


def test_abort_before_commit(zsa: SimpleNamespace) -> None:
    """Another resource fails at commit: the abort that follows rolls our work
    back, and the next transaction runs normally."""
    transaction.get().join(StandIn(fail_at="commit"))
    with zsa.tx() as Session:
        add_two(zsa, Session)
    with pytest.raises(Boom):
        transaction.commit()
    transaction.abort()
    assert users(zsa) == []
    transaction.begin()
    with zsa.tx() as Session:
        Session.execute(sa.select(zsa.User.__table__))
        Session.add(zsa.User(id=1, firstname="udo", lastname="juergens"))
    transaction.commit()
    assert users(zsa) == TWO[:1]
    assert checked_out(zsa.engine) == 0


def test_abort_after_commit(zsa: SimpleNamespace) -> None:
    """Invalid SQL in a block (which PostgreSQL answers by aborting the
    transaction) never wedges the machinery: the block rolls back, the
    request commits or aborts, and the next transaction works."""
    with zsa.tx() as Session:
        Session.add(zsa.User(id=1, firstname="udo", lastname="juergens"))
    with pytest.raises(sa.exc.DBAPIError), zsa.tx() as Session:
        Session.execute(sa.text("BAD SQL SYNTAX"))
    try:
        transaction.commit()
    except Exception:
        transaction.abort()
        assert users(zsa) == []
    else:
        assert users(zsa) == TWO[:1]
    transaction.begin()
    with zsa.tx() as Session:
        Session.execute(sa.text(f"SELECT 1 FROM {zsa.User.__tablename__}"))
        Session.add(zsa.User(id=2, firstname="heino", lastname="n/a"))
    transaction.commit()
    assert (2, "heino", "n/a") in users(zsa)


def test_simple_population(zsa: SimpleNamespace) -> None:
    with zsa.tx() as Session:
        assert Session.scalars(sa.select(zsa.User)).all() == []
        add_two(zsa, Session)
        Session.flush()
        found = Session.scalars(sa.select(zsa.User).order_by(zsa.User.id)).all()
        assert [(u.id, u.firstname, u.lastname) for u in found] == TWO
        # Core, through the block's own connection, sees the same rows
        rows = Session.connection().execute(sa.select(zsa.User.__table__).order_by("id"))
        assert [tuple(r) for r in rows] == TWO
    assert users(zsa) == []  # nothing is committed before the transaction is
    transaction.commit()
    assert users(zsa) == TWO


def test_relations(zsa: SimpleNamespace) -> None:
    with zsa.tx() as Session:
        Session.add(zsa.User(id=1, firstname="foo", lastname="bar"))
        user = Session.scalars(sa.select(zsa.User).filter_by(firstname="foo")).one()
        user.skills.append(zsa.Skill(id=1, name="Zope"))
    transaction.commit()
    with zsa.engine.connect() as conn:
        skills = conn.execute(sa.select(zsa.Skill.__table__)).all()
    assert [(s.id, s.user_id, s.name) for s in skills] == [(1, 1, "Zope")]


def test_transaction_joining(zsa: SimpleNamespace) -> None:
    """The transaction is joined by the first block, not before."""
    transaction.abort()
    txn = transaction.get()
    assert our_resources(txn) == []
    with zsa.tx() as Session:
        Session.add(zsa.User(id=1, firstname="udo", lastname="juergens"))
    assert len(our_resources(transaction.get())) == 1


def test_transaction_joining_using_register(zsa: SimpleNamespace) -> None:
    """zope.sqlalchemy's register(); sparc.sa's equivalent is the shared
    manager configured by configure_transaction(), which the README's lookup
    returns."""
    from zope.component import getMultiAdapter, provideAdapter

    from sparc.sa import configure_transaction
    from sparc.sa.interfaces import ISAScopedTransaction
    from sparc.sa.orm import scoped_transaction

    provideAdapter(scoped_transaction)
    shared = configure_transaction(zsa.engine, zsa.Base, join="always", twophase=zsa.twophase)
    assert shared is getMultiAdapter((zsa.engine, zsa.Base), ISAScopedTransaction)
    transaction.abort()
    assert our_resources(transaction.get()) == []
    with shared() as Session:
        Session.add(zsa.User(id=1, firstname="udo", lastname="juergens"))
    assert len(our_resources(transaction.get())) == 1
    transaction.commit()
    assert users(zsa) == TWO[:1]


def test_savepoint(zsa: SimpleNamespace) -> None:
    """transaction.savepoint() works on every backend, SQLite included (where
    zope.sqlalchemy refuses it), between blocks."""
    txn = transaction.get()
    with zsa.tx() as Session:
        assert Session.scalars(sa.select(zsa.User)).all() == []
    txn.savepoint(optimistic=True)
    s1 = txn.savepoint()
    with zsa.tx() as Session:
        Session.add(zsa.User(id=1, firstname="udo", lastname="juergens"))
    s2 = txn.savepoint()
    with zsa.tx() as Session:
        Session.add(zsa.User(id=2, firstname="heino", lastname="n/a"))
        Session.flush()
        assert len(Session.scalars(sa.select(zsa.User)).all()) == 2
    s2.rollback()
    with zsa.tx() as Session:
        assert [u.id for u in Session.scalars(sa.select(zsa.User))] == [1]
    s1.rollback()
    with zsa.tx() as Session:
        assert Session.scalars(sa.select(zsa.User)).all() == []
    transaction.commit()
    assert users(zsa) == []


def test_rollback_attributes(zsa: SimpleNamespace) -> None:
    """A change rolled back by transaction.savepoint()'s rollback is gone
    from what the next block reads."""
    txn = transaction.get()
    txn.savepoint()
    with zsa.tx() as Session:
        Session.add(zsa.User(id=1, firstname="udo", lastname="juergens"))
    s2 = txn.savepoint()
    with zsa.tx() as Session:
        Session.get(zsa.User, 1).firstname = "heino"
    s2.rollback()
    with zsa.tx() as Session:
        assert Session.get(zsa.User, 1).firstname == "udo"
    transaction.commit()
    assert users(zsa) == TWO[:1]


def test_commit(zsa: SimpleNamespace) -> None:
    with zsa.tx() as Session:
        assert Session.scalars(sa.select(zsa.User)).all() == []
    transaction.commit()  # a transaction that wrote nothing commits
    with zsa.tx() as Session:
        add_two(zsa, Session)
    transaction.abort()  # and an abort really aborts
    assert users(zsa) == []
    with zsa.tx() as Session:
        assert Session.scalars(sa.select(zsa.User)).all() == []
        add_two(zsa, Session)
    transaction.commit()
    with zsa.tx() as Session:
        found = Session.scalars(sa.select(zsa.User).order_by(zsa.User.id)).all()
        assert [(u.id, u.firstname, u.lastname) for u in found] == TWO
    transaction.commit()
    assert users(zsa) == TWO


def test_commit_with_savepoint(zsa: SimpleNamespace) -> None:
    with zsa.tx() as Session:
        add_two(zsa, Session)
    transaction.commit()
    txn = transaction.get()
    with zsa.tx() as Session:
        rows = Session.scalars(sa.select(zsa.User).order_by(zsa.User.id)).all()
        assert len(rows) == 2
    txn.savepoint()
    with zsa.tx() as Session:
        Session.delete(Session.get(zsa.User, 2))
    transaction.commit()
    assert users(zsa) == TWO[:1]


class AppSession(Session):
    """An application's own Session class."""


@pytest.mark.parametrize("session_class", [None, AppSession], ids=["Session", "AppSession"])
def test_session_savepoint_commit_allowed(
    zsa: SimpleNamespace, session_class: type[Session] | None
) -> None:
    """Code that uses begin_nested() itself keeps working in a joined block,
    with SQLAlchemy's Session and with an application's own class."""
    tx = zsa.tx
    if session_class is not None:
        tx = ThreadLocalSASessionTransaction(
            zsa.engine, zsa.Base, join="always", twophase=zsa.twophase, class_=session_class
        )
    with tx() as Session:
        assert session_class is None or isinstance(Session(), session_class)
        Session.add(zsa.User(id=1, firstname="udo", lastname="juergens"))
        nested = Session().begin_nested()
        Session.add(zsa.User(id=2, firstname="heino", lastname="n/a"))
        nested.commit()
    transaction.commit()
    assert users(zsa) == TWO
    tx.scoped_session.remove()


@pytest.mark.parametrize("session_class", [None, AppSession], ids=["Session", "AppSession"])
def test_session_commit_disallowed(
    zsa: SimpleNamespace, session_class: type[Session] | None
) -> None:
    """zope.sqlalchemy raises AssertionError; sparc.sa JoinedTransactionError,
    and the block's work is rolled back with the transaction."""
    tx = zsa.tx
    if session_class is not None:
        tx = ThreadLocalSASessionTransaction(
            zsa.engine, zsa.Base, join="always", twophase=zsa.twophase, class_=session_class
        )
    with pytest.raises(JoinedTransactionError), tx() as Session:
        Session.add(zsa.User(id=1, firstname="udo", lastname="juergens"))
        Session.commit()
    transaction.commit()
    assert users(zsa) == []
    tx.scoped_session.remove()


def _prepared(engine: Engine) -> set[Any]:
    """The server's prepared transactions, asked directly: SQLAlchemy 2.0.0's
    MySQL dialect cannot read XA RECOVER's rows (recover_twophase() fails)."""
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            return set(conn.exec_driver_sql("SELECT gid FROM pg_prepared_xacts").scalars())
        rows = conn.exec_driver_sql("XA RECOVER").all()
        return {row[3][: row[1]] for row in rows}


def test_two_phase(zsa: SimpleNamespace) -> None:
    """Two-phase mode prepares before another resource votes, and a failed
    vote rolls the prepared transaction back: none is left behind."""
    if not zsa.twophase:
        pytest.skip("two-phase mode only: the server modes with -2pc")
    with zsa.tx() as Session:
        add_two(zsa, Session)
    transaction.commit()
    assert users(zsa) == TWO
    before = _prepared(zsa.engine)
    txn = transaction.get()
    with zsa.tx() as Session:
        Session.delete(Session.get(zsa.User, 1))
    txn.join(StandIn(key="~~~stand-in.last", target=lambda: _prepared(zsa.engine) - before))
    with pytest.raises(Result) as voted:
        txn.commit()
    assert len(voted.value.args[0]) == 1, "ours was prepared when the last resource voted"
    transaction.abort()
    assert _prepared(zsa.engine) - before == set()
    assert users(zsa) == TWO


def test_thread(zsa: SimpleNamespace) -> None:
    """A thread's blocks join that thread's transaction only."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            with zsa.tx() as Session:
                assert Session.scalars(sa.select(zsa.User)).all() == []
                add_two(zsa, Session)
                Session.flush()
                assert len(Session.scalars(sa.select(zsa.User)).all()) == 2
            transaction.abort()
        except BaseException as error:
            errors.append(error)

    worker = threading.Thread(target=target)
    worker.start()
    worker.join()
    assert errors == []
    assert our_resources(transaction.get()) == []
    transaction.commit()
    assert users(zsa) == []


def _bulk(zsa: SimpleNamespace, tx: Any, statement: Any) -> None:
    with tx() as Session:
        add_two(zsa, Session)
    transaction.commit()
    with tx() as Session:
        Session.execute(statement)
    transaction.commit()


def test_bulk_delete(zsa: SimpleNamespace) -> None:
    _bulk(zsa, zsa.tx, sa.delete(zsa.User))
    assert users(zsa) == []


def test_bulk_update(zsa: SimpleNamespace) -> None:
    _bulk(zsa, zsa.tx, sa.update(zsa.User).values(lastname="smith"))
    assert [u[2] for u in users(zsa)] == ["smith", "smith"]


def _shared(zsa: SimpleNamespace) -> Any:
    from sparc.sa import configure_transaction

    return configure_transaction(zsa.engine, zsa.Base, join="always", twophase=zsa.twophase)


def test_bulk_delete_using_register(zsa: SimpleNamespace) -> None:
    """The ORM's legacy Query.delete(), through the shared manager."""
    tx = _shared(zsa)
    with tx() as Session:
        add_two(zsa, Session)
    transaction.commit()
    with tx() as Session:
        Session.query(zsa.User).delete()
    transaction.commit()
    assert users(zsa) == []


def test_bulk_update_using_register(zsa: SimpleNamespace) -> None:
    tx = _shared(zsa)
    with tx() as Session:
        add_two(zsa, Session)
    transaction.commit()
    with tx() as Session:
        Session.query(zsa.User).update({"lastname": "smith"})
    transaction.commit()
    assert [u[2] for u in users(zsa)] == ["smith", "smith"]


def test_failed_join(zsa: SimpleNamespace) -> None:
    """A block opened while the transaction is COMMITFAILED fails, and leaves
    no session joined that a later transaction would carry along."""
    from transaction._transaction import Status

    transaction.get().join(StandIn(fail_at="commit"))
    with pytest.raises(Boom):
        transaction.commit()
    assert transaction.get().status == Status.COMMITFAILED
    with pytest.raises(TransactionFailedError), zsa.tx() as Session:
        Session.scalars(sa.select(zsa.User)).all()
        Session.add(zsa.User(id=9, firstname="not", lastname="committed"))
    transaction.abort()
    assert users(zsa) == [], "a block of a failed transaction committed by itself"
    transaction.begin()
    with zsa.tx() as Session:
        assert Session.scalars(sa.select(zsa.User)).all() == []
        Session.add(zsa.User(id=1, firstname="udo", lastname="juergens"))
    transaction.abort()
    with zsa.tx() as Session:
        assert Session.scalars(sa.select(zsa.User)).all() == []
    transaction.commit()
    assert users(zsa) == []


def test_keep_session(zsa: SimpleNamespace) -> None:
    """zope.sqlalchemy's keep_session=True keeps the session across
    transactions; sparc.sa has no such option: the session is reset when
    the transaction ends, and an object loaded before is no longer in it.
    (With expire_on_commit=False its loaded attributes stay readable.)"""
    with zsa.tx() as Session:
        Session.add(zsa.User(id=1, firstname="foo", lastname="bar"))
    transaction.commit()
    with zsa.tx() as Session:
        user = Session.get(zsa.User, 1)
        assert user is not None
    transaction.commit()
    assert user not in zsa.tx.session
    assert sa.inspect(user).detached
    with zsa.tx() as Session:
        merged = Session.merge(user)
        merged.firstname = "super"
    transaction.commit()
    assert users(zsa) == [(1, "super", "bar")]


def test_expire_all(zsa: SimpleNamespace) -> None:
    """After the transaction ends, an instance no longer belongs to a session
    (zope.sqlalchemy closes the session; sparc.sa resets it)."""
    with zsa.tx() as Session:
        Session.add(zsa.User(id=1, firstname="udo", lastname="juergens"))
    transaction.commit()
    with zsa.tx() as Session:
        instance = Session.get(zsa.User, 1)
    transaction.commit()  # nothing written
    state = sa.inspect(instance)
    assert state.detached
    assert instance not in zsa.tx.session


# -- tests.py: RetryTests -------------------------------------------------------------------


@pytest.fixture
def two_managers(zsa: SimpleNamespace) -> Iterator[SimpleNamespace]:
    """Two explicit transaction managers and a manager on an engine of its
    own for each (as zope.sqlalchemy's RetryTests set up), one user row."""
    if zsa.backend == "sqlite-file":
        pytest.skip("SQLite locks the whole database: the second writer waits, nothing conflicts")
    engines = [make_engine(str(zsa.engine.url.render_as_string(hide_password=False)))]
    engines.append(make_engine(str(zsa.engine.url.render_as_string(hide_password=False))))
    txs = [
        ThreadLocalSASessionTransaction(e, zsa.Base, join="always", twophase=zsa.twophase)
        for e in engines
    ]
    tms = [transaction.TransactionManager(explicit=True) for _ in engines]
    tms[0].begin()
    with txs[0](transaction_manager=tms[0]) as Session:
        Session.add(zsa.User(id=1, firstname="udo", lastname="juergens"))
    tms[0].commit()
    yield SimpleNamespace(tm1=tms[0], tm2=tms[1], tx1=txs[0], tx2=txs[1])
    for tm in tms:
        if tm._txn is not None:
            tm.abort()
    for tx in txs:
        tx.scoped_session.remove()
    for e in engines:
        e.dispose()


def test_retry(zsa: SimpleNamespace, two_managers: SimpleNamespace) -> None:
    """A row deleted by a concurrent transaction makes the ORM's UPDATE of it
    fail with StaleDataError, which zope.sqlalchemy declares retryable.
    sparc.sa too: the block raises RetryableDatabaseError (a TransientError)
    caused by it, and the owner of the transaction retries."""
    t = two_managers
    t.tm1.begin()
    with t.tx1(transaction_manager=t.tm1) as S1:
        assert len(S1.scalars(sa.select(zsa.User)).all()) == 1
    t.tm2.begin()
    with (
        pytest.raises(RetryableDatabaseError) as caught,
        t.tx2(transaction_manager=t.tm2) as S2,
    ):
        user = S2.get(zsa.User, 1)
        assert user is not None
        # meanwhile, the other transaction deletes the row and commits
        with t.tx1(transaction_manager=t.tm1) as S1:
            S1.execute(sa.delete(zsa.User))
        t.tm1.commit()
        user.lastname = "smith"
        S2.flush()
    assert isinstance(caught.value.__cause__, sa.orm.exc.StaleDataError)
    assert t.tm2._retryable(type(caught.value), caught.value)


def test_retry_thread(zsa: SimpleNamespace, two_managers: SimpleNamespace) -> None:
    """A SERIALIZABLE transaction that locks a row a concurrent one deleted
    and committed meanwhile fails with a serialization failure: sparc.sa
    raises RetryableDatabaseError, a TransientError the manager retries."""
    if zsa.backend != "postgresql":
        pytest.skip("MariaDB answers a locking read of a deleted row with no row, not an error")
    t = two_managers
    t.tm1.begin()
    with t.tx1(transaction_manager=t.tm1) as S1:
        assert len(S1.scalars(sa.select(zsa.User)).all()) == 1
    t.tm2.begin()
    with t.tx2(transaction_manager=t.tm2) as S2:
        S2.execute(sa.text("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"))
        assert len(S2.scalars(sa.select(zsa.User)).all()) == 1
    with t.tx1(transaction_manager=t.tm1) as S1:
        S1.execute(sa.delete(zsa.User))
    committer = threading.Timer(0.2, t.tm1.commit)
    committer.start()
    try:
        with (
            pytest.raises(RetryableDatabaseError) as caught,
            t.tx2(transaction_manager=t.tm2) as S2,
        ):
            S2.scalars(sa.select(zsa.User).where(zsa.User.id == 1).with_for_update()).one()
    finally:
        committer.join()
    assert t.tm2._retryable(type(caught.value), caught.value)


# -- tests.py: MultipleEngineTests --------------------------------------------------------


def test_two_engines(zsa: SimpleNamespace) -> None:
    """zope.sqlalchemy skips this on SQLAlchemy 2 (bound metadata is gone);
    here: two managers on two engines, one transaction, committed and
    aborted as one."""
    other_engine = make_engine(f"sqlite:///{zsa.tmp_path / 'other.db'}")
    other = make_models()
    other.Base.metadata.create_all(other_engine)
    other_tx = ThreadLocalSASessionTransaction(other_engine, other.Base, join="always")
    try:
        with zsa.tx() as Session:
            Session.add(zsa.User(id=1, firstname="udo", lastname="juergens"))
        with other_tx() as Other:
            Other.add(other.User(id=2, firstname="heino", lastname="n/a"))
        transaction.commit()
        with other_tx() as Other:
            Other.add(other.User(id=3, firstname="x", lastname="y"))
        with zsa.tx() as Session:
            Session.add(zsa.User(id=4, firstname="x", lastname="y"))
        transaction.abort()
        assert users(zsa) == TWO[:1]
        assert users(other, other_engine) == TWO[1:]
    finally:
        other_tx.scoped_session.remove()
        other_engine.dispose()


# -- README.rst ------------------------------------------------------------------------------


def test_readme_full_example(zsa: SimpleNamespace) -> None:
    with zsa.tx() as Session:
        assert Session.scalars(sa.select(zsa.User)).all() == []
        Session.add(zsa.User(id=1, firstname="bob", lastname="b"))
    transaction.commit()
    # engine-level connections are outside the transaction
    assert users(zsa) == [(1, "bob", "b")]
    with zsa.tx() as Session:
        bob = Session.scalars(sa.select(zsa.User)).one()
        assert bob.addresses == []
        bob.addresses.append(zsa.Address(id=1, email="bob@bob.bob"))
    transaction.commit()
    with zsa.tx() as Session:
        bob = Session.scalars(sa.select(zsa.User)).one()
        assert [a.email for a in bob.addresses] == ["bob@bob.bob"]
        bob.addresses[0].email = "wrong@wrong"
    transaction.abort()
    with zsa.tx() as Session:
        bob = Session.scalars(sa.select(zsa.User)).one()
        assert bob.addresses[0].email == "bob@bob.bob"
    transaction.abort()


def test_readme_manual_sql_needs_no_mark_changed(zsa: SimpleNamespace) -> None:
    """zope.sqlalchemy commits a Core UPDATE only after mark_changed() (or
    with register(..., 'changed')); in sparc.sa it commits as it is."""
    with zsa.tx() as Session:
        Session.add(zsa.User(id=1, firstname="bob", lastname="b"))
    transaction.commit()
    table = zsa.User.__table__
    with zsa.tx() as Session:
        Session.connection().execute(
            table.update().where(table.c.firstname == "bob"), {"firstname": "ben"}
        )
    transaction.commit()
    assert users(zsa) == [(1, "ben", "b")]


def test_readme_mark_changed_keep_session(zsa: SimpleNamespace) -> None:
    """mark_changed(session, keep_session=True) has no counterpart: the write
    commits unmarked, and the session is reset all the same."""
    with zsa.tx() as Session:
        Session.add(zsa.User(id=1, firstname="bob", lastname="b"))
        bob = Session.get(zsa.User, 1)
    transaction.commit()
    assert bob not in zsa.tx.session
    assert users(zsa) == [(1, "bob", "b")]


def test_readme_long_lasting_session_scopes(zsa: SimpleNamespace) -> None:
    """An object used after the transaction: zope.sqlalchemy raises
    DetachedInstanceError on an expired attribute; sparc.sa's sessions do not
    expire on commit, so loaded attributes stay readable, the object is
    detached, and a change to it is not written unless merged in a block."""
    with zsa.tx() as Session:
        Session.add(zsa.User(id=1, firstname="bob", lastname="b"))
    transaction.commit()
    with zsa.tx() as Session:
        bob = Session.get(zsa.User, 1)
    transaction.commit()
    assert bob.firstname == "bob"
    bob.firstname = "bobby"
    transaction.commit()
    assert users(zsa) == [(1, "bob", "b")]
    with zsa.tx() as Session:
        Session.merge(bob)
    transaction.commit()
    assert users(zsa) == [(1, "bobby", "b")]


# -- issue 15: the adversarial round -------------------------------------------------------


@pytest.mark.parametrize("reset", ["rollback", "close", "remove"])
def test_session_reset_between_joined_blocks_keeps_the_transaction_whole(
    zsa: SimpleNamespace, reset: str
) -> None:
    """tx.session.rollback(), .close() or the 1.x Session.remove() between two
    joined blocks: the transaction commits both blocks, or is refused with
    an error and commits neither; never only the second."""
    with zsa.tx() as Session:
        Session.add(zsa.User(id=1, firstname="udo", lastname="juergens"))
    refused: BaseException | None = None
    try:
        if reset == "remove":
            zsa.tx.scoped_session.remove()
        else:
            getattr(zsa.tx.session, reset)()
        with zsa.tx() as Session:
            Session.add(zsa.User(id=2, firstname="heino", lastname="n/a"))
        transaction.commit()
    except Exception as error:
        refused = error
        transaction.abort()
    if refused is None:
        assert users(zsa) == TWO
    else:
        assert users(zsa) == [], f"refused with {refused!r}, yet rows were committed"


def test_savepoint_taken_inside_a_block_rolled_back_after_it(zsa: SimpleNamespace) -> None:
    """A transaction.savepoint() taken inside a block and rolled back after
    the block ended either undoes what followed it or raises; it never
    returns normally having undone nothing."""
    with zsa.tx() as Session:
        Session.add(zsa.User(id=1, firstname="udo", lastname="juergens"))
        Session.flush()
        sp = transaction.savepoint()
        Session.add(zsa.User(id=2, firstname="heino", lastname="n/a"))
    try:
        sp.rollback()
    except Exception:
        transaction.abort()
        assert users(zsa) == []
        return
    transaction.commit()
    assert users(zsa) == TWO[:1]


@pytest.mark.parametrize("hook", ["after_commit", "after_abort"])
def test_blocks_in_after_commit_and_after_abort_hooks_commit_by_themselves(
    zsa: SimpleNamespace, hook: str
) -> None:
    seen: list[BaseException] = []

    def write(*args: Any) -> None:
        try:
            with zsa.tx() as Session:
                Session.add(zsa.User(id=2, firstname="heino", lastname="n/a"))
        except BaseException as error:
            seen.append(error)

    txn = transaction.get()
    with zsa.tx() as Session:
        Session.add(zsa.User(id=1, firstname="udo", lastname="juergens"))
    if hook == "after_commit":
        txn.addAfterCommitHook(write)
        transaction.commit()
        assert seen == []
        assert users(zsa) == TWO
    else:
        txn.addAfterAbortHook(write)
        transaction.abort()
        assert seen == []
        assert users(zsa) == TWO[1:]


def test_two_bases_on_one_engine_share_the_transaction(zsa: SimpleNamespace) -> None:
    """Two add-ons, two declarative bases, one engine, one joined transaction:
    both blocks run, and commit or abort together."""
    second = make_models()
    second.Base.metadata.create_all(zsa.engine)
    tx2 = ThreadLocalSASessionTransaction(
        zsa.engine, second.Base, join="always", twophase=zsa.twophase
    )
    try:
        with zsa.tx() as Session:
            Session.add(zsa.User(id=1, firstname="udo", lastname="juergens"))
        with tx2() as Other:
            Other.add(second.User(id=2, firstname="heino", lastname="n/a"))
        with zsa.tx() as Session:
            Session.add(zsa.User(id=2, firstname="heino", lastname="n/a"))
        transaction.commit()
        assert users(zsa) == TWO
        assert users(second, zsa.engine) == TWO[1:]
        with tx2() as Other:
            Other.add(second.User(id=3, firstname="x", lastname="y"))
        with zsa.tx() as Session:
            Session.add(zsa.User(id=3, firstname="x", lastname="y"))
        transaction.abort()
        assert users(zsa) == TWO
        assert users(second, zsa.engine) == TWO[1:]
    finally:
        transaction.abort()
        tx2.scoped_session.remove()
        second.Base.metadata.drop_all(zsa.engine)


def test_rolling_back_an_earlier_savepoint_from_inside_a_later_block(
    zsa: SimpleNamespace,
) -> None:
    """A savepoint taken before a block, rolled back from inside it: the
    transaction is not doomed with ResourceClosedError; what came before the
    savepoint commits."""
    with zsa.tx() as Session:
        Session.add(zsa.User(id=1, firstname="udo", lastname="juergens"))
    sp = transaction.savepoint()
    try:
        with zsa.tx() as Session:
            Session.add(zsa.User(id=2, firstname="heino", lastname="n/a"))
            Session.flush()
            sp.rollback()
    except Exception as error:
        assert not isinstance(error, sa.exc.ResourceClosedError), error
    transaction.commit()
    assert users(zsa) == TWO[:1]


def test_a_caught_failed_statement_then_commit(zsa: SimpleNamespace) -> None:
    """A statement fails inside a block and the block catches it. On
    PostgreSQL that aborts the server's transaction: the commit must then
    either keep the earlier block's row (the failed block rolled back to its
    savepoint) or fail loudly. It never reports success having committed
    nothing."""
    with zsa.tx() as Session:
        Session.add(zsa.User(id=1, firstname="udo", lastname="juergens"))
    block_error: BaseException | None = None
    try:
        with zsa.tx() as Session:
            Session.add(zsa.User(id=2, firstname="heino", lastname="n/a"))
            Session.flush()
            with contextlib.suppress(sa.exc.DBAPIError):
                Session.execute(sa.text("SELECT * FROM no_such_table_zsa"))
    except Exception as error:
        block_error = error
    try:
        transaction.commit()
    except Exception:
        transaction.abort()
        assert users(zsa) == []
        return
    committed = users(zsa)
    assert committed, "the commit reported success but committed nothing"
    assert committed[0] == TWO[0]
    if block_error is not None:
        assert committed == TWO[:1]


def test_a_caught_failed_statement_in_plain_nested_blocks(zsa: SimpleNamespace) -> None:
    """The same outside joined mode: an inner block catching a failed
    statement. The outer block commits its own row, or raises."""
    tx = ThreadLocalSASessionTransaction(zsa.engine, zsa.Base, join="never")
    try:
        with tx() as Session:
            Session.add(zsa.User(id=1, firstname="udo", lastname="juergens"))
            try:
                with tx() as Inner:
                    Inner.add(zsa.User(id=2, firstname="heino", lastname="n/a"))
                    Inner.flush()
                    with contextlib.suppress(sa.exc.DBAPIError):
                        Inner.execute(sa.text("SELECT * FROM no_such_table_zsa"))
            except Exception:
                pass
    except Exception:
        assert users(zsa) == []
    else:
        assert users(zsa)[:1] == TWO[:1]
    finally:
        tx.scoped_session.remove()


def test_two_phase_and_transaction_savepoints(zsa: SimpleNamespace) -> None:
    """transaction.savepoint() before, inside and after blocks, in two-phase
    mode too (Plone takes savepoints all the time)."""
    before = transaction.savepoint()
    with zsa.tx() as Session:
        Session.add(zsa.User(id=1, firstname="udo", lastname="juergens"))
        Session.flush()
        transaction.savepoint()
    after = transaction.savepoint()
    with zsa.tx() as Session:
        Session.add(zsa.User(id=2, firstname="heino", lastname="n/a"))
    after.rollback()
    transaction.commit()
    assert users(zsa) == TWO[:1]
    transaction.savepoint()
    with zsa.tx() as Session:
        Session.add(zsa.User(id=2, firstname="heino", lastname="n/a"))
    transaction.commit()
    assert users(zsa) == TWO
    del before


def test_configure_transaction_disagreeing_twice_names_the_first(zsa: SimpleNamespace) -> None:
    """configure_transaction() follows <sa:transaction>'s rule: a second,
    disagreeing configuration raises ValueError naming where the first was."""
    from sparc.sa import configure_transaction

    first = configure_transaction(zsa.engine, zsa.Base, join="always")
    assert configure_transaction(zsa.engine, zsa.Base, join="always") is first
    with pytest.raises(ValueError, match="test_zsa_suite"):
        configure_transaction(zsa.engine, zsa.Base, join="never")
