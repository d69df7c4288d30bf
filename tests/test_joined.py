"""Joined mode: blocks inside a transaction of the `transaction` package commit
with it, exactly once, or not at all.

What Zope's publisher does around a request is done here by hand: begin,
run the view, commit or abort; with ZODB-like data managers voting before
ours.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

transaction = pytest.importorskip("transaction")

from transaction.interfaces import TransientError  # noqa: E402
from zope.interface.verify import verifyObject  # noqa: E402

from sparc.sa.exceptions import (  # noqa: E402
    DoomedTransactionError,
    JoinedTransactionError,
    RetryableDatabaseError,
)
from sparc.sa.orm import ThreadLocalSASessionTransaction, scoped_transaction  # noqa: E402

from .conftest import (  # noqa: E402
    SERVERS,
    build_models,
    checked_out,
    count_rows,
    make_engine,
    names,
    server_dsn,
)


def shared(engine: Engine) -> bool:
    return type(engine.pool).__name__ == "StaticPool"


class Boom(Exception):
    pass


class VotingDataManager:
    """Stands in for a ZODB connection: sorts before us, and can fail its vote."""

    def __init__(self, fail_vote: BaseException | None = None) -> None:
        self.fail_vote = fail_vote
        self.transaction_manager = transaction.manager
        self.log: list[str] = []

    def sortKey(self) -> str:
        return "/var/zodb/Data.fs"

    def abort(self, txn: Any) -> None:
        self.log.append("abort")

    def tpc_begin(self, txn: Any) -> None:
        self.log.append("tpc_begin")

    def commit(self, txn: Any) -> None:
        self.log.append("commit")

    def tpc_vote(self, txn: Any) -> None:
        self.log.append("tpc_vote")
        if self.fail_vote is not None:
            raise self.fail_vote

    def tpc_finish(self, txn: Any) -> None:
        self.log.append("tpc_finish")

    def tpc_abort(self, txn: Any) -> None:
        self.log.append("tpc_abort")


def test_the_default_manager_joins_an_explicit_transaction(
    engine: Engine, models: Any, joined: Any
) -> None:
    assert joined.join == "auto"
    transaction.begin()
    with joined():
        joined.session.add(models.Item(name="request"))
    if not shared(engine):  # another connection can look (on StaticPool there is none)
        assert count_rows(engine, models.Item) == 0, "committed before the transaction"
    transaction.commit()
    assert names(engine, models.Item) == ["request"]
    assert checked_out(engine) == 0


def test_outside_a_transaction_auto_is_never(engine: Engine, models: Any, joined: Any) -> None:
    with joined():
        joined.session.add(models.Item(name="alone"))
    assert names(engine, models.Item) == ["alone"]


def test_an_abort_rolls_back_every_block_of_the_request(
    engine: Engine, models: Any, joined: Any
) -> None:
    transaction.begin()
    with joined():
        joined.session.add(models.Item(name="one"))
    with joined():
        joined.session.add(models.Item(name="two"))
    transaction.abort()
    assert count_rows(engine, models.Item) == 0
    assert checked_out(engine) == 0


def test_a_failing_block_is_undone_and_the_request_goes_on(
    engine: Engine, models: Any, joined: Any
) -> None:
    transaction.begin()
    with joined():
        joined.session.add(models.Item(name="kept"))
    with pytest.raises(Boom), joined():
        joined.session.add(models.Item(name="undone"))
        joined.session.flush()
        raise Boom
    with joined():
        joined.session.add(models.Item(name="after"))
    transaction.commit()
    assert names(engine, models.Item) == ["after", "kept"]


def test_a_failed_joined_block_without_savepoint_dooms_the_transaction(
    engine: Engine, models: Any, joined: Any
) -> None:
    transaction.begin()
    with joined():
        joined.session.add(models.Item(name="doomed"))
    with pytest.raises(Boom), joined(savepoint=False):
        raise Boom
    assert transaction.get().isDoomed()
    transaction.abort()
    assert count_rows(engine, models.Item) == 0


def test_an_inner_joined_failure_fails_the_outer_block(
    engine: Engine, models: Any, joined: Any
) -> None:
    transaction.begin()
    with pytest.raises(DoomedTransactionError), joined():
        joined.session.add(models.Item(name="outer"))
        with pytest.raises(Boom), joined(savepoint=False):
            raise Boom
    transaction.commit()
    assert count_rows(engine, models.Item) == 0


def test_a_vote_failure_before_ours_rolls_the_sql_back(
    engine: Engine, models: Any, joined: Any
) -> None:
    zodb = VotingDataManager(fail_vote=Boom("ConflictError at vote"))
    txn = transaction.begin()
    txn.join(zodb)
    with joined():
        joined.session.add(models.Item(name="lost with zodb"))
    with pytest.raises(Boom):
        transaction.commit()
    transaction.abort()
    assert zodb.log[:3] == ["tpc_begin", "commit", "tpc_vote"]
    assert count_rows(engine, models.Item) == 0
    assert checked_out(engine) == 0


def test_every_write_commits_whoever_issued_it(engine: Engine, models: Any, joined: Any) -> None:
    """zope.sqlalchemy loses these unless mark_changed() is called."""
    table = models.Item.__table__
    transaction.begin()
    with joined():
        joined.session.execute(sa.insert(table).values(name="core insert"))
        joined.session.execute(sa.text(f"INSERT INTO {table.name} (name) VALUES ('text insert')"))
    transaction.commit()
    assert names(engine, models.Item) == ["core insert", "text insert"]


def test_session_commit_is_refused_inside_a_joined_transaction(
    engine: Engine, models: Any, joined: Any
) -> None:
    transaction.begin()
    with pytest.raises(JoinedTransactionError, match="end the `with tx"), joined():
        joined.session.add(models.Item(name="x"))
        joined.session.commit()
    transaction.abort()
    assert count_rows(engine, models.Item) == 0


def test_run_inside_a_joined_transaction_runs_once(
    engine: Engine, models: Any, joined: Any
) -> None:
    calls: list[int] = []

    def add(session: Any) -> str:
        calls.append(1)
        session.add(models.Item(name="run"))
        return "done"

    transaction.begin()
    assert joined.run(add, attempts=5) == "done"
    transaction.commit()
    assert calls == [1]
    assert names(engine, models.Item) == ["run"]


def test_transaction_savepoints_work_on_every_backend(
    engine: Engine, models: Any, joined: Any
) -> None:
    transaction.begin()
    with joined():
        joined.session.add(models.Item(name="before"))
    savepoint = transaction.savepoint()
    with joined():
        joined.session.add(models.Item(name="rolled back"))
    savepoint.rollback()
    with joined():
        joined.session.add(models.Item(name="after"))
    transaction.commit()
    assert names(engine, models.Item) == ["after", "before"]


def test_a_serialization_failure_reaches_the_publisher_as_a_transient_error(
    engine: Engine, models: Any, joined: Any
) -> None:
    error = sa.exc.OperationalError("UPDATE", {}, type("E", (Exception,), {"sqlstate": "40001"})())
    transaction.begin()
    with pytest.raises(RetryableDatabaseError) as caught, joined():
        raise error
    assert isinstance(caught.value, TransientError)
    assert caught.value.__cause__ is error
    dm = joined._scope().joined
    assert dm is not None and dm.should_retry(error)
    assert verifyObject(transaction.interfaces.IDataManager, dm)
    transaction.abort()


def test_attempts_retry_a_real_conflict(engine: Engine, models: Any, joined: Any) -> None:
    """transaction.manager.attempts() retries on RetryableDatabaseError."""
    with joined():
        joined.session.add(models.Counter(id=1, value=0))
    tries: list[int] = []
    for attempt in transaction.manager.attempts(3):
        with attempt:
            tries.append(1)
            with joined():
                counter = joined.session.get(models.Counter, 1)
                counter.value += 1
                if len(tries) == 1:
                    raise RetryableDatabaseError("simulated conflict")
    assert len(tries) == 2
    with engine.connect() as conn:
        assert conn.execute(sa.select(models.Counter.value)).scalar_one() == 1


def test_join_never_and_always(engine: Engine, models: Any) -> None:
    never = ThreadLocalSASessionTransaction(engine, models.Base, join="never")
    always = ThreadLocalSASessionTransaction(engine, models.Base, join="always")
    with never():
        never.session.add(models.Item(name="never"))
    assert names(engine, models.Item) == ["never"]
    with always():  # implicit mode: joins the thread's transaction
        always.session.add(models.Item(name="always"))
    if not shared(engine):
        assert names(engine, models.Item) == ["never"]
    transaction.commit()
    assert names(engine, models.Item) == ["always", "never"]
    assert checked_out(engine) == 0


def test_join_never_commits_again_on_each_retry(engine: Engine, models: Any) -> None:
    """``join="never"`` inside a request: the block commits by itself, so a
    ZODB conflict at the request's commit, and the retry, commit it twice."""
    never = ThreadLocalSASessionTransaction(engine, models.Base, join="never")
    tries = 0
    for attempt in transaction.manager.attempts(2):
        with attempt:
            tries += 1
            with never():
                never.session.add(models.Item(name="twice"))
            if tries == 1:
                transaction.get().join(VotingDataManager(TransientError("ZODB conflict")))
    assert tries == 2
    assert names(engine, models.Item) == ["twice", "twice"]
    assert checked_out(engine) == 0


@pytest.mark.parametrize("join", ["sometimes", "", None, True])
def test_join_must_be_a_mode(engine: Engine, models: Any, join: Any) -> None:
    with pytest.raises(ValueError, match="'join' must be one of"):
        ThreadLocalSASessionTransaction(engine, models.Base, join=join)


def test_twophase_is_refused_on_sqlite(models: Any) -> None:
    engine = sa.create_engine("sqlite://")
    with pytest.raises(ValueError, match="not supported by SQLite"):
        ThreadLocalSASessionTransaction(engine, models.Base, twophase=True)


def test_requests_in_threads_do_not_see_each_others_transactions(
    engine: Engine, models: Any, joined: Any
) -> None:
    if engine.dialect.name == "sqlite":
        pytest.skip("SQLite admits one writer at a time: the second request waits for the first")
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def request(name: str, commit: bool) -> None:
        try:
            transaction.manager.explicit = True
            transaction.begin()
            with joined():
                joined.session.add(models.Item(name=name))
            barrier.wait(5)
            transaction.commit() if commit else transaction.abort()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [
        threading.Thread(target=request, args=("committed", True)),
        threading.Thread(target=request, args=("aborted", False)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert names(engine, models.Item) == ["committed"]
    assert checked_out(engine) == 0


# -- two-phase commit ---------------------------------------------------------------


@pytest.fixture(params=SERVERS)
def twophase(request: pytest.FixtureRequest) -> Iterator[tuple[Engine, Any, Any]]:
    engine = make_engine(server_dsn(request.param))
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            allowed = int(conn.exec_driver_sql("show max_prepared_transactions").scalar_one())
        if allowed == 0:
            pytest.fail(
                "the PostgreSQL server has max_prepared_transactions = 0; .ci/run "
                "raises it (ALTER SYSTEM, restart) before the tests"
            )
    ns = build_models()
    ns.Base.metadata.create_all(engine)
    manager = ThreadLocalSASessionTransaction(engine, ns.Base, join="always", twophase=True)
    tm = transaction.manager
    try:
        yield engine, ns, manager
    finally:
        if tm.manager._txn is not None:
            tm.abort()
        ns.Base.metadata.drop_all(engine)
        assert engine.pool.checkedout() == 0
        engine.dispose()


def prepared(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            return list(conn.exec_driver_sql("SELECT gid FROM pg_prepared_xacts").scalars())
        return [row[3] for row in conn.exec_driver_sql("XA RECOVER")]


def test_twophase_commits_with_the_transaction(twophase: tuple[Engine, Any, Any]) -> None:
    engine, ns, manager = twophase
    others = set(prepared(engine))  # the servers are shared: only ours count
    transaction.begin()
    with manager():
        manager.session.add(ns.Item(name="prepared, then committed"))
    transaction.commit()
    assert names(engine, ns.Item) == ["prepared, then committed"]
    assert set(prepared(engine)) <= others


@pytest.mark.parametrize("fails", ["zodb", "sql"])
def test_a_failure_at_either_vote_commits_neither_side(
    twophase: tuple[Engine, Any, Any], fails: str
) -> None:
    engine, ns, manager = twophase
    others = set(prepared(engine))
    zodb = VotingDataManager(fail_vote=Boom("zodb vote") if fails == "zodb" else None)
    txn = transaction.begin()
    txn.join(zodb)
    with manager():
        manager.session.add(ns.Item(name="neither"))
        if fails == "sql":
            # a duplicate primary key, flushed only at commit: our vote fails
            manager.session.add(ns.Counter(id=1))
    if fails == "sql":
        with manager():
            manager.session.execute(sa.insert(ns.Counter.__table__).values(id=2))
        # make the vote fail: the PREPARE of a transaction whose flush fails
        manager.session.add(ns.Counter(id=2))
    with pytest.raises((Boom, sa.exc.IntegrityError)):
        transaction.commit()
    transaction.abort()
    assert "tpc_finish" not in zodb.log
    assert count_rows(engine, ns.Item) == 0
    assert set(prepared(engine)) <= others


def test_auto_joins_while_a_request_is_being_published(engine: Engine, models: Any) -> None:
    """ZPublisher begins the transaction (implicit mode) and sets the request
    (zope.globalrequest); a transaction that merely exists because something
    called transaction.get() is not joined, request or not (sparc.sa.tx.begun)."""
    globalrequest = pytest.importorskip("zope.globalrequest")
    manager = scoped_transaction(engine, models.Base)
    transaction.abort()
    try:
        globalrequest.setRequest(object())
        transaction.get()  # what opening a ZODB connection does
        with manager():
            manager.session.add(models.Item(name="not begun: committed now"))
        assert manager._scope().joined is None
        transaction.begin()  # implicit mode, as ZPublisher's manager is
        with manager():
            manager.session.add(models.Item(name="in a request"))
        assert manager._scope().joined is not None
        transaction.abort()  # the request failed
    finally:
        globalrequest.clearRequest()
        transaction.abort()
    assert names(engine, models.Item) == ["not begun: committed now"]
    assert checked_out(engine) == 0


def test_a_failing_first_block_is_undone_and_the_request_goes_on(
    engine: Engine, models: Any, joined: Any
) -> None:
    """The first block of a request needs no SAVEPOINT (rolling back the
    whole SQL transaction undoes exactly it); it is still all-or-nothing."""
    statements: list[str] = []
    sa.event.listen(
        engine, "before_cursor_execute", lambda *a: statements.append(a[2].split()[0].upper())
    )
    transaction.begin()
    with pytest.raises(Boom), joined():
        joined.session.add(models.Item(name="undone"))
        joined.session.flush()
        raise Boom
    with joined():
        joined.session.add(models.Item(name="second"))
    with pytest.raises(Boom), joined():  # now there is work to keep: a SAVEPOINT
        joined.session.add(models.Item(name="undone too"))
        joined.session.flush()
        raise Boom
    transaction.commit()
    assert names(engine, models.Item) == ["second"]
    assert statements.count("SAVEPOINT") == 1, statements
    assert checked_out(engine) == 0
