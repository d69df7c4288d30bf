"""What a block does, for both managers: each test body runs on every
database with the threaded manager (``with tx():``) and with the asyncio
manager (``async with atx():``), through the ``either`` fixture
(tests/conftest.py: ``FLAVOURS``, ``Either``).

Both managers' blocks are one state machine (sparc.sa.tx.stack), so every
test here has one answer for both; a branch on ``either.asyncio`` is only
for what the flavours set up differently, never for what a block does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import warnings
from typing import Any

import pytest
import sqlalchemy as sa

from sparc.sa.aio import AsyncScopedTransaction
from sparc.sa.exceptions import (
    AbortedTransactionError,
    BlockOrderError,
    DoomedTransactionError,
    IsolationLevelError,
    ReadOnlyTransactionError,
)
from sparc.sa.orm import ThreadLocalSASessionTransaction
from sparc.sa.tx.asyncblock import AsyncBlock
from sparc.sa.tx.stack import DONE, OPEN

from .conftest import AwaitedBlock, Either
from .test_isolation import OTHER_LEVEL, level_in_force


class Boom(Exception):
    pass


class Interrupt(BaseException):
    """Stands in for KeyboardInterrupt/SystemExit without stopping pytest."""


def test_the_fixture_drives_each_managers_own_blocks(either: Either) -> None:
    block = either.block()
    with block as session:
        if either.asyncio:
            # inside a task of the fixture's loop, in the real asyncio block
            assert asyncio.current_task() is not None
            assert isinstance(either.tx, AsyncScopedTransaction)
            assert isinstance(block, AwaitedBlock) and isinstance(block.block, AsyncBlock)
            assert isinstance(either.unwrapped(session), sa.ext.asyncio.AsyncSession)
            real = block.block
        else:
            assert isinstance(either.tx, ThreadLocalSASessionTransaction)
            assert isinstance(either.unwrapped(session), sa.orm.Session)
            real = block
        assert real._state is OPEN
        assert either.open_blocks() == 1
    assert either.open_blocks() == 0
    assert real._state is DONE


# -- commit or roll back ---------------------------------------------------------------


def test_a_block_commits_on_success(either: Either) -> None:
    with either.block() as session:
        session.add(either.Item(name="kept"))
    assert either.names() == ["kept"]
    assert either.checked_out() == 0


@pytest.mark.parametrize("error", [Boom("x"), Interrupt("stop"), KeyboardInterrupt()])
def test_a_block_rolls_back_on_any_exception_and_reraises_it_unchanged(
    either: Either, error: BaseException
) -> None:
    with pytest.raises(type(error)) as raised, either.block() as session:
        session.add(either.Item(name="lost"))
        session.flush()  # the row reached the database...
        raise error
    assert raised.value is error
    assert either.count() == 0  # ...and is gone
    assert either.checked_out() == 0
    with either.block() as session:  # and the next block commits
        session.add(either.Item(name="after"))
    assert either.names() == ["after"]


def test_a_commit_failure_rolls_back_and_raises_the_commit_error(either: Either) -> None:
    with either.block() as session:
        session.add(either.Counter(id=1))
    with pytest.raises(sa.exc.IntegrityError), either.block() as session:
        session.add(either.Item(name="with-the-duplicate"))
        session.add(either.Counter(id=1))  # fails at commit's flush
    assert either.count() == 0
    assert either.checked_out() == 0
    with either.block() as session:  # and the scope works again
        session.add(either.Item(name="after"))
    assert either.names() == ["after"]


def test_a_failed_rollback_is_logged_and_the_original_error_propagates(
    either: Either, caplog: pytest.LogCaptureFixture
) -> None:
    def broken_rollback(conn: Any) -> None:
        raise RuntimeError("rollback exploded")

    original = Boom("the block's own error")
    sa.event.listen(either.sync_engine, "rollback", broken_rollback)
    try:
        with (
            caplog.at_level(logging.WARNING, "sparc.sa"),
            pytest.raises(Boom) as raised,
            either.block() as session,
        ):
            session.add(either.Item(name="x"))
            session.flush()
            raise original
    finally:
        sa.event.remove(either.sync_engine, "rollback", broken_rollback)
    assert raised.value is original
    # One answer (sparc.sa.tx.sessions.rollback): ERROR on sparc.sa.sessions,
    # naming the error that ended the block.
    level, says = logging.ERROR, "rolling back after Boom failed"
    assert any(
        r.levelno == level
        and says in r.getMessage()
        and r.exc_info
        and "rollback exploded" in str(r.exc_info[1])
        for r in caplog.records
    ), caplog.text
    assert either.checked_out() == 0
    assert either.count() == 0
    with either.block() as session:
        session.add(either.Item(name="next"))
    assert either.names() == ["next"]


def test_a_block_object_is_entered_once(either: Either) -> None:
    block = either.block()
    with block:
        pass
    with pytest.raises(RuntimeError, match="entered once"), block:
        pass
    # One answer (sparc.sa.tx.stack.exit_closed) for both managers.
    with pytest.raises(RuntimeError, match="never entered"):
        either.block().__exit__(None, None, None)
    with pytest.raises(RuntimeError, match="already ended"):
        block.__exit__(None, None, None)


def test_a_transaction_the_server_aborted_is_never_committed(either: Either) -> None:
    """A statement fails and its error is caught inside the block: PostgreSQL
    aborts the transaction, and a COMMIT would silently roll it all back
    while the block exited normally. The block raises AbortedTransactionError
    instead, and an inner block's failure undoes that block alone. The other
    databases keep the transaction going, so the rows are committed there."""
    postgres = either.database == "postgresql"

    def fail_a_statement(session: Any) -> None:
        with pytest.raises(sa.exc.DBAPIError):
            session.execute(sa.text("SELECT * FROM sparc_no_such_table"))

    def aborted() -> Any:
        return pytest.raises(AbortedTransactionError) if postgres else contextlib.nullcontext()

    with either.block() as session:
        session.add(either.Item(name="outer"))
        with aborted(), either.block() as inner:
            inner.add(either.Item(name="inner"))
            inner.flush()
            fail_a_statement(inner)
        session.add(either.Item(name="after"))
    kept = ["after", "outer"] if postgres else ["after", "inner", "outer"]
    assert either.names() == kept
    with aborted(), either.block() as session:
        session.add(either.Item(name="lost" if postgres else "last"))
        session.flush()
        fail_a_statement(session)
    assert either.names() == (kept if postgres else sorted([*kept, "last"]))
    assert either.checked_out() == 0


# -- nested blocks: SAVEPOINTs ---------------------------------------------------------------


def test_a_failed_inner_block_undoes_only_its_own_work(either: Either) -> None:
    with either.block() as session:
        outer = either.Item(name="outer")
        session.add(outer)
        session.flush()
        with pytest.raises(Boom), either.block() as inner:
            # one session for the outer and the inner block
            assert either.unwrapped(inner) is either.unwrapped(session) is either.session
            inner.add(either.Item(name="inner"))
            inner.flush()
            raise Boom
        # the outer block carries on, its objects still attached and usable
        assert outer in session
        assert outer.name == "outer"
        session.add(either.Item(name="after"))
        with either.block():
            session.add(either.Item(name="nested-after"))
    assert either.names() == ["after", "nested-after", "outer"]
    assert either.checked_out() == 0


def test_a_released_savepoint_is_undone_when_the_outer_block_rolls_back(either: Either) -> None:
    """The savepoint first thing in the outer block: SQLite's drivers begin
    no transaction before a SAVEPOINT by themselves, so a RELEASE there would
    commit."""
    with pytest.raises(Boom), either.block():
        with either.block() as session:
            session.add(either.Item(name="inner"))
        raise Boom
    assert either.count() == 0
    with either.block(), either.block() as session:
        session.add(either.Item(name="kept"))
    assert either.names() == ["kept"]
    assert either.checked_out() == 0


def test_a_released_savepoint_after_only_reads_is_undone_by_the_outer_rollback(
    either: Either,
) -> None:
    """SQLite's drivers begin no transaction before a SAVEPOINT, so a RELEASE
    of the first savepoint would commit; the outer rollback must still undo it."""
    with pytest.raises(Boom), either.block() as session:
        session.scalars(sa.select(either.Item)).all()  # reads only
        with either.block():
            session.add(either.Item(name="inner"))
        raise Boom
    assert either.count() == 0


def test_three_levels(either: Either) -> None:
    with either.block() as session:
        session.add(either.Item(name="1"))
        with either.block():
            session.add(either.Item(name="2"))
            with pytest.raises(Boom), either.block():
                session.add(either.Item(name="3"))
                session.flush()
                raise Boom
            session.add(either.Item(name="2b"))
    assert either.names() == ["1", "2", "2b"]


def test_an_inner_flush_error_rolls_back_to_the_savepoint(either: Either) -> None:
    with either.block() as session:
        session.add(either.Counter(id=1))
    with either.block() as session:
        session.add(either.Item(name="outer"))
        with pytest.raises(sa.exc.IntegrityError), either.block():
            session.add(either.Counter(id=1))  # fails at RELEASE's flush
        session.add(either.Counter(id=2))
    assert either.names() == ["outer"]
    assert either.count(either.Counter) == 2


# -- savepoint=False: joining the outer transaction -------------------------------------


def test_a_failed_joined_block_dooms_the_outer_block(either: Either) -> None:
    with pytest.raises(DoomedTransactionError), either.block() as session:
        session.add(either.Item(name="outer"))
        try:
            with either.block(savepoint=False):
                session.add(either.Item(name="half"))
                session.flush()
                raise Boom
        except Boom:
            pass  # swallowed: the outer block must still not commit half of it
    assert either.count() == 0
    assert either.checked_out() == 0
    with either.block() as session:  # the doom does not outlive its transaction
        session.add(either.Item(name="next"))
    assert either.names() == ["next"]


def test_savepoint_false_joins_the_outer_transaction(either: Either) -> None:
    with either.block() as session:
        session.add(either.Item(name="outer"))
        with either.block(savepoint=False):
            session.add(either.Item(name="joined"))
    assert either.names() == ["joined", "outer"]

    statements: list[str] = []
    sa.event.listen(either.sync_engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    with either.block(), either.block(savepoint=False) as session:
        session.add(either.Item(name="x"))
    assert statements  # the listener sees the block's statements
    assert not any("SAVEPOINT" in s.upper() for s in statements)


def test_a_failed_joined_block_propagates_through_the_outer(either: Either) -> None:
    with pytest.raises(Boom), either.block() as session:
        session.add(either.Item(name="outer"))
        with either.block(savepoint=False):
            raise Boom
    assert either.count() == 0


@pytest.mark.parametrize("value", ["no", 0, 1, None, "False"])
def test_savepoint_takes_bools_only(either: Either, value: Any) -> None:
    # One check (sparc.sa.tx.stack.check_savepoint) for both managers, and
    # for read-only blocks too.
    match = r"'savepoint' must be True or False, got .* \("
    with pytest.raises(TypeError, match=match):
        either.block(savepoint=value)
    with pytest.raises(TypeError, match=match):
        either.block(savepoint=value, readonly=True)


def test_the_read_only_arguments_are_checked(either: Either) -> None:
    with pytest.raises(TypeError, match="'readonly' must be True or False"):
        either.block(readonly="yes")
    # The words name each manager's own call: "tx(readonly=True,
    # after=token)", "atx(readonly=True, after=token)".
    with pytest.raises(TypeError, match="'after' applies to read-only blocks"):
        either.block(after="pg:0/1")
    with pytest.raises(ValueError, match=r"commit token as tx\.commit_token gives it"):
        either.block(readonly=True, after="yesterday")
    assert either.tx.commit_token is None  # no replicas: no positions


# -- blocks ended out of order -------------------------------------------------------------


def test_blocks_ended_out_of_order_roll_back_and_say_so(either: Either) -> None:
    first, second = either.block(), either.block()
    session = first.__enter__()
    session.add(either.Item(name="first"))
    second.__enter__()  # nested in first's block: same thread or task
    session.add(either.Item(name="second"))
    session.flush()
    # One answer (sparc.sa.tx.stack.exit_out_of_order): the misplaced end
    # counts the blocks left open and rolls everything back; each of those
    # says it was rolled back when it ends.
    outer_says, inner_says = r"1 block.* still open.*rolled back", "rolled back, not committed"
    with pytest.raises(BlockOrderError, match=outer_says):
        first.__exit__(None, None, None)
    assert either.open_blocks() == 0
    with pytest.raises(BlockOrderError, match=inner_says):
        second.__exit__(None, None, None)
    assert either.open_blocks() == 0
    assert either.count() == 0

    with either.block() as session:  # the thread's or task's next block works normally
        session.add(either.Item(name="after"))
    assert either.names() == ["after"]
    assert either.checked_out() == 0


# -- isolation_level per block ----------------------------------------------------------------


@pytest.mark.parametrize("level", [1, "", "   ", b"SERIALIZABLE"])
def test_a_level_must_be_a_name(either: Either, level: Any) -> None:
    with pytest.raises(TypeError, match="'isolation_level' must be a level's name"):
        either.block(isolation_level=level)


def test_autocommit_is_refused_for_a_block(either: Either) -> None:
    with pytest.raises(ValueError, match="all or nothing"):
        either.block(isolation_level="autocommit")
    with pytest.raises(TypeError, match="read-only block chooses its own isolation"):
        either.block(readonly=True, isolation_level="SERIALIZABLE")


def test_a_level_the_database_lacks_names_the_valid_ones(either: Either) -> None:
    with (
        pytest.raises(sa.exc.ArgumentError, match="Valid isolation levels"),
        either.block(isolation_level="SNAPSHOT"),
    ):
        pass
    assert either.checked_out() == 0


def test_a_block_runs_at_its_level_and_the_next_at_the_engines(either: Either) -> None:
    with either.block() as session:
        default = level_in_force(either.database, session)
    level = OTHER_LEVEL[either.database]
    assert default != level
    for spelled in (level, level.lower().replace(" ", "_")):
        with either.block(isolation_level=spelled) as session:
            assert level_in_force(either.database, session) == level
        with either.block() as session:
            assert level_in_force(either.database, session) == default
    assert either.checked_out() == 0


def test_a_nested_block_names_only_its_outer_blocks_level(either: Either) -> None:
    level = OTHER_LEVEL[either.database]
    other = "SERIALIZABLE" if either.database.startswith("sqlite") else "READ COMMITTED"
    with either.block(isolation_level=level):
        with either.block(isolation_level=level) as session:
            session.add(either.Item(name="same level"))
        with pytest.raises(IsolationLevelError, match="outer block"):  # noqa: SIM117
            with either.block(isolation_level=other):
                pass
    assert either.count() == 1
    assert either.checked_out() == 0


def test_options_after_the_transaction_began_raise_instead_of_being_ignored(
    either: Either,
) -> None:
    level = OTHER_LEVEL[either.database]
    other = "SERIALIZABLE" if either.database.startswith("sqlite") else "READ COMMITTED"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no SAWarning either
        with pytest.raises(IsolationLevelError, match="tx\\(isolation_level="):  # noqa: SIM117
            with either.block() as session:
                session.add(either.Item(name="guarded"))
                session.flush()
                session.connection(execution_options={"isolation_level": level})
                session.add(either.Item(name="never"))
        assert either.count() == 0
        with either.block(isolation_level=level) as session:
            with pytest.raises(IsolationLevelError):
                session.connection(execution_options={"isolation_level": other})
            session.add(either.Item(name="still kept"))
    assert either.names() == ["still kept"]
    # The level in force already is no error.
    with either.block(isolation_level=level) as session:
        session.add(either.Item(name="kept"))
        session.flush()
        session.connection(execution_options={"isolation_level": level})
    assert either.names() == ["kept", "still kept"]
    assert either.checked_out() == 0


# -- read-only blocks -----------------------------------------------------------------------


def test_a_read_only_block_reads(either: Either) -> None:
    with either.block() as session:
        session.add(either.Item(name="a"))
    with either.block(readonly=True) as session:
        assert session.scalars(sa.select(either.Item.name)).all() == ["a"]
        assert either.unwrapped(session) is either.session
    read = either.run(lambda s: s.scalars(sa.select(either.Item.name)).all(), readonly=True)
    assert read == ["a"]


WRITES = {
    "orm": lambda session, t, Item: (session.add(Item(name="x")), session.flush()),
    "core": lambda session, t, Item: session.execute(sa.insert(Item).values(name="x")),
    "text-insert": lambda s, t, Item: s.execute(sa.text(f"INSERT INTO {t} (name) VALUES ('x')")),
    "text-delete": lambda s, t, Item: s.execute(sa.text(f"DELETE FROM {t}")),
    # below the ORM: the database itself refuses
    "connection-insert": lambda s, t, Item: s.connection().exec_driver_sql(
        f"INSERT INTO {t} (name) VALUES ('x')"
    ),
    "connection-delete": lambda s, t, Item: s.connection().exec_driver_sql(f"DELETE FROM {t}"),
}


@pytest.mark.parametrize("how", list(WRITES))
def test_a_write_in_a_read_only_block_fails_and_writes_nothing(either: Either, how: str) -> None:
    with either.block() as session:
        session.add(either.Item(name="a"))
    table = either.Item.__table__.name
    with (
        pytest.raises(ReadOnlyTransactionError, match="read-only block"),
        either.block(readonly=True) as session,
    ):
        WRITES[how](session, table, either.Item)
    assert either.names() == ["a"]
    # The connection is writable again for the next block.
    with either.block() as session:
        session.add(either.Item(name="after"))
    assert either.names() == ["a", "after"]


def test_a_read_only_run_that_writes_fails(either: Either) -> None:
    with pytest.raises(ReadOnlyTransactionError):
        either.run(lambda s: s.add(either.Item(name="x")), readonly=True)
    assert either.count() == 0


def test_a_read_only_block_inside_a_writing_block_sees_its_uncommitted_work(
    either: Either,
) -> None:
    with either.block() as session:
        session.add(either.Item(name="pending"))
        session.flush()
        with either.block(readonly=True) as inner:
            assert inner.scalars(sa.select(either.Item.name)).all() == ["pending"]
        with pytest.raises(ReadOnlyTransactionError), either.block(readonly=True) as inner:
            inner.add(either.Item(name="no"))
            inner.flush()
        with pytest.raises(ReadOnlyTransactionError), either.block(readonly=True) as inner:
            inner.execute(sa.delete(either.Item))
    assert either.names() == ["pending"]


def test_a_writing_block_inside_a_read_only_block_is_refused(either: Either) -> None:
    with either.block(readonly=True):
        inner = either.block()
        with pytest.raises(ReadOnlyTransactionError, match="writing block was opened inside"):
            inner.__enter__()
        with either.block(readonly=True) as session:  # read-only in read-only is fine
            assert session.scalars(sa.select(either.Item.name)).all() == []
    with either.block(readonly=True), pytest.raises(ReadOnlyTransactionError), either.block():
        pass  # an empty block counts as writing
    with either.block() as session:  # and nothing is left read-only afterwards
        session.add(either.Item(name="ok"))
    assert either.names() == ["ok"]
    assert either.checked_out() == 0
