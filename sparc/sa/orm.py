"""The scoped transaction manager: (ISAEngine, ISADeclarativeMeta) -> ISAScopedTransaction.

::

    transaction = getMultiAdapter((engine, Base), ISAScopedTransaction)
    with transaction() as Session:
        Session.add(obj)            # or transaction.session.add(obj)

Scopes
    A *scope* is the running asyncio task when there is one, otherwise the
    current thread. Each scope has its own session, created on first use and
    kept for the scope's lifetime; a block resets it at exit, so it never
    carries state from one block into the next. When a thread or task ends,
    its session is closed at once and its connection returned to the pool.

Blocks
    ``with transaction():`` commits on success and rolls back on any
    exception, re-raising it unchanged. A block inside a block of the same
    scope runs in a SAVEPOINT, or joins the outer transaction with
    ``savepoint=False``. The session is captured when the outermost block is
    entered and that same session is finished at exit, whichever thread or
    task closes the block.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import threading
import time
import weakref
from asyncio import current_task as _current_task
from asyncio.events import _get_running_loop
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, TypeVar

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, scoped_session, sessionmaker
from sqlalchemy.pool import Pool, SingletonThreadPool, StaticPool
from zope.component import adapter
from zope.interface import implementer

from sparc.sa import fork
from sparc.sa.exceptions import (
    DoomedTransactionError,
    ForkedTransactionError,
    InterleavedTransactionError,
)
from sparc.sa.interfaces import (
    ISADeclarativeMeta,
    ISAEngine,
    ISAScopedSession,
    ISAScopedTransaction,
    ISASession,
)

if TYPE_CHECKING:
    from asyncio import Task

__all__ = [
    "DoomedTransactionError",
    "ForkedTransactionError",
    "ISAScopedSession",
    "ISAScopedTransaction",
    "ISASession",
    "InterleavedTransactionError",
    "ThreadLocalSASessionTransaction",
    "is_retryable",
    "scoped_transaction",
]

logger = logging.getLogger(__name__)
_DEBUG: Final = logging.DEBUG
_T = TypeVar("_T")
_get_ident = threading.get_ident

#: SQLSTATEs of a transaction the server aborted so that it can be retried.
RETRY_SQLSTATES: Final = frozenset({"40001", "40P01"})
#: MySQL/MariaDB error numbers of the same: deadlock, lock wait timeout,
#: and "record has changed since last read" (MariaDB snapshot isolation).
RETRY_MYSQL_ERRORS: Final = frozenset({1213, 1205, 1020})


def is_retryable(error: BaseException) -> bool:
    """True if *error* is a serialization failure or deadlock worth retrying."""
    if not isinstance(error, sa_exc.DBAPIError) or error.connection_invalidated:
        return False
    orig = error.orig
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if code in RETRY_SQLSTATES:
        return True
    args: tuple[Any, ...] = getattr(orig, "args", ())
    return bool(args) and type(args[0]) is int and args[0] in RETRY_MYSQL_ERRORS


# -- scopes ---------------------------------------------------------------------


class _Scope:
    """One thread's or task's session and the state of its open blocks."""

    __slots__ = ("__weakref__", "depth", "doomed", "engine", "forgotten", "pid", "session")

    def __init__(self, engine: Engine) -> None:
        self.session: Session | None = None
        self.depth = 0  # how many blocks of this scope are open
        self.doomed = False  # a joined inner block failed; the outer must roll back
        self.forgotten = False  # inherited across os.fork(): never touch again
        self.pid = os.getpid()
        self.engine = engine


class _ThreadScope(_Scope):
    """A thread's scope. It lives in a ``threading.local``, which CPython
    empties as soon as the thread ends, so ``__del__`` runs then, in that
    thread, rather than whenever the garbage collector gets to the session."""

    __slots__ = ()

    def __del__(self) -> None:
        _close_abandoned(self)


def _close_abandoned(scope: _Scope) -> None:
    """Close the session of a scope whose thread or task has ended."""
    session = scope.session
    if session is None or scope.forgotten:
        return
    if os.getpid() != scope.pid:
        # Inherited across fork (threads other than the forking one vanish in
        # the child, and their thread-locals with them): the session belongs
        # to the parent. Checked first: even at shutdown it must stay pinned.
        scope.session = None
        fork.orphan(session)
        return
    if scope.depth:
        # A block of this scope is still open, handed to another thread or
        # task to close. That block's exit finishes and resets the session.
        return
    scope.session = None
    if sys.is_finalizing():
        # The interpreter is exiting: the server rolls back what the dying
        # connection held, and modules may already be half torn down.
        return
    try:
        gate = _gate_for(scope.engine.pool)
        if gate is None or not session.in_transaction():
            session.close()
        else:
            gate.close_when_free(session)
    except Exception:
        logger.warning("closing the session of an ended thread or task failed", exc_info=True)


# -- one shared connection --------------------------------------------------------


class _Gate:
    """Serialises blocks on a pool that hands one connection to every thread.

    With StaticPool every session shares one DBAPI connection, so a commit or
    rollback from one thread would end another thread's transaction. Blocks
    therefore take turns. Sessions of ended threads, whose close rolls the
    connection back, are closed only between blocks.
    """

    __slots__ = ("_lock", "_mutex", "_pending", "owner", "thread")

    def __init__(self) -> None:
        self._lock = threading.Lock()  # held from outermost enter to exit
        self._mutex = threading.Lock()  # guards swapping and appending _pending
        self._pending: list[Session] = []
        self.owner: object = None
        self.thread: int | None = None

    def acquire(self, scope: _Scope) -> bool:
        """Wait for the connection; False if *scope* already holds it."""
        if self.owner is scope:
            return False
        me = _get_ident()
        if self.thread == me:
            # Only this thread can have set `thread` to its own id, so this
            # read is exact: the holder is another task or manager in this
            # very thread, and waiting here would wait for ourselves.
            raise InterleavedTransactionError(
                "another block of this thread (an asyncio task, or a transaction "
                "manager for another Base) holds the engine's single shared "
                "connection; blocks on a StaticPool engine cannot interleave "
                "within one thread"
            )
        self._lock.acquire()
        self.owner = scope
        self.thread = me
        return True

    def release(self) -> None:
        # The common case, nothing pending, takes no extra lock. A session
        # queued by close_when_free() between our last look and the release is
        # not lost: we look again after releasing and, if it is there, take
        # the gate back to close it (or the next holder will).
        while True:
            if self._pending:
                self._close_pending()
            self.owner = None
            self.thread = None
            self._lock.release()
            if not self._pending or not self._lock.acquire(blocking=False):
                return
            self.owner = self
            self.thread = _get_ident()

    def _close_pending(self) -> None:
        with self._mutex:
            pending, self._pending = self._pending, []
        for session in pending:
            _quiet_close(session)

    def close_when_free(self, session: Session) -> None:
        with self._mutex:
            self._pending.append(session)
        # Queued first, then try to become the one who closes it; if another
        # block holds the connection, its release() closes it.
        if self._lock.acquire(blocking=False):
            self.owner = self
            self.thread = _get_ident()
            self.release()


class _ThreadGate:
    """The same for SingletonThreadPool, whose connection is shared per thread:
    only the scopes (tasks) of one thread need to take turns, and they cannot
    wait for each other, so a second one is refused."""

    __slots__ = ("_local",)

    def __init__(self) -> None:
        self._local = threading.local()

    def acquire(self, scope: _Scope) -> bool:
        local = self._local
        owner = getattr(local, "owner", None)
        if owner is scope:
            return False
        if owner is not None:
            raise InterleavedTransactionError(
                "another block of this thread holds its SingletonThreadPool "
                "connection; blocks on that connection cannot interleave"
            )
        local.owner = scope
        return True

    def release(self) -> None:
        local = self._local
        local.owner = None
        pending = getattr(local, "pending", None)
        if pending:
            local.pending = []
            for session in pending:
                _quiet_close(session)

    def close_when_free(self, session: Session) -> None:
        local = self._local
        if getattr(local, "owner", None) is None:
            _quiet_close(session)
        else:
            local.pending = [*getattr(local, "pending", ()), session]


_GATE_ATTR: Final = "_sparc_sa_gate"
_MISSING: Final = object()
# Makes sure two threads that first meet a pool agree on its one gate.
_gate_lock = threading.Lock()


def _gate_for(pool: Pool) -> _Gate | _ThreadGate | None:
    gate = pool.__dict__.get(_GATE_ATTR, _MISSING)
    if gate is not _MISSING:
        return gate  # type: ignore[no-any-return]
    with _gate_lock:
        gate = pool.__dict__.get(_GATE_ATTR, _MISSING)
        if gate is _MISSING:
            if isinstance(pool, StaticPool):
                gate = _Gate()
            elif isinstance(pool, SingletonThreadPool):
                gate = _ThreadGate()
            else:
                gate = None
            pool.__dict__[_GATE_ATTR] = gate
    return gate  # type: ignore[no-any-return]


def _quiet_close(session: Session) -> None:
    try:
        session.close()
    except Exception:
        logger.warning("closing a session failed", exc_info=True)


# -- the transaction manager --------------------------------------------------------


class _Registry:
    """The registry behind the yielded ``scoped_session``: the current scope's
    session, with the interface SQLAlchemy's ScopedRegistry offers."""

    __slots__ = ("_manager",)

    def __init__(self, manager: ThreadLocalSASessionTransaction) -> None:
        self._manager = manager

    def __call__(self) -> Session:
        return self._manager.session

    def has(self) -> bool:
        scope = self._manager._existing_scope()
        return scope is not None and scope.session is not None

    def set(self, session: Session) -> None:
        scope = self._manager._scope()
        scope.session = session

    def clear(self) -> None:
        scope = self._manager._existing_scope()
        if scope is not None:
            scope.session = None


@implementer(ISAScopedTransaction)
class ThreadLocalSASessionTransaction:
    """Thread- and task-scoped sessions with commit-or-roll-back blocks.

    ``ThreadLocalSASessionTransaction(engine, Base)`` builds a private
    manager; ``getMultiAdapter((engine, Base), ISAScopedTransaction)`` returns
    the one shared by the whole application for that engine and Base.
    Extra keyword arguments are passed to :class:`sqlalchemy.orm.sessionmaker`.

    Sessions are made with ``expire_on_commit=False``: every block resets its
    session right after committing, so expiring objects at commit would
    refresh nothing and would only make the block's objects unreadable
    afterwards. Pass ``expire_on_commit=True`` to have that back.

    .. versionchanged:: 2.0
       Scopes are asyncio tasks as well as threads; blocks nest as
       SAVEPOINTs; sessions of ended threads are closed at once; blocks on a
       single shared connection take turns; forks are safe; :meth:`run`.
       ``expire_on_commit`` defaults to False.
    """

    #: First backoff of :meth:`run`, in seconds; doubled after each attempt.
    retry_delay: float = 0.02
    #: Upper bound of one backoff of :meth:`run`, in seconds.
    retry_max_delay: float = 1.0

    def __init__(self, engine: Engine, base: type[Any], **session_options: Any) -> None:
        self._engine = engine
        self._base_ref = weakref.ref(base)
        self._base_name = f"{base.__module__}.{base.__qualname__}"
        session_options.setdefault("expire_on_commit", False)
        self._session_factory = sessionmaker(bind=engine, **session_options)
        self._local = threading.local()
        self._tasks: dict[Task[Any], _Scope] = {}
        self._Session = scoped_session(self._session_factory)
        self._Session.registry = _Registry(self)  # type: ignore[assignment]
        self._pool: Pool | None = None
        self._gate: _Gate | _ThreadGate | None = None
        # pysqlite emits no BEGIN before a SAVEPOINT; see _begin_nested.
        self._sqlite_begin = engine.dialect.name == "sqlite" and engine.driver in (
            "pysqlite",
            "pysqlcipher",
        )
        fork.track(self)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} engine={self._engine!r} Base={self._base_name}>"

    # -- the interface -----------------------------------------------------------

    @property
    def Base(self) -> type[Any] | None:
        """The declarative base; None once it has been garbage-collected."""
        return self._base_ref()

    @property
    def engine(self) -> Engine:
        return self._engine

    @property
    def session(self) -> Session:
        """The current scope's session."""
        scope: _Scope
        if _get_running_loop() is None:  # the common case, inline
            try:
                scope = self._local.scope
            except AttributeError:
                scope = self._scope()
        else:
            scope = self._scope()
        session = scope.session
        if session is None:
            session = scope.session = self._session_factory()
        return session

    @property
    def scoped_session(self) -> scoped_session[Session]:
        """The ISAScopedSession provider that blocks yield."""
        return self._Session

    def __call__(self, savepoint: bool = True) -> _Block:
        """A block: ``with transaction():`` commits on success, rolls back on
        any exception; nested, a SAVEPOINT (or, with ``savepoint=False``, a
        part of the outer transaction)."""
        return _Block(self, savepoint)

    def run(self, fn: Callable[..., _T], /, *args: Any, attempts: int = 3, **kwargs: Any) -> _T:
        """Call ``fn(session, *args, **kwargs)`` in a block and return its result,
        running the whole block again, up to *attempts* times in all, when
        the database aborts it for a serialization failure or a deadlock.
        Inside an open block, *fn* runs once in a SAVEPOINT."""
        if type(attempts) is not int or attempts < 1:
            raise ValueError(f"'attempts' must be a positive integer, got {attempts!r}")
        if self._scope().depth:
            # Retrying an inner block cannot help: the server aborted the
            # whole transaction, which only the outermost block can restart.
            inner = _Block(self, True)
            with inner:
                return fn(inner._session, *args, **kwargs)
        attempt = 1
        while True:
            block = _Block(self, True)
            try:
                with block:
                    return fn(block._session, *args, **kwargs)
            except sa_exc.DBAPIError as error:
                if attempt >= attempts or not is_retryable(error):
                    raise
                cap = min(self.retry_max_delay, self.retry_delay * 2 ** (attempt - 1))
                delay = cap / 2 + random.uniform(0, cap / 2)
                logger.info(
                    "transaction aborted by the database (%s); retrying in %.3fs, attempt %d of %d",
                    type(error.orig).__name__,
                    delay,
                    attempt + 1,
                    attempts,
                )
                time.sleep(delay)
                attempt += 1

    # -- scopes --------------------------------------------------------------------

    def _scope(self) -> _Scope:
        """The current task's or thread's scope, made on first use."""
        scope = self._existing_scope()
        if scope is not None:
            return scope
        task = _current_task() if _get_running_loop() is not None else None
        if task is not None:
            scope = self._tasks[task] = _Scope(self._engine)
            task.add_done_callback(self._task_done)
        else:
            scope = self._local.scope = _ThreadScope(self._engine)
        return scope

    def _existing_scope(self) -> _Scope | None:
        if _get_running_loop() is not None:
            task = _current_task()
            if task is not None:
                return self._tasks.get(task)
        scope: _Scope | None = getattr(self._local, "scope", None)
        return scope

    def _task_done(self, task: Task[Any]) -> None:
        scope = self._tasks.pop(task, None)
        if scope is not None:
            _close_abandoned(scope)

    def _forget_after_fork(self) -> None:
        scopes = [*self._tasks.values(), getattr(self._local, "scope", None)]
        for scope in scopes:
            if scope is not None:
                scope.forgotten = True
                fork.orphan(scope.session)
        self._tasks = {}
        self._local = threading.local()
        # A gate inherited in a held state would block the child forever.
        self._engine.pool.__dict__.pop(_GATE_ATTR, None)
        self._pool = None

    def _refresh_gate(self, pool: Pool) -> _Gate | _ThreadGate | None:
        # First use, or the engine was disposed and has a new pool.
        self._gate = _gate_for(pool)
        self._pool = pool
        return self._gate

    def _begin_nested(self, session: Session) -> Any:
        if self._sqlite_begin:
            # pysqlite (legacy transaction control) begins a transaction only
            # before DML. A SAVEPOINT outside a transaction starts one of its
            # own, and its RELEASE commits: the outer block could no longer
            # roll the inner block's work back. Begin explicitly first.
            connection = session.connection()
            dbapi = connection.connection.dbapi_connection
            if (
                dbapi is not None
                and not dbapi.in_transaction
                and dbapi.isolation_level is not None
                and getattr(dbapi, "autocommit", -1) is not True
            ):
                connection.exec_driver_sql("BEGIN")
        return session.begin_nested()


class _Block:
    """One ``with transaction():`` block."""

    __slots__ = (
        "_debug",
        "_gate",
        "_manager",
        "_nested",
        "_savepoint",
        "_scope",
        "_session",
        "_sp",
    )

    def __init__(self, manager: ThreadLocalSASessionTransaction, savepoint: bool) -> None:
        self._manager = manager
        self._savepoint = savepoint

    # __enter__ and __exit__ run on every transaction: the common case (a
    # thread outside asyncio, a pool of its own connections, no debug log) is
    # written out inline rather than through helper calls.

    def __enter__(self) -> scoped_session[Session]:
        manager = self._manager
        scope: _Scope
        if _get_running_loop() is None:
            try:
                scope = manager._local.scope
            except AttributeError:
                scope = manager._scope()
        else:
            scope = manager._scope()
        session = scope.session
        if session is None:
            session = scope.session = manager._session_factory()
        self._scope = scope
        self._session = session
        if scope.depth:
            self._nested = True
            self._sp = manager._begin_nested(session) if self._savepoint else None
            scope.depth += 1
            return manager._Session
        self._nested = False
        pool = manager._engine.pool
        gate = manager._gate if pool is manager._pool else manager._refresh_gate(pool)
        if gate is not None and not gate.acquire(scope):
            gate = None
        self._gate = gate
        scope.depth = 1
        debug = self._debug = logger.isEnabledFor(_DEBUG)
        if debug:
            logger.debug("block entered: %r in %r", session, manager)
        return manager._Session

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        scope = self._scope
        if scope.forgotten:
            # The block was opened before os.fork() and this is the child.
            if exc_type is None:
                raise ForkedTransactionError(
                    f"this block was opened in process {scope.pid} before "
                    f"os.fork(); process {os.getpid()} cannot commit or roll "
                    "it back, so nothing was committed here"
                )
            return
        if self._nested:
            self._exit_nested(scope, exc_type)
            return
        session = self._session
        try:
            if exc_type is None:
                if scope.doomed:
                    raise DoomedTransactionError(
                        "an inner block joined with savepoint=False failed; "
                        "the transaction was rolled back"
                    )
                session.commit()
                if self._debug:
                    logger.debug("block committed: %r", session)
            else:
                _rollback(session, exc)
        except BaseException as error:
            _rollback(session, error)
            raise
        finally:
            scope.depth = 0
            scope.doomed = False
            try:
                session.close()
            except Exception:
                _close_failed(scope, session)
            finally:
                gate = self._gate
                if gate is not None:
                    gate.release()

    def _exit_nested(self, scope: _Scope, exc_type: type[BaseException] | None) -> None:
        scope.depth -= 1
        savepoint = self._sp
        if savepoint is None:  # joined: the outer block must not commit half of it
            if exc_type is not None:
                scope.doomed = True
            return
        if exc_type is None:
            try:
                savepoint.commit()
            except BaseException:
                # RELEASE (or the flush before it) failed: undo the inner work
                # and let the error reach the outer block's code.
                _rollback_savepoint(scope, savepoint)
                raise
            return
        _rollback_savepoint(scope, savepoint)


def _close_failed(scope: _Scope, session: Session) -> None:
    # The scope must not stay wedged on a session that failed to close: drop
    # it, and the scope gets a fresh one on next use.
    logger.error("closing the session after a block failed", exc_info=True)
    if scope.session is session:
        scope.session = None


def _rollback(session: Session, cause: BaseException | None) -> None:
    try:
        session.rollback()
        if logger.isEnabledFor(_DEBUG):
            logger.debug("block rolled back after %r: %r", type(cause).__name__, session)
    except Exception:
        logger.error(
            "rolling back after %s failed; the original error propagates",
            type(cause).__name__,
            exc_info=True,
        )


def _rollback_savepoint(scope: _Scope, savepoint: Any) -> None:
    try:
        savepoint.rollback()
    except Exception:
        scope.doomed = True  # the inner work may still be there: never commit it
        logger.error(
            "rolling back to a savepoint failed; the outer block will roll back",
            exc_info=True,
        )


# -- the shared managers ----------------------------------------------------------

_CACHE_ATTR: Final = "_sparc_sa_transactions"
# Makes sure two threads that first look up one (engine, base) get one manager.
_cache_lock = threading.Lock()


def scoped_transaction(engine: Engine, base: type[Any]) -> ThreadLocalSASessionTransaction:
    """The adapter factory: the one shared manager for *engine* and *base*.

    Managers are cached on the engine, keyed by the base and holding it only
    weakly: dropping the engine drops its managers, and dropping a base drops
    its entry.
    """
    cache = engine.__dict__.get(_CACHE_ATTR)
    if cache is not None:
        entry = cache.get(id(base))
        if entry is not None and entry[0]() is base:
            return entry[1]  # type: ignore[no-any-return]
    return _new_shared(engine, base)


# Declared after the fact: zope's decorators return the function itself, but
# untyped, which would hide its signature from type checkers.
implementer(ISAScopedTransaction)(scoped_transaction)
adapter(ISAEngine, ISADeclarativeMeta)(scoped_transaction)


def _new_shared(engine: Engine, base: type[Any]) -> ThreadLocalSASessionTransaction:
    with _cache_lock:
        cache = engine.__dict__.setdefault(_CACHE_ATTR, {})
        key = id(base)
        entry = cache.get(key)
        if entry is not None and entry[0]() is base:
            return entry[1]  # type: ignore[no-any-return]
        manager = ThreadLocalSASessionTransaction(engine, base)

        def forget(ref: weakref.ref[Any], cache: dict[int, Any] = cache) -> None:
            # Runs as soon as the base dies, before its id can be reused.
            if cache.get(key, (None,))[0] is ref:
                del cache[key]

        cache[key] = (weakref.ref(base, forget), manager)
        return manager


def _after_fork_in_child() -> None:
    # A lock held by a thread at fork time stays held in the child, where that
    # thread does not exist: start the child with fresh ones.
    global _cache_lock, _gate_lock
    _cache_lock = threading.Lock()
    _gate_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
