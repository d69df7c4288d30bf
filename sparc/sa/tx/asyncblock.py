"""The asyncio block: ``async with atx():``'s state machine, and the
scope of one task's open blocks.

Private to sparc.sa: :mod:`sparc.sa.aio` (the manager) and
:mod:`sparc.sa.replicas.areadonly` (the read-only block) build on it. It
reaches its manager only through :class:`AsyncBlockHost`, so it imports
neither of them.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import weakref
from contextvars import ContextVar
from types import FrameType, TracebackType
from typing import Any, Protocol

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.pool import SingletonThreadPool, StaticPool

from sparc.sa.connections.keep import keep_shared_connection
from sparc.sa.exceptions import (
    BlockOrderError,
    DoomedTransactionError,
    ForeignEventLoopError,
    InterleavedTransactionError,
    IsolationLevelError,
    ReadOnlyTransactionError,
)
from sparc.sa.foreign.of_asyncio import call_connection_lost, cancel_pending
from sparc.sa.foreign.of_sqlalchemy import driver_transport
from sparc.sa.tx.sessions import READONLY, check_isolation
from sparc.sa.tx.shielded import finish, quietly
from sparc.sa.tx.suspended import GENERATOR, check_owner, owner_of_block

__all__ = ["DONE", "AsyncBlock", "AsyncBlockHost", "AsyncScope"]

logger = logging.getLogger("sparc.sa.aio")  # where this code lived before


class AsyncBlockHost(Protocol):
    """What a block needs of its asyncio transaction manager
    (:class:`sparc.sa.aio.AsyncScopedTransaction`)."""

    _engine: AsyncEngine
    _factory: Any
    _scopes: weakref.WeakKeyDictionary[asyncio.Task[Any], AsyncScope]
    _watched: weakref.WeakSet[asyncio.Task[Any]]

    @property
    def engine(self) -> AsyncEngine: ...

    def _prepare(self, engine: Any) -> None: ...
    async def _end_scope(self, scope: AsyncScope, commit: bool, discard: bool = False) -> None: ...
    def _task_done(self, task: asyncio.Task[Any]) -> None: ...


class _EngineState:
    """The event loop an engine's connections belong to, and its gate."""

    __slots__ = ("gate", "loop", "open")

    def __init__(self, loop: asyncio.AbstractEventLoop, shared: bool) -> None:
        self.loop = weakref.ref(loop)
        # One connection for every task (StaticPool): blocks take turns.
        self.gate = asyncio.Lock() if shared else None
        # The open outermost blocks' scopes: if the loop closes while one is
        # open, the next loop severs its connection (see _engine_state).
        self.open: set[AsyncScope] = set()


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


def _abandon_with_loop(scope: AsyncScope) -> None:
    """End a block whose event loop closed while it was open: without that
    loop nothing can be awaited, so its connection's socket is shut down,
    which makes the server roll the transaction back and drop its locks."""
    scope.broken = True
    for block in scope.blocks:
        block._state = DONE
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
    transport = driver_transport(driver)  # asyncpg, asyncmy, aiomysql
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
        call_connection_lost(transport)
    # aiosqlite: its thread holds the connection; a file database's lock is
    # released when the connection is collected.


NEW, OPEN, DONE = "new", "open", "done"


class AsyncScope:
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
        self, task: asyncio.Task[Any], session: AsyncSession, manager: AsyncBlockHost
    ) -> None:
        self.task = task
        self.session = session
        self.manager = manager
        self.connection: Any = None  # the AsyncConnection the block took
        self.home: _EngineState | None = None  # set while the block is open
        self.blocks: list[AsyncBlock] = []
        self.doomed = False
        self.broken = False  # blocks ended out of order
        self.gate: asyncio.Lock | None = None
        # The async generator whose frame opened the outermost block, if
        # iteration drives it (see sparc.sa.tx.suspended).
        self.owner: FrameType | None = None


# The scope of the outermost block the current context is inside of; a child
# task inherits it, which is how it knows it was started inside a block.
_inside: ContextVar[AsyncScope | None] = ContextVar("sparc_sa_async_block", default=None)


class AsyncBlock:
    """One ``async with tx():`` block."""

    __slots__ = (
        "_factory",
        "_isolation",
        "_manager",
        "_nested",
        "_readonly",
        "_scope",
        "_state",
        "_use_savepoint",
    )

    def __init__(
        self,
        manager: AsyncBlockHost,
        savepoint: bool,
        readonly: bool = False,
        factory: Any = None,
        isolation: str | None = None,
    ) -> None:
        self._manager = manager
        self._isolation = isolation  # normalised by sessions.check_isolation
        self._use_savepoint = savepoint
        self._readonly = readonly  # see sparc.sa.replicas.areadonly
        self._factory = factory  # the read-only block's sessions, if not the manager's
        self._scope: AsyncScope | None = None
        self._nested: Any = None
        self._state = NEW

    def __enter__(self) -> None:
        raise TypeError(
            "a block of the asyncio manager (ISAAsyncScopedTransaction) is "
            "entered with `async with tx():`, not `with tx():`"
        )

    def __exit__(self, *exc: object) -> None:  # pragma: no cover - __enter__ raises
        return None

    async def __aenter__(self) -> AsyncSession:
        if self._state is not NEW:
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
        if self._use_savepoint:
            self._nested = await scope.session.begin_nested()
        scope.blocks.append(self)
        self._scope = scope
        self._state = OPEN
        return scope.session

    async def _enter_outermost(
        self, task: asyncio.Task[Any], owner: FrameType | None
    ) -> AsyncSession:
        manager = self._manager
        manager._prepare(manager._engine)  # read-your-writes positions (sparc.sa.replicas)
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
            scope = AsyncScope(task, (self._factory or manager._factory)(), manager)
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
        self._state = OPEN
        return scope.session

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        scope = self._scope
        if self._state is not OPEN or scope is None:
            return _exit_closed(self, scope, exc_type)
        self._state = DONE
        blocks = scope.blocks
        if not blocks or blocks[-1] is not self:
            await _exit_out_of_order(self, scope, blocks)
        blocks.pop()
        if blocks:
            await self._exit_inner(scope, exc_type)
            return False
        if scope.broken:
            await self._manager._end_scope(scope, commit=False)
            raise BlockOrderError("blocks of this task ended out of order; rolled back")
        await self._exit_outermost(scope, exc_type)
        return False

    async def _exit_inner(self, scope: AsyncScope, exc_type: type[BaseException] | None) -> None:
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

    async def _exit_outermost(
        self, scope: AsyncScope, exc_type: type[BaseException] | None
    ) -> None:
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


def _exit_closed(
    block: AsyncBlock, scope: AsyncScope | None, exc_type: type[BaseException] | None
) -> bool:
    """The exit of a block that is not open."""
    if exc_type is GeneratorExit:
        return False  # a coroutine closed after its loop closed
    if block._state is DONE and scope is not None and scope.broken:
        raise BlockOrderError(
            "this block's task ended, or its blocks ended out of order, before "
            "it closed; its transaction was rolled back"
        )
    raise RuntimeError("this block is not open")


async def _exit_out_of_order(
    block: AsyncBlock, scope: AsyncScope, blocks: list[AsyncBlock]
) -> None:
    """*block* ended while blocks opened inside it are still open: nothing of
    the transaction can be trusted to commit at the right close."""
    scope.broken = True
    outermost = bool(blocks) and blocks[0] is block
    if block in blocks:
        blocks.remove(block)
    if outermost:
        for other in blocks:
            other._state = DONE
        await block._manager._end_scope(scope, commit=False)
    raise BlockOrderError(
        "a block ended while blocks opened inside it were open; the task's "
        "transaction was rolled back"
    )


async def _check_nested_isolation(block: AsyncBlock, scope: AsyncScope) -> None:
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


def _keeps_connection(manager: AsyncBlockHost, scope: AsyncScope) -> bool:
    """Whether an interrupted block's connection is rolled back and kept
    rather than discarded: aiosqlite runs each call to its end in its own
    thread, and an in-memory database lives in its one shared connection."""
    return scope.gate is not None or manager._engine.dialect.driver == "aiosqlite"
