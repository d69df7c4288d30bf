"""The asyncio transaction manager.

(ISAAsyncEngine, ISADeclarativeMeta) -> ISAAsyncScopedTransaction

::

    tx = getMultiAdapter((async_engine, Base), ISAAsyncScopedTransaction)
    async with tx() as session:
        session.add(obj)

Scopes
    The scope is the current asyncio task. Each task that opens a block gets
    its own ``AsyncSession`` for that block; two tasks never share one, even
    when their blocks interleave, and a child task started inside a block
    does not see its parent's block. ``tx.session`` is the current task's
    innermost open block's session, and an error outside any block.

Blocks
    ``async with tx():`` commits on success, and on any exception rolls back
    and re-raises it. A block opened inside another runs in a SAVEPOINT (on
    aiosqlite too), or joins the outer transaction with ``savepoint=False``.
    Sessions use ``expire_on_commit=False``, so the block's objects can be
    read after it without lazy loads (no ``MissingGreenlet``).

Cancellation
    A block's work is committed exactly when its ``async with`` exited
    normally. A task cancelled inside a block, or before the block's COMMIT
    is sent, rolls the block back and the ``CancelledError`` propagates.
    Cancelled while the COMMIT runs, the COMMIT is completed first; if it
    succeeded, ``async with`` exits normally and the cancellation is
    requested again (``uncancel()`` then ``cancel()`` on Python 3.11+,
    ``cancel()`` on 3.10), so it arrives at the task's next await. If the
    COMMIT failed (its connection was lost, say), its outcome is unknown:
    the COMMIT's own error propagates, neither success nor a
    ``CancelledError``, and the cancellation again arrives at the next await.
    An inner block that exits normally releases its SAVEPOINT even while
    the task is being cancelled (code in it caught the ``CancelledError``).
    The work that ends a block (COMMIT, ROLLBACK, closing the session) runs
    in a task of its own that a cancellation cannot interrupt, so a cancelled
    task never leaves a connection checked out or half-reset. A task that
    ends with a block still open gives its connection back at once.

Generators
    An async generator that yields inside its block keeps the block open
    while suspended; a block that the same task opens meanwhile raises
    :class:`~sparc.sa.exceptions.SuspendedBlockError` at entry (see
    :mod:`sparc.sa.tx.suspended`).

Event loops
    An ``AsyncEngine``'s connections belong to the event loop that opened
    them. A block on a second, still running loop raises
    :class:`~sparc.sa.exceptions.ForeignEventLoopError` instead of hanging;
    after the first loop is closed, the next loop takes the engine over: a
    block the closed loop left open has its connection cut (the server rolls
    it back and drops its locks), and the other connections are discarded.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import weakref
from collections.abc import Callable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from zope.component import adapter
from zope.interface import implementer

from sparc.sa.connections import resets
from sparc.sa.exceptions import (
    CrossScopeSessionError,
)
from sparc.sa.interfaces import (
    ISAAsyncEngine,
    ISAAsyncScopedTransaction,
    ISADeclarativeMeta,
)
from sparc.sa.replicas.areadonly import async_readonly_block
from sparc.sa.replicas.errors import read_elsewhere
from sparc.sa.replicas.tokens import commit_token, prepare
from sparc.sa.tx import sessions, sqlitebegin
from sparc.sa.tx.aborted import checks_aborted
from sparc.sa.tx.asyncblock import DONE, AsyncBlock, AsyncScope
from sparc.sa.tx.cache import check_base, shared
from sparc.sa.tx.retry import check_attempts, delay_before_next
from sparc.sa.tx.sessions import check_isolation
from sparc.sa.tx.shielded import end_session, finish, run_detached
from sparc.sa.tx.stack import check_savepoint

__all__ = ["AsyncScopedTransaction", "async_scoped_transaction"]

logger = logging.getLogger(__name__)


@implementer(ISAAsyncScopedTransaction)
@adapter(ISAAsyncEngine, ISADeclarativeMeta)
class AsyncScopedTransaction:
    """Commit-or-roll-back ``async with`` blocks, one session per task.

    ``session_options`` go to :class:`~sqlalchemy.ext.asyncio.async_sessionmaker`;
    ``expire_on_commit`` is False unless given.
    """

    #: First backoff of :meth:`run`, in seconds; doubled after each attempt.
    retry_delay: float = 0.02
    #: Upper bound of one backoff of :meth:`run`, in seconds.
    retry_max_delay: float = 1.0

    # Called by a block as it opens (sparc.sa.tx.asyncblock, which imports no feature).
    prepare = staticmethod(prepare)

    def __init__(self, engine: AsyncEngine, base: type[Any], **session_options: Any) -> None:
        if not isinstance(engine, AsyncEngine):
            raise TypeError(
                f"expected an AsyncEngine (a DSN with an asyncio driver, such as "
                f"postgresql+asyncpg://), got {engine!r}; for a synchronous engine "
                "use ScopedTransaction"
            )
        check_base(base)
        self._engine = engine
        self._Base = base
        session_options.setdefault("expire_on_commit", False)
        if engine.dialect.driver == "aiosqlite":
            session_options.setdefault("sync_session_class", sqlitebegin.AioSqliteSession)
            sqlitebegin.watch(engine)
        # No pool reset ROLLBACK after a COMMIT or ROLLBACK of these sessions,
        # and on PostgreSQL a checkout's ping is the BEGIN (an application's
        # own sync_session_class is left as it is).
        session_options.setdefault("sync_session_class", sessions.BlockSession)
        resets.install(engine.sync_engine)
        self.session_factory = async_sessionmaker(engine, **session_options)
        # What the block state machine (sparc.sa.tx.stack) asks of a manager.
        self.checks_aborted = checks_aborted(engine.sync_engine)
        self.sqlite_begin = False
        self.readonly_sessions: dict[Any, Any] = {}  # by target (sparc.sa.replicas.areadonly)
        self.scopes: weakref.WeakKeyDictionary[asyncio.Task[Any], AsyncScope] = (
            weakref.WeakKeyDictionary()
        )
        self.watched: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()

    def __repr__(self) -> str:
        return f"<AsyncScopedTransaction {self._engine!r} {self._Base.__name__}>"

    @property
    def Base(self) -> type[Any]:
        return self._Base

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    @property
    def session(self) -> AsyncSession:
        """The current task's session: the one of its innermost open block."""
        task = asyncio.current_task()
        scope = self.scopes.get(task) if task is not None else None
        if scope is None or not scope.blocks:
            raise CrossScopeSessionError(
                "no block of this transaction manager is open in the current task "
                "(a task started inside another task's block has none of its own): "
                "use `async with tx() as session:`"
            )
        return scope.asession

    @property
    def commit_token(self) -> str | None:
        """The WAL position of this task's latest commit on an engine with
        replicas, as a string for ``atx(readonly=True, after=token)`` (or the
        threaded manager's ``tx``) in another task, request or process; None
        when this task wrote nothing."""
        return commit_token(self._engine)

    def __call__(
        self,
        savepoint: bool = True,
        *,
        readonly: bool = False,
        after: str | None = None,
        isolation_level: str | None = None,
        transaction_manager: Any = None,
    ) -> Any:
        """An ``async with`` block; ``readonly=True`` (and *after*, a commit
        token) as for the threaded manager (:mod:`sparc.sa.replicas.areadonly`);
        *isolation_level* as for the threaded manager's blocks.

        *transaction_manager* is refused with the reason: the ``transaction``
        package commits synchronously, calling its data managers without
        awaiting them, so an asyncio block cannot join its transaction."""
        if transaction_manager is not None:
            _refuse_joining(transaction_manager)
        check_savepoint(savepoint)
        isolation = check_isolation(isolation_level)
        if isolation is not None:
            if readonly or after is not None:
                raise TypeError(
                    "a read-only block chooses its own isolation (a snapshot on the "
                    "replica or READ ONLY on the primary); give isolation_level to "
                    "writing blocks only"
                )
            return AsyncBlock(self, savepoint, isolation=isolation)
        if readonly or after is not None:
            return async_readonly_block(self, readonly, after)
        return AsyncBlock(self, savepoint)

    def __enter__(self) -> None:
        raise TypeError("an AsyncScopedTransaction is used with `async with tx():`, not `with`")

    def __exit__(self, *exc: object) -> None:  # pragma: no cover - __enter__ raises
        return None

    async def run(
        self,
        fn: Callable[..., Any],
        *args: Any,
        attempts: int = 3,
        readonly: bool = False,
        after: str | None = None,
        isolation_level: str | None = None,
        transaction_manager: Any = None,
        **kwargs: Any,
    ) -> Any:
        """Await ``fn(session, *args, **kwargs)`` in a block and return its result.

        With ``readonly=True``, a read-only block; a read whose replica dies
        runs once more elsewhere.

        Serialization failures and deadlocks (the codes of
        :func:`sparc.sa.orm.is_retryable`, asyncpg's ``sqlstate`` included)
        rerun the whole block in a fresh transaction after a jittered
        backoff, at most ``attempts`` times in all. Inside an open block of the
        same task, ``fn`` runs once, in a SAVEPOINT.
        """
        check_attempts(attempts)
        if transaction_manager is not None:
            _refuse_joining(transaction_manager)
        if readonly or after:
            open_block = lambda: self(readonly=readonly, after=after)  # noqa: E731
        else:
            open_block = lambda: self(isolation_level=isolation_level)  # noqa: E731
        task = asyncio.current_task()
        scope = self.scopes.get(task) if task is not None else None
        if scope is not None and scope.blocks:
            attempts = 1  # only the owner of the outer transaction can restart it
        elsewhere = read_elsewhere if readonly else None
        return await _run_in_blocks(self, open_block, fn, args, kwargs, attempts, elsewhere)

    async def end_scope(
        self,
        scope: AsyncScope,
        commit: bool,
        discard: bool = False,
        cause: BaseException | None = None,
    ) -> None:
        """COMMIT or ROLLBACK (or, with ``discard``, invalidate the connection,
        which the server rolls back), then close the session and open the
        gate: all of it to the end, whatever cancellation arrives meanwhile."""
        if self.scopes.get(scope.task) is scope:
            del self.scopes[scope.task]
        home, scope.home = scope.home, None
        if home is not None:
            home.open.discard(scope)
        session = scope.asession
        gate, scope.gate = scope.gate, None
        await finish(
            end_session(session, commit, discard, gate, self.checks_aborted, cause),
            settled=commit,
        )

    def task_done(self, task: asyncio.Task[Any]) -> None:
        """A task ended: roll back and close a block it left open."""
        scope = self.scopes.pop(task, None)
        if scope is None:
            return
        scope.broken = True
        for ref in scope.blocks:
            block = ref()
            if block is not None:
                block._state = DONE
        scope.blocks.clear()
        logger.warning("sparc.sa: a task ended inside a block; its transaction was rolled back")
        run_detached(self.end_scope(scope, commit=False))


async def _run_in_blocks(
    manager: AsyncScopedTransaction,
    open_block: Callable[[], Any],
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    attempts: int,
    elsewhere: Callable[[Any, BaseException], bool] | None,
) -> Any:
    """:func:`sparc.sa.tx.retry.run_in_blocks` with ``await``: the same
    policy, and the same one move to another server (*elsewhere*)."""
    attempt = 1
    while True:
        block = open_block()
        try:
            async with block as session:
                result = fn(session, *args, **kwargs)
                if inspect.isawaitable(result):
                    result = await result
                return result
        except Exception as exc:
            if elsewhere is not None and elsewhere(block, exc):
                elsewhere = None  # once
                continue
            delay = delay_before_next(
                exc, attempt, attempts, manager.retry_delay, manager.retry_max_delay
            )
            await asyncio.sleep(delay)
            attempt += 1


def _refuse_joining(tm: object) -> None:
    raise TypeError(
        f"transaction_manager={tm!r}: an asyncio block cannot join a transaction of "
        "the `transaction` package, which commits synchronously and calls its data "
        "managers without awaiting them (the COMMIT would run outside the event "
        "loop's greenlet). Use the threaded manager (ISAScopedTransaction on a "
        "synchronous engine) for joined work, or let the asyncio block commit itself"
    )


_CACHE_ATTR = "_sparc_sa_async_managers"


def async_scoped_transaction(engine: AsyncEngine, base: type[Any]) -> AsyncScopedTransaction:
    """The adapter factory: the one shared manager for ``engine`` and ``base``
    (see :mod:`sparc.sa.tx.cache`)."""
    return shared(
        engine.sync_engine.__dict__,
        _CACHE_ATTR,
        base,
        lambda: AsyncScopedTransaction(engine, base),
    )


implementer(ISAAsyncScopedTransaction)(async_scoped_transaction)
adapter(ISAAsyncEngine, ISADeclarativeMeta)(async_scoped_transaction)
