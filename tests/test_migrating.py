"""A zope.sqlalchemy or z3c.saconfig user's scripts keep their behaviour.

A script works under ``with transaction.manager:`` or
``transaction.manager.attempts(3)`` with the shared manager as the migration
guide configures it (``join`` left at its default, ``"auto"``), and gets the
outcomes zope.sqlalchemy gave it: a success commits, an error after the block
commits nothing, a TransientError or a serialization failure is retried and
commits once, a doomed transaction commits nothing. A transaction that only
exists because something called ``transaction.get()`` is not joined: the
block commits by itself. Writes made through the session outside any block
go with the transaction they were made in, and never into the next one.

Each case runs on every backend, with the thread's manager in implicit mode
(the ``transaction`` package's default) and in explicit mode.
"""

from __future__ import annotations

import gc
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

transaction = pytest.importorskip("transaction")

from transaction.interfaces import DoomedTransaction, TransientError  # noqa: E402

from sparc.sa.orm import scoped_transaction  # noqa: E402
from sparc.sa.tx import begun  # noqa: E402

from .conftest import checked_out, names  # noqa: E402


class Boom(Exception):
    pass


@pytest.fixture(params=["implicit", "explicit"])
def tm(request: pytest.FixtureRequest) -> Iterator[Any]:
    """The thread's ``transaction.manager`` in the given mode."""
    manager = transaction.manager
    manager.abort()
    manager.explicit = request.param == "explicit"
    try:
        yield manager
    finally:
        if manager.manager._txn is not None:
            manager.abort()
        manager.explicit = False


def run_attempts(tm: Any, body: Any, attempts: int = 3) -> int:
    """What a script does: ``for attempt in tm.attempts(3): with attempt: ...``;
    returns how many attempts ran."""
    ran = 0
    for attempt in tm.attempts(attempts):
        with attempt:
            ran += 1
            body(ran)
    return ran


def test_a_success_commits(engine: Engine, models: Any, tm: Any) -> None:
    tx = scoped_transaction(engine, models.Base)

    def body(n: int) -> None:
        with tx():
            tx.session.add(models.Item(name="ok"))

    assert run_attempts(tm, body) == 1
    assert names(engine, models.Item) == ["ok"]
    assert checked_out(engine) == 0


def test_an_error_after_the_block_commits_nothing(engine: Engine, models: Any, tm: Any) -> None:
    tx = scoped_transaction(engine, models.Base)
    with pytest.raises(Boom), tm:
        with tx():
            tx.session.add(models.Item(name="lost"))
        raise Boom
    assert names(engine, models.Item) == []
    assert checked_out(engine) == 0


def test_a_transient_error_is_retried_and_commits_once(
    engine: Engine, models: Any, tm: Any
) -> None:
    tx = scoped_transaction(engine, models.Base)

    def body(n: int) -> None:
        with tx():
            tx.session.add(models.Item(name=f"attempt {n}"))
        if n == 1:
            raise TransientError("try again")

    assert run_attempts(tm, body) == 2
    assert names(engine, models.Item) == ["attempt 2"]
    assert checked_out(engine) == 0


SERIALIZATION_FAILURE = {
    # A real error from the server, as a conflicting transaction would cause.
    "postgresql": (
        "DO $$ BEGIN RAISE EXCEPTION 'could not serialize access' "
        "USING ERRCODE = 'serialization_failure'; END $$"
    ),
    "mysql": (
        "BEGIN NOT ATOMIC SIGNAL SQLSTATE '40001' SET MYSQL_ERRNO = 1213, "
        "MESSAGE_TEXT = 'Deadlock found when trying to get lock'; END"
    ),
}


def test_a_serialization_failure_is_retried_and_commits_once(
    backend: str, engine: Engine, models: Any, tm: Any
) -> None:
    if backend not in SERIALIZATION_FAILURE:
        pytest.skip("SQLite has no serialization failures to provoke on one connection")
    tx = scoped_transaction(engine, models.Base)

    def body(n: int) -> None:
        with tx():
            tx.session.add(models.Item(name=f"attempt {n}"))
            tx.session.flush()
            if n == 1:
                tx.session.connection().exec_driver_sql(SERIALIZATION_FAILURE[backend])

    assert run_attempts(tm, body) == 2
    assert names(engine, models.Item) == ["attempt 2"]
    assert checked_out(engine) == 0


def test_a_doomed_transaction_commits_nothing(engine: Engine, models: Any, tm: Any) -> None:
    tx = scoped_transaction(engine, models.Base)

    def body(n: int) -> None:
        with tx():
            tx.session.add(models.Item(name="doomed"))
        tm.get().doom()

    # attempts() aborts the doomed transaction and raises DoomedTransaction.
    with pytest.raises(DoomedTransaction):
        run_attempts(tm, body)
    assert names(engine, models.Item) == []
    assert checked_out(engine) == 0


def test_begin_and_commit_by_hand(engine: Engine, models: Any, tm: Any) -> None:
    tx = scoped_transaction(engine, models.Base)
    tm.begin()
    with tx():
        tx.session.add(models.Item(name="committed"))
    tm.commit()
    tm.begin()
    with tx():
        tx.session.add(models.Item(name="aborted"))
    tm.abort()
    assert names(engine, models.Item) == ["committed"]
    assert checked_out(engine) == 0


def test_a_transaction_nobody_began_is_not_joined(engine: Engine, models: Any) -> None:
    """A zconsole-style script: a global request is set and opening the ZODB
    called transaction.get(); nobody will commit that transaction, so the
    block commits by itself."""
    globalrequest = pytest.importorskip("zope.globalrequest")
    tx = scoped_transaction(engine, models.Base)
    transaction.abort()
    globalrequest.setRequest(object())
    try:
        transaction.get()
        with tx():
            tx.session.add(models.Item(name="kept"))
        assert tx._scope().joined is None
        assert names(engine, models.Item) == ["kept"]
        transaction.abort()  # the script's end: nothing of the block is undone
    finally:
        globalrequest.clearRequest()
    assert names(engine, models.Item) == ["kept"]
    assert checked_out(engine) == 0


def test_after_commit_a_new_implicit_transaction_is_not_joined(engine: Engine, models: Any) -> None:
    """After transaction.commit(), the next get() makes a transaction nobody
    began: a block then commits by itself, as outside any transaction."""
    tx = scoped_transaction(engine, models.Base)
    transaction.begin()
    transaction.commit()
    transaction.get()
    with tx():
        tx.session.add(models.Item(name="alone"))
    assert names(engine, models.Item) == ["alone"]
    transaction.abort()
    assert names(engine, models.Item) == ["alone"]


def in_thread(fn: Any) -> None:
    errors: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(30)
    assert not thread.is_alive()
    if errors:
        raise errors[0]


def test_a_new_threads_first_block_joins_the_transaction_it_runs_in(
    backend: str, engine: Engine, models: Any
) -> None:
    """A thread whose first use of sparc.sa is inside ``with
    transaction.manager:``: sparc.sa never saw the begin(), and joins."""
    if backend == "sqlite":
        pytest.skip("one shared in-memory connection: blocks take turns across threads")
    tx = scoped_transaction(engine, models.Base)

    def script() -> None:
        with pytest.raises(Boom), transaction.manager:
            with tx():
                tx.session.add(models.Item(name="lost"))
            raise Boom
        with transaction.manager, tx():
            tx.session.add(models.Item(name="kept"))

    in_thread(script)
    assert names(engine, models.Item) == ["kept"]
    assert checked_out(engine) == 0


def test_joined_work_left_in_a_transaction_nobody_ends_is_reported(
    backend: str, engine: Engine, models: Any
) -> None:
    """A transaction sparc.sa could not tell apart from a begun one, which
    the script never commits: the block's work is lost, with a warning."""
    if backend == "sqlite":
        pytest.skip("one shared in-memory connection: blocks take turns across threads")
    tx = scoped_transaction(engine, models.Base)

    def script() -> None:
        transaction.get()  # before sparc.sa watched this thread's manager
        with tx():
            tx.session.add(models.Item(name="stranded"))
        assert tx._scope().joined is not None
        with pytest.warns(RuntimeWarning, match="1 sparc.sa block"):
            begun.warn_unended()
        transaction.abort()
        begun.warn_unended()  # ended now: nothing to say

    in_thread(script)
    assert names(engine, models.Item) == []
    assert checked_out(engine) == 0


# -- writes outside any block --------------------------------------------------------


def test_writes_outside_blocks_commit_with_the_transaction(
    engine: Engine, models: Any, tm: Any
) -> None:
    tx = scoped_transaction(engine, models.Base)
    with tm:
        tx.session.add(models.Item(name="outside"))
    assert names(engine, models.Item) == ["outside"]
    assert checked_out(engine) == 0


@pytest.mark.parametrize("ending", ["raise", "doom", "abort"])
def test_writes_outside_blocks_never_cross_into_the_next_transaction(
    engine: Engine, models: Any, tm: Any, ending: str
) -> None:
    """One transaction's writes made outside blocks, which then fails: the
    next transaction's block on the same thread does not commit them."""
    tx = scoped_transaction(engine, models.Base)
    if ending == "raise":
        with pytest.raises(Boom), tm:
            tx.session.add(models.Item(name="aborted write"))
            raise Boom
    else:
        txn = tm.begin()
        tx.session.add(models.Item(name="aborted write"))
        if ending == "doom":
            txn.doom()
            with pytest.raises(DoomedTransaction):
                tm.commit()
        tm.abort()  # what the script, the publisher or pyramid_tm does
    with tm, tx():
        tx.session.add(models.Item(name="next"))
    assert names(engine, models.Item) == ["next"]
    assert checked_out(engine) == 0


def test_reads_outside_blocks_in_a_transaction_leave_nothing_checked_out(
    engine: Engine, models: Any, tm: Any
) -> None:
    tx = scoped_transaction(engine, models.Base)
    with tm:
        assert tx.session.scalars(sa.select(models.Item)).all() == []
    assert checked_out(engine) == 0


def test_a_session_kept_from_an_ended_transaction_refuses_writes(
    engine: Engine, models: Any, tm: Any
) -> None:
    """A session kept from a transaction that has ended takes no write
    outside a block: the next transaction on the thread would commit it.
    Taken again from ``tx.session``, or in a block, it takes writes as
    before."""
    from sparc.sa.exceptions import JoinedTransactionError

    tx = scoped_transaction(engine, models.Base)
    with tm:
        kept = tx.session
        kept.add(models.Item(name="in the transaction"))
    with pytest.raises(JoinedTransactionError, match="transaction has ended"):
        kept.add(models.Item(name="after it"))
    with tm, tx():
        tx.session.add(models.Item(name="next"))
    assert names(engine, models.Item) == ["in the transaction", "next"]
    tx.session.add(models.Item(name="outside, taken again"))
    with tx():
        pass
    assert names(engine, models.Item) == ["in the transaction", "next", "outside, taken again"]
    assert checked_out(engine) == 0


def test_a_begin_after_clear_synchs_is_still_joined(engine: Engine, models: Any, tm: Any) -> None:
    """Test layers and ZODB call ``clearSynchs()``, which drops sparc.sa's
    synchronizer too; a transaction begun afterwards is still joined."""
    tx = scoped_transaction(engine, models.Base)
    with tx():  # sparc.sa has seen this thread
        pass
    tm.clearSynchs()
    with pytest.raises(Boom), tm:
        with tx():
            tx.session.add(models.Item(name="lost"))
        raise Boom
    assert names(engine, models.Item) == []
    with tm, tx():
        tx.session.add(models.Item(name="kept"))
    assert names(engine, models.Item) == ["kept"]
    assert checked_out(engine) == 0


def test_a_joined_session_only_taken_or_closed_is_not_reported(
    backend: str, engine: Engine, models: Any
) -> None:
    """``join="always"``: ``tx.session.close()`` after a commit takes the
    session, which joins the next transaction; with nothing in it, neither
    the exit check nor the thread's end reports lost work. Work added to it
    afterwards is reported."""
    if backend == "sqlite":
        pytest.skip("one shared in-memory connection: blocks take turns across threads")
    from sparc.sa.orm import ScopedTransaction

    tx = ScopedTransaction(engine, models.Base, join="always")

    def closes(then_adds: bool) -> None:
        tx.session.add(models.Item(name="committed"))
        transaction.commit()
        tx.session.close()  # joins the next transaction, with nothing in it
        assert tx._scope().joined is not None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            begun.warn_unended()
        if then_adds:
            tx.session.add(models.Item(name="lost"))
            with pytest.warns(RuntimeWarning, match="1 sparc.sa block"):
                begun.warn_unended()
            transaction.abort()

    in_thread(lambda: closes(True))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        in_thread(lambda: closes(False))  # the thread ends in that transaction
        gc.collect()
    assert [str(w.message) for w in seen if w.category is RuntimeWarning] == []
    assert names(engine, models.Item) == ["committed", "committed"]
    assert checked_out(engine) == 0


def test_a_thread_that_ends_inside_an_unended_joined_transaction_is_reported(
    backend: str, engine: Engine, models: Any
) -> None:
    if backend == "sqlite":
        pytest.skip("one shared in-memory connection: blocks take turns across threads")
    tx = scoped_transaction(engine, models.Base)

    def script() -> None:
        transaction.get()  # before sparc.sa watched this thread's manager
        with tx():
            tx.session.add(models.Item(name="stranded"))
        assert tx._scope().joined is not None

    with pytest.warns(RuntimeWarning, match="a thread ended while its sparc.sa blocks"):
        in_thread(script)
        gc.collect()
    assert names(engine, models.Item) == []


def test_the_data_manager_keeps_the_transaction_manager_it_was_given(
    engine: Engine, models: Any
) -> None:
    """As zope.sqlalchemy's data manager keeps the manager it was registered
    with: ``tx(transaction_manager=tm)`` and ``run(transaction_manager=tm)``."""
    tx = scoped_transaction(engine, models.Base)
    tm = transaction.TransactionManager(explicit=True)
    txn = tm.begin()
    with tx(transaction_manager=tm):
        tx.session.add(models.Item(name="block"))
    assert tx._scope().joined.transaction_manager is tm
    tm.commit()
    other = transaction.TransactionManager(explicit=True)
    other.begin()

    def fn(session: Any) -> Any:
        session.add(models.Item(name="run"))
        return tx._scope().joined.transaction_manager

    assert tx.run(fn, transaction_manager=other) is other
    other.commit()
    assert txn.status == "Committed"
    assert names(engine, models.Item) == ["block", "run"]
    transaction.begin()
    with tx():
        pass
    assert tx._scope().joined.transaction_manager is transaction.manager
    transaction.abort()
    assert checked_out(engine) == 0
