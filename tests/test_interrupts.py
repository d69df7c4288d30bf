"""Interrupts reach the caller as themselves, at every statement of a nested block.

A KeyboardInterrupt or SystemExit raised while any statement of a block runs
(as the driver sends it, or as it returns), nested blocks' SAVEPOINT and
RELEASE SAVEPOINT included, reaches the caller as itself: never as the
PendingRollbackError of a connection SQLAlchemy invalidated on the way. The
database then holds nothing of the interrupted block, the pool has nothing
checked out, and the next block works. An asyncio cancellation at every await
of a nested block is the same: the task is cancelled, and the rows are those
of the blocks that exited normally.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from sparc.sa.exceptions import DoomedTransactionError

from .conftest import checked_out, names
from .test_async import ASYNC_BACKENDS, async_database, ids
from .test_async import checked_out as async_checked_out
from .test_outcomes import _cancel_at


class Interrupter:
    """Raises ``error`` at the ``at``-th statement (counted from 1) sent while
    armed, before the driver sends it or after it returned."""

    def __init__(self, engine: Engine) -> None:
        self.error: type[BaseException] = KeyboardInterrupt
        self.at = 0
        self.when = "after"
        self.sent: list[str] = []
        self.armed = False
        self.fired: str | None = None
        sa.event.listen(engine, "before_cursor_execute", self.before)
        sa.event.listen(engine, "after_cursor_execute", self.after)

    def arm(self, error: type[BaseException], at: int, when: str) -> None:
        self.error, self.at, self.when = error, at, when
        self.sent, self.fired, self.armed = [], None, True

    def _maybe(self, statement: str, when: str) -> None:
        if self.armed and when == self.when and len(self.sent) == self.at:
            self.armed = False
            self.fired = statement
            raise self.error

    def before(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if self.armed:
            self.sent.append(statement)
        self._maybe(statement, "before")

    def after(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self._maybe(statement, "after")


def plain(ctx: SimpleNamespace, name: str) -> None:
    tx, Item = ctx.transaction, ctx.models.Item
    with tx():
        tx.session.add(Item(name=f"{name}-outer"))
        tx.session.flush()
        with tx():
            tx.session.add(Item(name=f"{name}-inner"))
            tx.session.flush()


def readonly(ctx: SimpleNamespace, name: str) -> None:
    tx, Item = ctx.transaction, ctx.models.Item
    with tx():
        tx.session.add(Item(name=f"{name}-outer"))
        tx.session.flush()
        with tx(readonly=True) as session:
            session.execute(sa.select(Item.name)).all()
        with tx():
            tx.session.add(Item(name=f"{name}-inner"))


def joined(ctx: SimpleNamespace, name: str) -> None:
    """Both blocks join the ``transaction`` package's transaction; the
    interrupt escapes them, and the caller (as a publisher) aborts it."""
    tm = ctx.tm
    tx, Item = ctx.joined, ctx.models.Item
    with tx():
        tx.session.add(Item(name=f"{name}-outer"))
        tx.session.flush()
        with tx():
            tx.session.add(Item(name=f"{name}-inner"))
            tx.session.flush()
    ctx.interrupter.armed = False  # the COMMIT of the request: not a block's
    tm.commit()


SCENARIOS: dict[str, Callable[[SimpleNamespace, str], None]] = {
    "plain": plain,
    "readonly": readonly,
    "joined": joined,
}


@pytest.fixture
def ctx(
    engine: Engine, models: SimpleNamespace, transaction: Any, request: pytest.FixtureRequest
) -> Iterator[SimpleNamespace]:
    tm = pytest.importorskip("transaction").manager
    tm.explicit = True
    from sparc.sa.orm import scoped_transaction

    found = SimpleNamespace(
        engine=engine,
        models=models,
        transaction=transaction,
        joined=scoped_transaction(engine, models.Base),
        tm=tm,
        interrupter=Interrupter(engine),
    )
    try:
        yield found
    finally:
        if tm.manager._txn is not None:
            tm.abort()
        tm.explicit = False


def run(ctx: SimpleNamespace, scenario: str, name: str) -> None:
    if scenario == "joined":
        ctx.tm.begin()
        try:
            SCENARIOS[scenario](ctx, name)
        except BaseException:
            ctx.tm.abort()
            raise
    else:
        SCENARIOS[scenario](ctx, name)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("error", [KeyboardInterrupt, SystemExit])
def test_an_interrupt_at_every_statement_of_a_nested_block_reaches_the_caller_as_itself(
    ctx: SimpleNamespace, scenario: str, error: type[BaseException]
) -> None:
    interrupter = ctx.interrupter
    interrupter.arm(error, 0, "never")
    run(ctx, scenario, "dry")
    statements = list(interrupter.sent)
    assert any("RELEASE SAVEPOINT" in s.upper() for s in statements), statements
    kept = ["dry-inner", "dry-outer"]
    assert names(ctx.engine, ctx.models.Item) == kept
    for at in range(1, len(statements) + 1):
        for when in ("before", "after"):
            label = f"{when} {statements[at - 1].split()[0]} #{at}"
            interrupter.arm(error, at, when)
            with pytest.raises(BaseException) as raised:
                run(ctx, scenario, f"lost-{at}-{when}")
            assert interrupter.fired is not None, label
            # the interrupt itself, not an error raised while handling it
            assert type(raised.value) is error, (label, repr(raised.value))
            assert checked_out(ctx.engine) == 0, label
            assert names(ctx.engine, ctx.models.Item) == kept, label  # nothing of it
            run(ctx, scenario, f"next-{at}-{when}")  # the next block works
            kept = sorted([*kept, f"next-{at}-{when}-inner", f"next-{at}-{when}-outer"])
            assert names(ctx.engine, ctx.models.Item) == kept, label


# -- asyncio: a cancellation at every await ------------------------------------------------


@pytest.fixture(params=ASYNC_BACKENDS)
def db(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[SimpleNamespace]:
    yield from async_database(request.param, tmp_path)


def test_a_cancellation_at_every_await_of_a_nested_block_reaches_the_task(
    db: SimpleNamespace,
) -> None:
    """Cancel the task at its 1st, 2nd, ... await, RELEASE SAVEPOINT's
    included: the task is cancelled (not failed with another error), and the
    rows are exactly those of the outer blocks that exited normally."""
    outcome: dict[int, str] = {}

    async def victim(n: int) -> None:
        try:
            async with db.tx() as session:
                session.add(db.Item(id=2 * n))
                await session.flush()
                async with db.tx() as inner:
                    inner.add(db.Item(id=2 * n + 1))
                    await inner.flush()
        except asyncio.CancelledError:
            outcome[n] = "raised"
            raise
        outcome[n] = "exited"
        await asyncio.sleep(0)  # a cancellation during COMMIT arrives here
        outcome[n] = "finished"

    async def main() -> tuple[list[int], list[int]]:
        fired = []
        for n in range(1, 200):
            seen: list[int] = []
            task = asyncio.ensure_future(_cancel_at(victim(n), n, seen))
            with contextlib.suppress(asyncio.CancelledError):
                await task  # any other error fails the test
            if max(seen) < n:
                assert outcome[n] == "finished"
                break
            fired.append(n)
            assert task.cancelled(), (n, outcome[n])
            assert async_checked_out(db.engine) == 0, n
        else:
            raise AssertionError("the block never ran out of awaits")
        return await ids(db), fired

    found, fired = db.run(main)
    assert len(fired) >= 5
    exited = [n for n, seen in sorted(outcome.items()) if seen in ("exited", "finished")]
    assert found == sorted([2 * n for n in exited] + [2 * n + 1 for n in exited])


@pytest.mark.parametrize("inner", ["plain", "readonly"])
def test_a_cancellation_raised_at_every_statement_of_a_nested_block_reaches_the_task(
    db: SimpleNamespace, inner: str
) -> None:
    """A CancelledError raised inside the driver call of each statement
    (before it is sent, or as it returns), RELEASE SAVEPOINT included, reaches
    the caller as itself; nothing of the block is kept; the next block works."""
    interrupter = Interrupter(db.engine.sync_engine)

    async def scenario(n: int) -> None:
        async with db.tx() as session:
            session.add(db.Item(id=2 * n))
            await session.flush()
            if inner == "readonly":
                async with db.tx(readonly=True) as inside:
                    await inside.execute(sa.select(db.Item.id))
                async with db.tx() as inside:
                    inside.add(db.Item(id=2 * n + 1))
            else:
                async with db.tx() as inside:
                    inside.add(db.Item(id=2 * n + 1))
                    await inside.flush()

    async def main() -> list[int]:
        interrupter.arm(asyncio.CancelledError, 0, "never")
        await scenario(0)
        statements = list(interrupter.sent)
        assert any("RELEASE SAVEPOINT" in s.upper() for s in statements), statements
        kept = [0, 1]
        n = 0
        for at in range(1, len(statements) + 1):
            for when in ("before", "after"):
                n += 1
                label = f"{when} {statements[at - 1].split()[0]} #{at}"
                interrupter.arm(asyncio.CancelledError, at, when)
                caught: BaseException | None = None
                try:
                    await scenario(1000 + n)
                except BaseException as exc:  # what reached the caller
                    caught = exc
                assert interrupter.fired is not None, label
                assert type(caught) is asyncio.CancelledError, (label, repr(caught))
                assert async_checked_out(db.engine) == 0, label
                assert await ids(db) == kept, label
                await scenario(n)
                kept = sorted([*kept, 2 * n, 2 * n + 1])
        return await ids(db)

    assert len(db.run(main)) > 2


def test_an_interrupt_caught_after_release_savepoint_commits_nothing_of_the_block(
    ctx: SimpleNamespace,
) -> None:
    """Code that catches the interrupt (raised as RELEASE SAVEPOINT returned,
    so the server has released it) and lets the outer block end normally
    commits nothing: the caller saw the inner block fail, so the outer block
    is doomed (where the connection survived, as on in-memory SQLite) or its
    connection is gone."""
    tx, Item, interrupter = ctx.transaction, ctx.models.Item, ctx.interrupter
    interrupter.arm(KeyboardInterrupt, 0, "never")
    with tx():
        tx.session.add(Item(name="outer"))
        tx.session.flush()
        with tx():
            tx.session.add(Item(name="inner"))
    at = next(i for i, s in enumerate(interrupter.sent, 1) if s.upper().startswith("RELEASE"))
    with ctx.engine.begin() as conn:
        conn.execute(sa.delete(Item.__table__))
    caught = []
    interrupter.arm(KeyboardInterrupt, at, "after")
    # the error's type depends on the backend: checked below where it is known
    with pytest.raises(Exception) as raised, tx():
        tx.session.add(Item(name="outer"))
        tx.session.flush()
        try:
            with tx():
                tx.session.add(Item(name="inner"))
        except KeyboardInterrupt as exc:
            caught.append(exc)
    assert caught and interrupter.fired is not None
    if ctx.engine.url.database in (None, "", ":memory:"):
        assert isinstance(raised.value, DoomedTransactionError), repr(raised.value)
    assert names(ctx.engine, Item) == []
    assert checked_out(ctx.engine) == 0
