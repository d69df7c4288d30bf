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
import socket
import sys
import weakref
from collections.abc import Callable
from contextvars import ContextVar
from types import FrameType, TracebackType
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.pool import SingletonThreadPool, StaticPool
from zope.component import adapter
from zope.interface import implementer

from sparc.sa.connections import resets
from sparc.sa.connections.keep import keep_shared_connection
from sparc.sa.exceptions import (
    BlockOrderError,
    CrossScopeSessionError,
    DoomedTransactionError,
    ForeignEventLoopError,
    InterleavedTransactionError,
    IsolationLevelError,
    ReadOnlyTransactionError,
)
from sparc.sa.interfaces import (
    ISAAsyncEngine,
    ISAAsyncScopedTransaction,
    ISADeclarativeMeta,
)
from sparc.sa.replicas import READONLY, commit_token, is_disconnect, prepare
from sparc.sa.tx import sessions, sqlitebegin
from sparc.sa.tx.cache import check_base, shared
from sparc.sa.tx.retry import check_attempts, delay_before_next
from sparc.sa.tx.sessions import check_isolation
from sparc.sa.tx.shielded import cancel_pending, end_session, finish, quietly, run_detached
from sparc.sa.tx.suspended import GENERATOR, check_owner, owner_of_block

__all__ = ["AsyncScopedTransaction", "async_scoped_transaction"]

logger = logging.getLogger(__name__)


class _EngineState:
    """The event loop an engine's connections belong to, and its gate."""

    __slots__ = ("gate", "loop", "open")

    def __init__(self, loop: asyncio.AbstractEventLoop, shared: bool) -> None:
        self.loop = weakref.ref(loop)
        # One connection for every task (StaticPool): blocks take turns.
        self.gate = asyncio.Lock() if shared else None
        # The open outermost blocks' scopes: if the loop closes while one is
        # open, the next loop severs its connection (see _engine_state).
        self.open: set[_Scope] = set()


_engine_states: weakref.WeakKeyDictionary[Any, _EngineState] = weakref.WeakKeyDictionary()


async def _engine_state(engine: AsyncEngine) -> _EngineState:
    loop = asyncio.get_running_loop()
    sync_engine = engine.sync_engine
    state = _engine_states.get(sync_engine)
    if state is not None:
        owner = state.loop()
        if owner is loop:
            return state
        if owner is not None and not owner.is_closed():
            raise ForeignEventLoopError(
                f"{engine!r} belongs to another, still open event loop: an AsyncEngine's "
                "connections serve the loop that opened them. Build one engine per event "
                "loop, or dispose of the engine on its loop first"
            )
        # Its loop is gone, and its connections with it. A block still open
        # there would keep its transaction and locks (the connection is idle
        # in transaction, and nothing on that loop will ever end it): cut its
        # connection, which the server rolls back. Then discard the rest
        # unclosed.
        for scope in list(state.open):
            _abandon_with_loop(scope)
        state.open.clear()
        await engine.dispose(close=False)
    shared = isinstance(sync_engine.pool, (StaticPool, SingletonThreadPool))
    keep_shared_connection(sync_engine)  # shared pools, and aiosqlite on any pool
    state = _engine_states[sync_engine] = _EngineState(loop, shared)
    return state


def _abandon_with_loop(scope: _Scope) -> None:
    """End a block whose event loop closed while it was open: without that
    loop nothing can be awaited, so its connection's socket is shut down,
    which makes the server roll the transaction back and drop its locks."""
    scope.broken = True
    for block in scope.blocks:
        block._state = _DONE
    manager = scope.manager
    if manager._scopes.get(scope.task) is scope:
        del manager._scopes[scope.task]
    logger.warning(
        "sparc.sa: a block was still open when its event loop closed; its "
        "connection was cut, so the server rolls its transaction back"
    )
    connection = scope.connection
    try:
        _shut_down(connection.sync_connection.connection.driver_connection)
    except Exception:
        logger.warning("sparc.sa: cutting an abandoned connection failed", exc_info=True)
    try:
        # SQLAlchemy's side: the connection leaves the pool's books for good,
        # instead of being found later by the garbage collector.
        connection.sync_connection.invalidate()
    except Exception:
        logger.debug("sparc.sa: invalidating an abandoned connection failed", exc_info=True)


def _shut_down(driver: Any) -> None:
    """Close a driver connection's socket without its (closed) event loop."""
    pgconn = getattr(driver, "pgconn", None)  # psycopg: libpq closes it itself
    if pgconn is not None:
        pgconn.finish()
        return
    transport = getattr(driver, "_transport", None)  # asyncpg
    if transport is None:  # asyncmy, aiomysql
        transport = getattr(getattr(driver, "_writer", None), "transport", None)
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.shutdown(socket.SHUT_RDWR)  # the server sees the end at once
    try:
        transport.abort()
    except RuntimeError:
        # abort() schedules the rest on the transport's loop, which is closed:
        # finish it here (close the socket, tell the driver's protocol).
        transport._call_connection_lost(None)
    # aiosqlite: its thread holds the connection; a file database's lock is
    # released when the connection is collected.


_NEW, _OPEN, _DONE = "new", "open", "done"


class _Scope:
    """The open blocks of one task for one manager, innermost last."""

    __slots__ = (
        "blocks",
        "broken",
        "connection",
        "doomed",
        "gate",
        "home",
        "manager",
        "owner",
        "session",
        "task",
    )

    def __init__(
        self, task: asyncio.Task[Any], session: AsyncSession, manager: AsyncScopedTransaction
    ) -> None:
        self.task = task
        self.session = session
        self.manager = manager
        self.connection: Any = None  # the AsyncConnection the block took
        self.home: _EngineState | None = None  # set while the block is open
        self.blocks: list[_AsyncBlock] = []
        self.doomed = False
        self.broken = False  # blocks ended out of order
        self.gate: asyncio.Lock | None = None
        # The async generator whose frame opened the outermost block, if
        # iteration drives it (see sparc.sa.tx.suspended).
        self.owner: FrameType | None = None


# The scope of the outermost block the current context is inside of; a child
# task inherits it, which is how it knows it was started inside a block.
_inside: ContextVar[_Scope | None] = ContextVar("sparc_sa_async_block", default=None)


class _AsyncBlock:
    """One ``async with tx():`` block."""

    __slots__ = (
        "_factory",
        "_isolation",
        "_manager",
        "_nested",
        "_readonly",
        "_savepoint",
        "_scope",
        "_state",
    )

    def __init__(
        self,
        manager: AsyncScopedTransaction,
        savepoint: bool,
        readonly: bool = False,
        factory: Any = None,
        isolation: str | None = None,
    ) -> None:
        self._manager = manager
        self._isolation = isolation  # normalised by sessions.check_isolation
        self._savepoint = savepoint
        self._readonly = readonly  # see sparc.sa.replicas.areadonly
        self._factory = factory  # the read-only block's sessions, if not the manager's
        self._scope: _Scope | None = None
        self._nested: Any = None
        self._state = _NEW

    def __enter__(self) -> None:
        raise TypeError(
            "a block of the asyncio manager (ISAAsyncScopedTransaction) is "
            "entered with `async with tx():`, not `with tx():`"
        )

    def __exit__(self, *exc: object) -> None:  # pragma: no cover - __enter__ raises
        return None

    async def __aenter__(self) -> AsyncSession:
        if self._state is not _NEW:
            raise RuntimeError("a block can be entered once; call tx() again for another")
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("async with tx() needs a running asyncio task")
        manager = self._manager
        scope = manager._scopes.get(task)
        if scope is None:
            frame = sys._getframe(1)
            owner = owner_of_block(frame) if frame.f_code.co_flags & GENERATOR else None
            return await self._enter_outermost(task, owner)
        if scope.broken:
            raise BlockOrderError("blocks of this task ended out of order; end them all first")
        if scope.owner is not None:  # held open by an async generator: is it running?
            check_owner(scope.owner, sys._getframe(1))
        if not self._readonly and READONLY in scope.session.sync_session.info:
            raise ReadOnlyTransactionError(
                "a writing block was opened inside a read-only block (tx(readonly=True)); "
                "open the writing block outside it, or drop readonly=True from the outer block"
            )
        if self._isolation is not None:
            await _check_nested_isolation(self, scope)
        if self._savepoint:
            self._nested = await scope.session.begin_nested()
        scope.blocks.append(self)
        self._scope = scope
        self._state = _OPEN
        return scope.session

    async def _enter_outermost(
        self, task: asyncio.Task[Any], owner: FrameType | None
    ) -> AsyncSession:
        manager = self._manager
        prepare(manager._engine)  # read-your-writes positions (sparc.sa.replicas)
        state = await _engine_state(manager._engine)
        gate = state.gate
        if gate is not None:
            holder = _inside.get()
            if holder is not None and holder.gate is gate and holder.task is not task:
                raise InterleavedTransactionError(
                    "this task was started inside another task's block, and the engine "
                    "has one connection for all tasks (StaticPool): waiting for that "
                    "block would wait for itself if the other task awaits this one. Run "
                    "this work in the other task's block, or use an engine with a pool"
                )
            await gate.acquire()
        try:
            scope = _Scope(task, (self._factory or manager._factory)(), manager)
        except BaseException:
            if gate is not None:
                gate.release()
            raise
        scope.gate = gate
        try:
            # Take the connection now, in a task of its own: a cancellation
            # arriving while the driver connects must not leave a connection
            # half made (some drivers then leak it until garbage collection).
            options = None if self._isolation is None else {"isolation_level": self._isolation}
            scope.connection = await finish(scope.session.connection(execution_options=options))
        except BaseException:
            await manager._end_scope(scope, commit=False)
            raise
        scope.home = state
        state.open.add(scope)
        scope.owner = owner
        scope.blocks.append(self)
        _inside.set(scope)
        manager._scopes[task] = scope
        if task not in manager._watched:
            manager._watched.add(task)
            task.add_done_callback(manager._task_done)
        self._scope = scope
        self._state = _OPEN
        return scope.session

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        scope = self._scope
        if self._state is not _OPEN or scope is None:
            if exc_type is GeneratorExit:
                return False  # a coroutine closed after its loop closed
            if self._state is _DONE and scope is not None and scope.broken:
                raise BlockOrderError(
                    "this block's task ended, or its blocks ended out of order, before "
                    "it closed; its transaction was rolled back"
                )
            raise RuntimeError("this block is not open")
        self._state = _DONE
        blocks = scope.blocks
        if not blocks or blocks[-1] is not self:
            # Ended while blocks opened inside it are still open: nothing of
            # the transaction can be trusted to commit at the right close.
            scope.broken = True
            outermost = bool(blocks) and blocks[0] is self
            if self in blocks:
                blocks.remove(self)
            if outermost:
                for block in blocks:
                    block._state = _DONE
                await self._manager._end_scope(scope, commit=False)
            raise BlockOrderError(
                "a block ended while blocks opened inside it were open; the task's "
                "transaction was rolled back"
            )
        blocks.pop()
        if blocks:
            await self._exit_inner(scope, exc_type)
            return False
        if scope.broken:
            await self._manager._end_scope(scope, commit=False)
            raise BlockOrderError("blocks of this task ended out of order; rolled back")
        await self._exit_outermost(scope, exc_type)
        return False

    async def _exit_inner(self, scope: _Scope, exc_type: type[BaseException] | None) -> None:
        nested = self._nested
        if nested is None:  # savepoint=False: joined the outer transaction
            if exc_type is not None:
                scope.doomed = True
            return
        if exc_type is None:
            # The block exited normally, so its work stays, even while the
            # task is being cancelled (code in the block caught the
            # CancelledError): RELEASE runs to its end, and a cancellation
            # arriving meanwhile is delivered at the task's next await.
            try:
                await finish(nested.commit(), settled=True)  # RELEASE SAVEPOINT
            except BaseException:
                await finish(quietly(nested.rollback()))
                raise
        else:
            await finish(quietly(nested.rollback()))

    async def _exit_outermost(self, scope: _Scope, exc_type: type[BaseException] | None) -> None:
        manager = self._manager
        if exc_type is not None or scope.doomed:
            # A cancellation (or another BaseException) may have interrupted a
            # statement half-way through the driver's protocol: such a
            # connection is discarded, never handed out again. aiosqlite runs
            # each call to its end in its own thread, and its in-memory
            # database lives in its one connection: that one is rolled back.
            interrupted = exc_type is not None and not issubclass(exc_type, Exception)
            discard = interrupted and not _keeps_connection(manager, scope)
            await manager._end_scope(scope, commit=False, discard=discard)
            if exc_type is None:
                raise DoomedTransactionError(
                    "an inner block joined with savepoint=False failed; "
                    "the transaction was rolled back"
                )
            return
        if cancel_pending(scope.task):
            # Requested while the task ran, not yet delivered: deliver it now,
            # before anything is sent (the block did not exit normally).
            try:
                await asyncio.sleep(0)
            except BaseException:
                await manager._end_scope(scope, commit=False)
                raise
        # From here the outcome is the COMMIT's, which flushes what is pending
        # first (in the same pass through the greenlet, one switch less than a
        # flush of its own): a cancellation arriving meanwhile waits for it;
        # if it succeeded, the block exits normally and the cancellation is
        # delivered at the task's next await.
        await manager._end_scope(scope, commit=True)


async def _check_nested_isolation(block: _AsyncBlock, scope: _Scope) -> None:
    """A nested block asking for an isolation level: only its outer block's
    own will do (see the threaded manager's blocks)."""
    level = scope.blocks[0]._isolation if scope.blocks else None
    if level == block._isolation:
        return
    if level is None:
        current = await scope.connection.get_isolation_level()
        if check_isolation(current) == block._isolation:
            return
    raise IsolationLevelError(
        f"a nested block asked for isolation_level={block._isolation!r}, but it runs "
        "in its outer block's transaction, "
        + (f"at {level!r}" if level else "at the engine's level")
        + "; give the level to the outermost block: `async with tx(isolation_level=...):`"
    )


def _keeps_connection(manager: AsyncScopedTransaction, scope: _Scope) -> bool:
    """Whether an interrupted block's connection is rolled back and kept
    rather than discarded: aiosqlite runs each call to its end in its own
    thread, and an in-memory database lives in its one shared connection."""
    return scope.gate is not None or manager._engine.dialect.driver == "aiosqlite"


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

    def __init__(self, engine: AsyncEngine, base: type[Any], **session_options: Any) -> None:
        if not isinstance(engine, AsyncEngine):
            raise TypeError(
                f"expected an AsyncEngine (a DSN with an asyncio driver, such as "
                f"postgresql+asyncpg://), got {engine!r}; for a synchronous engine "
                "use ThreadLocalSASessionTransaction"
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
        self._factory = async_sessionmaker(engine, **session_options)
        self._scopes: weakref.WeakKeyDictionary[asyncio.Task[Any], _Scope] = (
            weakref.WeakKeyDictionary()
        )
        self._watched: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()

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
        scope = self._scopes.get(task) if task is not None else None
        if scope is None or not scope.blocks:
            raise CrossScopeSessionError(
                "no block of this transaction manager is open in the current task "
                "(a task started inside another task's block has none of its own): "
                "use `async with tx() as session:`"
            )
        return scope.session

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
    ) -> Any:
        """An ``async with`` block; ``readonly=True`` (and *after*, a commit
        token) as for the threaded manager (:mod:`sparc.sa.replicas.areadonly`);
        *isolation_level* as for the threaded manager's blocks."""
        if type(savepoint) is not bool:
            raise TypeError(f"savepoint must be True or False, got {savepoint!r}")
        isolation = check_isolation(isolation_level)
        if isolation is not None:
            if readonly or after is not None:
                raise TypeError(
                    "a read-only block chooses its own isolation (a snapshot on the "
                    "replica or READ ONLY on the primary); give isolation_level to "
                    "writing blocks only"
                )
            return _AsyncBlock(self, savepoint, isolation=isolation)
        if readonly or after is not None:
            from sparc.sa.replicas.areadonly import async_readonly_block

            return async_readonly_block(self, readonly, after)
        return _AsyncBlock(self, savepoint)

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
        task = asyncio.current_task()
        scope = self._scopes.get(task) if task is not None else None
        if scope is not None and scope.blocks:
            attempts = 1
        moved = not readonly
        attempt = 1
        while attempt <= attempts:
            block = (
                self(readonly=readonly, after=after)
                if readonly or after
                else self(isolation_level=isolation_level)
            )
            try:
                async with block as session:
                    result = fn(session, *args, **kwargs)
                    if inspect.isawaitable(result):
                        result = await result
                    return result
            except Exception as exc:
                if not moved and getattr(block, "replica", None) is not None and is_disconnect(exc):
                    moved = True  # the replica was marked down: read elsewhere, once
                    continue
                delay = delay_before_next(
                    exc, attempt, attempts, self.retry_delay, self.retry_max_delay
                )
                await asyncio.sleep(delay)
                attempt += 1
        raise AssertionError("unreachable")  # pragma: no cover

    async def _end_scope(self, scope: _Scope, commit: bool, discard: bool = False) -> None:
        """COMMIT or ROLLBACK (or, with ``discard``, invalidate the connection,
        which the server rolls back), then close the session and open the
        gate: all of it to the end, whatever cancellation arrives meanwhile."""
        if self._scopes.get(scope.task) is scope:
            del self._scopes[scope.task]
        home, scope.home = scope.home, None
        if home is not None:
            home.open.discard(scope)
        session = scope.session
        gate, scope.gate = scope.gate, None
        await finish(end_session(session, commit, discard, gate), settled=commit)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        """A task ended: roll back and close a block it left open."""
        scope = self._scopes.pop(task, None)
        if scope is None:
            return
        scope.broken = True
        for block in scope.blocks:
            block._state = _DONE
        logger.warning("sparc.sa: a task ended inside a block; its transaction was rolled back")
        run_detached(self._end_scope(scope, commit=False))


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
