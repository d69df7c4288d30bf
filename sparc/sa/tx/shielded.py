"""asyncio work that runs to its end whatever cancellation arrives, and the
end of a block's session, which is such work.

A cancellation that interrupts a driver half-way through its protocol
leaves the connection in an unknown state, and one that interrupts a COMMIT
leaves the caller not knowing whether it happened. So a block takes its
connection, and ends (COMMIT or ROLLBACK, then close), in a task of its own
(:func:`finish`): a cancellation of the caller waits for that task, and then
either reaches the caller as usual or, once a COMMIT has settled the
block's outcome, at the caller's next ``await``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from sqlalchemy.util import greenlet_spawn

from sparc.sa.exceptions import AbortedTransactionError
from sparc.sa.tx.aborted import aborted
from sparc.sa.tx.sessions import log_failed_rollback, rollback
from sparc.sa.tx.stack import ABORTED
from sparc.sa.tx.stack import commit as commit_block

__all__ = ["end_session", "finish", "quietly", "run_detached"]

logger = logging.getLogger("sparc.sa.shielded")  # its name before the move
_T = TypeVar("_T")

# Tasks that finish blocks, for tasks that ended or were cancelled among
# others: held here so that they are not garbage collected before they are done.
_finishers: set[asyncio.Task[Any]] = set()


def run_detached(work: Coroutine[Any, Any, Any]) -> None:
    """Run *work* in a task nobody awaits, held until it is done."""
    task = asyncio.ensure_future(work)
    _finishers.add(task)
    task.add_done_callback(_finishers.discard)


async def finish(work: Coroutine[Any, Any, _T], settled: bool = False) -> _T:
    """Await ``work`` to its end, even when the calling task is cancelled.

    ``work`` runs in a task of its own. If the caller is cancelled meanwhile,
    the wait goes on until ``work`` is done. Then, by default, the
    cancellation is raised, so it still reaches the caller. With ``settled``
    (``work`` is a COMMIT whose outcome the caller must learn), ``work``'s
    own outcome is returned or raised instead, and the cancellation is
    requested again, so that it reaches the caller at its next await.

    The caller waits on a bare future that the task's end resolves, rather
    than on ``asyncio.shield()``, which builds the same thing with more
    bookkeeping: this runs twice for every block.
    """
    loop = asyncio.get_running_loop()
    task: asyncio.Task[_T] = loop.create_task(work)
    _finishers.add(task)
    task.add_done_callback(_finishers.discard)
    cancelled: asyncio.CancelledError | None = None
    while not task.done():
        waiter = loop.create_future()
        task.add_done_callback(_Wake(waiter))
        try:
            await waiter
        except asyncio.CancelledError as exc:
            cancelled = exc  # even if work is done by now: never lose it
    if task.cancelled():
        # Only a loop shutting down cancels our tasks: the caller stops too.
        if cancelled is not None:
            raise cancelled
        task.result()  # raises the task's CancelledError
    error = task.exception()
    if cancelled is not None:
        if not settled:
            # the cancellation wins, with work's error attached
            if error is None:
                raise asyncio.CancelledError(*cancelled.args)
            raise asyncio.CancelledError(*cancelled.args) from error
        _cancel_later(cancelled)
    if error is not None:
        raise error
    return task.result()


class _Wake:
    """A task's done callback that resolves a waiter, unless it is already
    done (cancelled: its caller was cancelled and waits on a new one)."""

    __slots__ = ("waiter",)

    def __init__(self, waiter: asyncio.Future[None]) -> None:
        self.waiter = waiter

    def __call__(self, task: asyncio.Task[Any]) -> None:
        if not self.waiter.done():
            self.waiter.set_result(None)


def _cancel_later(cancelled: asyncio.CancelledError) -> None:
    """Request the cancellation that interrupted a wait again, so that it is
    delivered at the current task's next await instead of being lost. On
    Python 3.11+ the request it made is withdrawn first (``uncancel``), so
    ``cancelling()`` counts it once, as ``asyncio.timeout()`` expects."""
    task = asyncio.current_task()
    if task is None:  # pragma: no cover - finish() runs in a task
        return
    uncancel = getattr(task, "uncancel", None)  # Python 3.11+
    if uncancel is not None and task.cancelling():
        uncancel()
    task.cancel(*cancelled.args[:1])


async def quietly(work: Awaitable[Any]) -> None:
    """Await cleanup work; log its failure instead of raising it."""
    try:
        await work
    except Exception:
        logger.warning("sparc.sa: cleanup failed", exc_info=True)


# -- the end of a block's session ---------------------------------------------------


async def end_session(
    session: AsyncSession,
    commit: bool,
    discard: bool,
    gate: asyncio.Lock | None,
    checks_aborted: bool = False,
    cause: BaseException | None = None,
) -> None:
    """COMMIT or ROLLBACK (or, with *discard*, invalidate the connection,
    which the server rolls back), then close *session* and release *gate*.
    Run it through :func:`finish`: all of it to the end."""
    closed = False
    try:
        if discard:
            await quietly(session.invalidate())
        elif _plain_ends(session):
            # The end and the close in one pass through the greenlet: a
            # switch less per block than awaiting each in turn.
            if commit:
                await session.run_sync(_commit_and_close, checks_aborted)
            else:
                await session.run_sync(_rollback_and_close, cause)
            closed = True
        elif commit:  # an AsyncSession class of the application's: its methods run
            try:
                if checks_aborted and await greenlet_spawn(aborted, session.sync_session):
                    raise AbortedTransactionError(ABORTED)
                await session.commit()
            except BaseException as error:
                await _own_rollback(session, error)
                raise
        else:
            await _own_rollback(session, cause)
    finally:
        if not closed:
            await quietly(session.close())
        if gate is not None:
            gate.release()


async def _own_rollback(session: AsyncSession, cause: BaseException | None) -> None:
    """The application's AsyncSession.rollback(), its failure logged as
    :func:`sparc.sa.tx.sessions.rollback` logs it, never raised."""
    try:
        await session.rollback()
    except Exception:
        log_failed_rollback(cause)


def _plain_ends(session: AsyncSession) -> bool:
    """Whether *session*'s COMMIT, ROLLBACK and close are AsyncSession's own,
    so that running the sync session's in one greenlet skips nothing."""
    cls = type(session)
    return (
        cls.commit is AsyncSession.commit
        and cls.rollback is AsyncSession.rollback
        and cls.close is AsyncSession.close
    )


def _commit_and_close(session: Session, checks_aborted: bool) -> None:
    """COMMIT (rolled back if it fails, or if the server aborted the
    transaction), then close: a block's normal end, run in one greenlet."""
    try:
        commit_block(session, checks_aborted)
    except BaseException as error:
        rollback(session, error)
        raise
    finally:
        try:
            session.close()
        except Exception:
            logger.warning("sparc.sa: closing a session failed", exc_info=True)


def _rollback_and_close(session: Session, cause: BaseException | None) -> None:
    """ROLLBACK, then close; a failure of either is logged, not raised, so
    that *cause*, the error that ended the block, is the one that propagates
    (the threaded block's words: sparc.sa.tx.sessions.rollback)."""
    try:
        rollback(session, cause)
    finally:
        try:
            session.close()
        except Exception:
            logger.warning("sparc.sa: closing a session failed", exc_info=True)
