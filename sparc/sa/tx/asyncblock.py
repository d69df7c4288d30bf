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
from typing import Any, Final, Protocol

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.pool import SingletonThreadPool, StaticPool
from sqlalchemy.util import greenlet_spawn

from sparc.sa.connections.keep import keep_shared_connection
from sparc.sa.exceptions import (
    BlockOrderError,
    DoomedTransactionError,
    ForeignEventLoopError,
    InterleavedTransactionError,
)
from sparc.sa.foreign.of_asyncio import call_connection_lost, cancel_pending
from sparc.sa.foreign.of_sqlalchemy import driver_transport
from sparc.sa.tx.scope import Scope
from sparc.sa.tx.shielded import finish
from sparc.sa.tx.stack import (
    CANCELLED,
    DONE,
    DOOMED,
    NEW,
    OPEN,
    BlockState,
    enter_nested,
    exit_closed,
    exit_nested,
    exit_out_of_order,
)
from sparc.sa.tx.suspended import GENERATOR, owner_of_block

__all__ = ["DONE", "AsyncBlock", "AsyncBlockHost", "AsyncScope"]

logger = logging.getLogger("sparc.sa.aio")  # where this code lived before


class AsyncBlockHost(Protocol):
    """What a block needs of its asyncio transaction manager
    (:class:`sparc.sa.aio.AsyncScopedTransaction`)."""

    #: The manager's sessions (an ``async_sessionmaker``).
    session_factory: Any
    #: The open blocks' scopes, by task.
    scopes: weakref.WeakKeyDictionary[asyncio.Task[Any], AsyncScope]
    #: Tasks whose end the manager watches.
    watched: weakref.WeakSet[asyncio.Task[Any]]
    #: Whether the server's aborted transactions can be told (sparc.sa.tx.aborted).
    checks_aborted: bool
    #: Whether SAVEPOINTs need an explicit BEGIN (pysqlite only: never here).
    sqlite_begin: bool
    #: The read-only blocks' session makers (sparc.sa.replicas.areadonly).
    readonly_sessions: dict[Any, Any]

    @property
    def engine(self) -> AsyncEngine: ...

    def prepare(self, engine: Any) -> None: ...
    async def end_scope(
        self,
        scope: AsyncScope,
        commit: bool,
        discard: bool = False,
        cause: BaseException | None = None,
    ) -> None: ...
    def task_done(self, task: asyncio.Task[Any]) -> None: ...


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
        # unclosed. The engine gets its new state before anything here
        # awaits, so another task of this loop finds it and does not cut
        # the same connections again.
        abandoned = list(state.open)
        state.open.clear()
        sync_engine.dispose(close=False)  # no I/O: a new pool, the old one dropped
    else:
        abandoned = []
    shared = isinstance(sync_engine.pool, (StaticPool, SingletonThreadPool))
    keep_shared_connection(sync_engine)  # shared pools, and aiosqlite on any pool
    state = _engine_states[sync_engine] = _EngineState(loop, shared)
    for scope in abandoned:
        await _invalidate(_abandon_with_loop(scope))
    return state


def _abandon_with_loop(scope: AsyncScope) -> Any:
    """End a block whose event loop closed while it was open: without that
    loop nothing can be awaited, so its connection's socket is shut down,
    which makes the server roll the transaction back and drop its locks.
    Its connection is returned, for :func:`_invalidate`."""
    scope.broken = True
    for ref in scope.blocks:
        block = ref()
        if block is not None:
            block._state = DONE
    scope.blocks.clear()
    manager = scope.manager
    if manager.scopes.get(scope.task) is scope:
        del manager.scopes[scope.task]
    logger.warning(
        "sparc.sa: a block was still open when its event loop closed; its "
        "connection was cut, so the server rolls its transaction back"
    )
    connection = scope.connection
    try:
        _shut_down(connection.sync_connection.connection.driver_connection)
    except Exception:
        logger.warning("sparc.sa: cutting an abandoned connection failed", exc_info=True)
    return connection


# Drivers whose connection of a closed loop can be closed on another loop:
# psycopg's is closed already (its close() returns at once), aiosqlite's
# thread serves any loop and must be told to close the database and end.
_CLOSE_ON_THIS_LOOP: Final = frozenset({"psycopg", "aiosqlite"})


async def _invalidate(connection: Any) -> None:
    """SQLAlchemy's side of an abandoned block: its connection leaves the
    pool's books for good, instead of being found later by the garbage
    collector. psycopg's and aiosqlite's are closed through the greenlet
    bridge on the running loop: SQLAlchemy 2.0's adapters await their close
    even to terminate, which outside the bridge raised MissingGreenlet (an
    ERROR of the pool's logger, a close() coroutine never awaited) and left
    aiosqlite's database open, its file locked and its thread keeping the
    interpreter from exiting. The others' sockets are shut already, and
    their terminate needs no loop."""
    sync_connection = connection.sync_connection
    try:
        if sync_connection.dialect.driver in _CLOSE_ON_THIS_LOOP:
            await greenlet_spawn(sync_connection.invalidate)
        else:
            sync_connection.invalidate()
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
    # aiosqlite: its thread holds the connection, closed by _invalidate.


class AsyncScope(Scope):
    """The open blocks of one task for one manager, innermost last: a
    :class:`~sparc.sa.tx.scope.Scope` (what the block state machine of
    :mod:`sparc.sa.tx.stack` works on) whose session is the sync session of
    the task's :class:`~sqlalchemy.ext.asyncio.AsyncSession`."""

    __slots__ = ("asession", "broken", "connection", "gate", "home", "manager", "task")

    def __init__(
        self, task: asyncio.Task[Any], session: AsyncSession, manager: AsyncBlockHost
    ) -> None:
        Scope.__init__(self, manager.engine.sync_engine)
        self.task = task
        self.asession = session
        self.session = session.sync_session
        self.manager = manager
        self.connection: Any = None  # the AsyncConnection the block took
        self.home: _EngineState | None = None  # set while the block is open
        self.broken = False  # its task or event loop ended with a block open
        self.gate: asyncio.Lock | None = None


# The scope of the outermost block the current context is inside of; a child
# task inherits it, which is how it knows it was started inside a block.
_inside: ContextVar[AsyncScope | None] = ContextVar("sparc_sa_async_block", default=None)


class AsyncBlock(BlockState):
    """One ``async with tx():`` block: the state machine of
    :mod:`sparc.sa.tx.stack` (:class:`~sparc.sa.tx.stack.BlockState`, its
    states, its stack of nested blocks and SAVEPOINTs), driven through
    SQLAlchemy's greenlet bridge as its asyncio extension drives a sync
    session. What is asyncio's own is here: the gate, the connection taken
    and the transaction ended under the cancellation shield
    (:mod:`sparc.sa.tx.shielded`), and a task or loop that ends with the
    block open."""

    __slots__ = ("_factory",)

    def __init__(
        self,
        manager: AsyncBlockHost,
        savepoint: bool,
        readonly: bool = False,
        factory: Any = None,
        isolation: str | None = None,
    ) -> None:
        BlockState.__init__(self, manager, savepoint, None, readonly, isolation)  # type: ignore[arg-type]
        self._factory = factory  # the read-only block's sessions, if not the manager's

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
        scope: AsyncScope | None = manager.scopes.get(task)  # type: ignore[attr-defined]
        if scope is None:
            frame = sys._getframe(1)
            owner = owner_of_block(frame) if frame.f_code.co_flags & GENERATOR else None
            return await self._enter_outermost(task, owner)
        blocks = scope.blocks
        if self._use_savepoint or self._isolation is not None:
            await greenlet_spawn(enter_nested, self, scope, blocks, sys._getframe(1))
        else:  # nothing to send: no switch into a greenlet
            enter_nested(self, scope, blocks, sys._getframe(1))
        return scope.asession

    async def _enter_outermost(
        self, task: asyncio.Task[Any], owner: FrameType | None
    ) -> AsyncSession:
        manager: Any = self._manager
        manager.prepare(manager.engine)  # read-your-writes positions (sparc.sa.replicas)
        state = await _engine_state(manager.engine)
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
            scope = AsyncScope(task, (self._factory or manager.session_factory)(), manager)
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
            scope.connection = await finish(scope.asession.connection(execution_options=options))
        except BaseException:
            await manager.end_scope(scope, commit=False)
            raise
        scope.home = state
        state.open.add(scope)
        self._owner = owner
        self._scope = scope
        self._session = scope.session
        scope.blocks.append(self._ref)
        self._state = OPEN
        _inside.set(scope)
        manager.scopes[task] = scope
        if task not in manager.watched:
            manager.watched.add(task)
            task.add_done_callback(manager.task_done)
        return scope.asession

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        scope = self._scope
        if self._state is not OPEN or scope is None:
            return await _exit_closed(self, scope, exc_type)
        assert isinstance(scope, AsyncScope)
        blocks = scope.blocks
        if not blocks or blocks[-1] is not self._ref:
            await _exit_out_of_order(self, scope, blocks)
        if len(blocks) > 1:
            if self._sp is None:  # savepoint=False: nothing to send
                exit_nested(self, scope, blocks, exc_type)
            else:
                # RELEASE (or ROLLBACK TO) runs to its end: a cancellation
                # arriving meanwhile waits for it; if the block exited
                # normally its work stays, and the cancellation is delivered
                # at the task's next await.
                await finish(
                    greenlet_spawn(exit_nested, self, scope, blocks, exc_type),
                    settled=exc_type is None,
                )
            return False
        blocks.clear()
        self._state = DONE
        await self._exit_outermost(scope, exc_type, exc)
        return False

    async def _exit_outermost(
        self, scope: AsyncScope, exc_type: type[BaseException] | None, exc: BaseException | None
    ) -> None:
        manager: Any = self._manager
        doomed, scope.doomed = scope.doomed, False
        if exc_type is not None or doomed:
            # A cancellation (or another BaseException) may have interrupted a
            # statement half-way through the driver's protocol: such a
            # connection is discarded, never handed out again. aiosqlite runs
            # each call to its end in its own thread, and its in-memory
            # database lives in its one connection: that one is rolled back.
            interrupted = exc_type is not None and not issubclass(exc_type, Exception)
            discard = interrupted and not _keeps_connection(manager, scope)
            await manager.end_scope(scope, commit=False, discard=discard, cause=exc)
            if exc_type is None:
                raise DoomedTransactionError(DOOMED)
            return
        if cancel_pending(scope.task):
            # Requested while the task ran, not yet delivered: deliver it now,
            # before anything is sent (the block did not exit normally).
            try:
                await asyncio.sleep(0)
            except BaseException:
                await manager.end_scope(scope, commit=False)
                raise
        # From here the outcome is the COMMIT's, which flushes what is pending
        # first (in the same pass through the greenlet, one switch less than a
        # flush of its own): a cancellation arriving meanwhile waits for it;
        # if it succeeded, the block exits normally and the cancellation is
        # delivered at the task's next await. A transaction the server
        # aborted is rolled back instead (sparc.sa.tx.stack.commit).
        await manager.end_scope(scope, commit=True)


async def _exit_closed(
    block: BlockState, scope: Scope | None, exc_type: type[BaseException] | None
) -> bool:
    """The exit of a block that is not open (:func:`sparc.sa.tx.stack.exit_closed`)."""
    if exc_type is GeneratorExit:
        return False  # a coroutine closed after its loop closed
    if block._state is DONE and isinstance(scope, AsyncScope) and scope.broken:
        raise BlockOrderError(
            "this block's task or event loop ended before it closed; its "
            "transaction was rolled back"
        )
    if block._state is CANCELLED:
        # rolls back what the block's code did after its transaction ended
        await greenlet_spawn(exit_closed, block, exc_type)
    exit_closed(block, exc_type)
    return False  # pragma: no cover - exit_closed raises


async def _exit_out_of_order(
    block: AsyncBlock, scope: AsyncScope, blocks: list[weakref.ref[BlockState]]
) -> None:
    """*block* ended while blocks opened inside it are still open: the
    state machine rolls the whole transaction back and cancels every open
    block of the task (:func:`sparc.sa.tx.stack.exit_out_of_order`), which
    raises; then the front ends the scope (its gate, its records)."""
    try:
        await finish(greenlet_spawn(exit_out_of_order, block, scope, blocks))
    finally:
        await block._manager.end_scope(scope, commit=False)  # type: ignore[attr-defined]
    raise AssertionError("exit_out_of_order raises")  # pragma: no cover


def _keeps_connection(manager: AsyncBlockHost, scope: AsyncScope) -> bool:
    """Whether an interrupted block's connection is rolled back and kept
    rather than discarded: aiosqlite runs each call to its end in its own
    thread, and an in-memory database lives in its one shared connection."""
    return scope.gate is not None or manager.engine.dialect.driver == "aiosqlite"
