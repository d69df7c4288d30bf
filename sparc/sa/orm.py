"""The scoped transaction manager: (ISAEngine, ISADeclarativeMeta) -> ISAScopedTransaction.

::

    tx = getMultiAdapter((engine, Base), ISAScopedTransaction)
    with tx() as Session:
        Session.add(obj)            # or tx.session.add(obj)

Scopes
    A *scope* is the running asyncio task when there is one, otherwise the
    current thread. Each scope has its own session, created on first use and
    kept for the scope's lifetime. When a thread or task ends, its session is
    closed at once and its connection returned to the pool.

Blocks
    ``with tx():`` commits on success and rolls back on any exception,
    re-raising it unchanged. The open blocks of a scope form a stack: a block
    opened inside another runs in a SAVEPOINT (or joins the outer transaction
    with ``savepoint=False``), and only the innermost open block may end.
    Entering a block is atomic: it is either fully open or nothing changed.
    The outermost block starts from a fresh view of the database.

Joined mode
    Inside a transaction of the ``transaction`` package (a Zope request),
    blocks join it instead of committing by themselves; see
    :mod:`sparc.sa.joined`.
"""

from __future__ import annotations

import contextvars
import gc
import inspect
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

from sqlalchemy import event as sa_event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, scoped_session, sessionmaker
from sqlalchemy.pool import Pool, SingletonThreadPool, StaticPool
from zope.component import adapter
from zope.interface import implementer

from sparc.sa import fork
from sparc.sa.exceptions import (
    BlockOrderError,
    CrossScopeSessionError,
    DoomedTransactionError,
    ForkedTransactionError,
    InterleavedTransactionError,
    JoinedTransactionError,
    RetryableDatabaseError,
)
from sparc.sa.interfaces import (
    ISADeclarativeMeta,
    ISAEngine,
    ISAScopedSession,
    ISAScopedTransaction,
    ISASession,
)
from sparc.sa.legacy import package_path

if TYPE_CHECKING:
    from asyncio import Task

    from sparc.sa.joined import SessionDataManager

__all__ = [
    "JOIN_MODES",
    "BlockOrderError",
    "CrossScopeSessionError",
    "DoomedTransactionError",
    "ForkedTransactionError",
    "ISAScopedSession",
    "ISAScopedTransaction",
    "ISASession",
    "InterleavedTransactionError",
    "JoinedTransactionError",
    "RetryableDatabaseError",
    "ThreadLocalSASessionTransaction",
    "configure_shared",
    "is_retryable",
    "scoped_transaction",
]

logger = logging.getLogger(__name__)

# A package to the import system, for sparc.sa 1.x's submodule paths
# (``sparc.sa.orm.session``); see sparc.sa.legacy.
__path__ = package_path(__name__)
_DEBUG: Final = logging.DEBUG
_T = TypeVar("_T")
_get_ident = threading.get_ident

#: SQLSTATEs of a transaction the server aborted so that it can be retried.
RETRY_SQLSTATES: Final = frozenset({"40001", "40P01"})
#: MySQL/MariaDB error numbers of the same: deadlock, lock wait timeout,
#: and "record has changed since last read" (MariaDB snapshot isolation).
RETRY_MYSQL_ERRORS: Final = frozenset({1213, 1205, 1020})
#: SQLite's result codes for a lock another connection holds: SQLITE_BUSY
#: and its extended forms (SQLITE_BUSY_RECOVERY, _SNAPSHOT, _TIMEOUT).
RETRY_SQLITE_CODES: Final = frozenset({5, 261, 517, 773})
#: The join modes of :class:`ThreadLocalSASessionTransaction`.
JOIN_MODES: Final = ("auto", "always", "never")
#: How long a block waits for a connection that every thread shares
#: (StaticPool) while another thread's block holds it, unless the pool says.
DEFAULT_GATE_TIMEOUT: Final = 30.0


def is_retryable(error: BaseException) -> bool:
    """True if *error* is a serialization failure, deadlock or lock conflict
    that a fresh transaction may not meet again, or was caused by one.

    A server that aborts the whole transaction for a deadlock (MySQL/MariaDB)
    also drops its savepoints, so rolling back to one then fails: that
    failure, whose context is the deadlock, is retryable too.
    """
    seen: BaseException | None = error
    for _ in range(8):  # the chain of exceptions being handled, not unbounded
        if seen is None:
            return False
        if _retryable_itself(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _retryable_itself(error: BaseException) -> bool:
    if isinstance(error, RetryableDatabaseError):
        return True
    if not isinstance(error, sa_exc.DBAPIError) or error.connection_invalidated:
        return False
    orig = error.orig
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if code in RETRY_SQLSTATES:
        return True
    sqlite_code = getattr(orig, "sqlite_errorcode", None)
    if sqlite_code is not None:
        return sqlite_code in RETRY_SQLITE_CODES
    if type(orig).__module__ == "sqlite3" and str(orig) == "database is locked":
        return True  # Python 3.10's sqlite3 has no error codes
    args: tuple[Any, ...] = getattr(orig, "args", ())
    return bool(args) and type(args[0]) is int and args[0] in RETRY_MYSQL_ERRORS


# -- scopes ---------------------------------------------------------------------


class _Scope:
    """One thread's or task's session and its stack of open blocks."""

    __slots__ = (
        "__weakref__",
        "blocks",
        "doomed",
        "engine",
        "forgotten",
        "interrupted",
        "joined",
        "pid",
        "session",
        "thread",
    )

    def __init__(self, engine: Engine) -> None:
        self.session: Session | None = None
        # The open blocks, outermost first. Held weakly: a block whose `with`
        # statement is gone without its __exit__ having run (interrupted before
        # it began) dies, and its __del__ rolls it back instead of wedging us.
        self.blocks: list[weakref.ref[_Block]] = []
        self.doomed = False  # a joined inner block failed; the outer must roll back
        self.forgotten = False  # inherited across os.fork(): never touch again
        # A block of this scope was interrupted (KeyboardInterrupt and the like):
        # 0 no, 1 yes, 2 yes and inside the engine's pool.
        self.interrupted = 0
        self.joined: SessionDataManager | None = None  # the Zope transaction we are in
        self.pid = os.getpid()
        self.thread = _get_ident()
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
    if scope.blocks or scope.joined is not None:
        # A block of this scope is still open, handed to another thread or
        # task to close, or the session belongs to a Zope transaction that is
        # still running: whoever ends those finishes and resets the session.
        return
    scope.session = None
    if sys.is_finalizing():
        # The interpreter is exiting: the server rolls back what the dying
        # connection held, and modules may already be half torn down.
        return
    gevent = sys.modules.get("gevent")
    if gevent is not None and _in_gevent_hub(gevent):
        # gevent ends a greenlet's locals from its event loop, which must not
        # block; closing may talk to the server (ROLLBACK).
        gevent.spawn(_close_session, scope.engine, session)
        return
    _close_session(scope.engine, session)


def _close_session(engine: Engine, session: Session) -> None:
    try:
        gate = _gate_for(engine.pool)
        if gate is None or not session.in_transaction():
            session.close()
        else:
            gate.close_when_free(session)
    except Exception:
        logger.warning("closing the session of an ended thread or task failed", exc_info=True)


def _in_gevent_hub(gevent: Any) -> bool:
    try:
        return bool(gevent.getcurrent() is gevent.get_hub())
    except Exception:  # pragma: no cover - a half-initialised gevent
        return False


def _link_greenlet(scope: _Scope) -> None:
    """Under gevent's monkey-patching a "thread" is a greenlet, and its
    thread-local lives as long as the Greenlet object does (often held by
    whoever spawned it). Close the scope's session as soon as it ends instead."""
    gevent = sys.modules["gevent"]
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None or not monkey.is_module_patched("threading"):
        return
    current = gevent.getcurrent()
    rawlink = getattr(current, "rawlink", None)
    if rawlink is None:  # the hub, or a raw greenlet: nothing to watch
        return
    ref = weakref.ref(scope)

    def ended(greenlet: Any) -> None:
        found = ref()
        if found is not None:
            _close_abandoned(found)  # from the hub: it spawns the close

    rawlink(ended)


# -- one shared connection --------------------------------------------------------


class _Gate:
    """Serialises blocks on a pool that hands one connection to every thread.

    With StaticPool every session shares one DBAPI connection, so a commit or
    rollback from one thread would end another thread's transaction. Blocks
    therefore take turns. Sessions of ended threads, whose close rolls the
    connection back, are closed only between blocks.

    Ownership is taken with ``dict.setdefault``, one C call that tests and
    sets at once: however a KeyboardInterrupt lands, ``owner`` tells exactly
    whether the gate was taken, so a block that fails to open can give it
    back. The gate may be released by another thread than the one that took
    it (a block closed elsewhere), which rules out an RLock.
    """

    __slots__ = ("_free", "_pending", "_state", "_waiting")

    def __init__(self) -> None:
        self._state: dict[str, Any] = {}  # {"owner": scope} while held
        self._waiting = 0  # threads inside acquire()'s wait loop
        # Reentrant: a block's __del__ (an abandoned block) may release the gate
        # while this thread is inside release() already.
        self._free = threading.Condition(threading.RLock())
        self._pending: list[Session] = []

    @property
    def owner(self) -> object:
        return self._state.get("owner")

    def acquire(self, scope: _Scope, manager: ThreadLocalSASessionTransaction) -> bool:
        """Wait for the connection, at most the manager's gate_timeout."""
        owner = self._state.setdefault("owner", scope)
        if owner is scope:
            return True
        if isinstance(owner, _Scope) and owner.thread == scope.thread:
            # Only this thread runs the holder, so waiting here would wait
            # for ourselves: another task, or another manager, of this thread.
            raise InterleavedTransactionError(
                "another block of this thread (an asyncio task, or a transaction "
                "manager for another Base) holds the engine's single shared "
                "connection; blocks on a StaticPool engine cannot interleave "
                "within one thread"
            )
        timeout = manager.gate_timeout
        deadline = time.monotonic() + timeout
        with self._free:
            self._waiting += 1
            try:
                self._wait(scope, deadline, timeout)
            finally:
                self._waiting -= 1
        return True

    def _wait(self, scope: _Scope, deadline: float, timeout: float) -> None:
        # Counted in _waiting before looking, under the condition's lock: a
        # release() that empties the gate after our look sees the count and
        # notifies; one before it left the gate free for setdefault to take.
        while self._state.setdefault("owner", scope) is not scope:
            left = deadline - time.monotonic()
            if left <= 0:
                raise sa_exc.TimeoutError(
                    f"waited {timeout:.1f} s for the connection that every thread of this "
                    "StaticPool engine shares, while another thread's block held "
                    "it; set the manager's gate_timeout to wait longer, or give "
                    "the engine a pool with more connections"
                )
            self._free.wait(left)

    def held_by(self, scope: object) -> bool:
        return self._state.get("owner") is scope

    def release(self, scope: object) -> None:
        if self._state.get("owner") is not scope:
            return
        while True:
            if self._pending:
                self._close_pending()
            self._state.pop("owner", None)
            if self._waiting:  # only then is the condition's lock worth taking
                with self._free:
                    self._free.notify()
            # A session queued by close_when_free() after our last look is not
            # lost: take the gate back to close it (or the next holder will).
            if not self._pending or self._state.setdefault("owner", self) is not self:
                return
            scope = self

    def _close_pending(self) -> None:
        with self._free:
            pending, self._pending = self._pending, []
        for session in pending:
            _quiet_close(session)

    def close_when_free(self, session: Session) -> None:
        with self._free:
            self._pending.append(session)
        # Queued first, then try to become the one who closes it; if another
        # block holds the connection, its release() closes it.
        if self._state.setdefault("owner", self) is self:
            self.release(self)


class _ThreadGate:
    """The same for SingletonThreadPool, whose connection is shared per thread:
    only the scopes (tasks) of one thread need to take turns, and they cannot
    wait for each other, so a second one is refused."""

    __slots__ = ("_local",)

    def __init__(self) -> None:
        self._local = threading.local()

    def acquire(self, scope: _Scope, manager: ThreadLocalSASessionTransaction) -> bool:
        state = self._local.__dict__
        owner = state.setdefault("owner", scope)
        if owner is scope:
            return True
        raise InterleavedTransactionError(
            "another block of this thread holds its SingletonThreadPool "
            "connection; blocks on that connection cannot interleave"
        )

    def held_by(self, scope: object) -> bool:
        return self._local.__dict__.get("owner") is scope

    def release(self, scope: object) -> None:
        state = self._local.__dict__
        if state.get("owner") is not scope:
            return
        del state["owner"]
        pending = state.pop("pending", None)
        for session in pending or ():
            _quiet_close(session)

    def close_when_free(self, session: Session) -> None:
        state = self._local.__dict__
        if state.get("owner") is None:
            _quiet_close(session)
        else:
            state.setdefault("pending", []).append(session)


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


# -- session bookkeeping ----------------------------------------------------------

# Keys of Session.info. _IN_BLOCK: a block of ours is open on the session.
# _WROTE: the session wrote since its transaction began (flushes, DML).
# _JOINED: the session belongs to a transaction of the `transaction` package.
# _COMMITTING: our data manager is committing it (session.commit() allowed).
_IN_BLOCK: Final = "sparc.sa.in_block"
_WROTE: Final = "sparc.sa.wrote"
_JOINED: Final = "sparc.sa.joined"
_COMMITTING: Final = "sparc.sa.committing"


_REFUSED_COMMIT: Final = (
    "this session belongs to a transaction of the `transaction` package "
    "(a Zope request), which commits it: do not call session.commit(); "
    "end the `with tx():` block, and its work commits when the request "
    "(or transaction.commit()) does"
)


def wrote(session: Session) -> bool:
    """Whether *session* wrote (flushed, or executed anything but a SELECT)
    in the transaction it is in now. Writes are noted with the transaction
    they happened in, so a transaction that ended takes its note along."""
    noted = session.info.get(_WROTE)
    return noted is not None and noted is session.get_transaction()


class JoinedSession(Session):
    """What a session becomes while it belongs to a transaction of the
    ``transaction`` package: its ``commit()`` is refused, except from our data
    manager. Sessions of sparc.sa's managers switch to this class when they
    join and back when the transaction ends, so other sessions pay nothing."""

    def commit(self) -> None:
        if not self.info.get(_COMMITTING):
            raise JoinedTransactionError(_REFUSED_COMMIT)
        super().commit()


# Writes are noted only on sessions used outside blocks, whose next block
# must know whether to end their transaction or carry it on (_idle_session
# installs these on such a session once); blocks need no notes.
_WATCHED: Final = "sparc.sa.watched"


def _note_flush(session: Session, flush_context: Any) -> None:
    session.info[_WROTE] = session.get_transaction()


def _note_execute(state: Any) -> None:
    if not state.is_select:
        state.session.info[_WROTE] = state.session.get_transaction()


def _watch(session: Session) -> None:
    session.info[_WATCHED] = True
    sa_event.listen(session, "after_flush", _note_flush)
    sa_event.listen(session, "do_orm_execute", _note_execute)


# For a manager given a Session class of its own (class_=...).
def _refuse_commit_when_joined(session: Session) -> None:
    info = session.info
    if info.get(_JOINED) and not info.get(_COMMITTING):
        raise JoinedTransactionError(_REFUSED_COMMIT)


def _begin_on_sqlite(session: Session, transaction: Any, connection: Any) -> None:
    """pysqlite (legacy transaction control) begins a transaction only before
    DML, so a block's reads would run outside its transaction: a
    read-modify-write could not be isolated, and a SAVEPOINT outside a
    transaction starts one of its own, whose RELEASE commits. Inside our
    blocks, begin explicitly as soon as the session takes its connection."""
    if not session.info.get(_IN_BLOCK):
        return
    dbapi = connection.connection.dbapi_connection
    if (
        dbapi is not None
        and not dbapi.in_transaction
        and dbapi.isolation_level is not None
        and getattr(dbapi, "autocommit", -1) is not True
    ):
        connection.exec_driver_sql("BEGIN")


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
        if scope is not None and not scope.blocks and scope.joined is None:
            scope.session = None


@implementer(ISAScopedTransaction)
class ThreadLocalSASessionTransaction:
    """Thread- and task-scoped sessions with commit-or-roll-back blocks.

    ``ThreadLocalSASessionTransaction(engine, Base)`` builds a private
    manager; ``getMultiAdapter((engine, Base), ISAScopedTransaction)`` returns
    the one shared by the whole application for that engine and Base.
    Extra keyword arguments are passed to :class:`sqlalchemy.orm.sessionmaker`.

    *join* says whether blocks join a transaction of the ``transaction``
    package (``"auto"``, ``"always"`` or ``"never"``; see
    :mod:`sparc.sa.joined`), and *twophase* whether a joined transaction
    commits with two-phase commit.

    Sessions are made with ``expire_on_commit=False``: every block resets its
    session right after committing, so expiring objects at commit would
    refresh nothing and would only make the block's objects unreadable
    afterwards. Pass ``expire_on_commit=True`` to have that back.

    .. versionchanged:: 2.0
       Scopes are asyncio tasks as well as threads; blocks nest as
       SAVEPOINTs and form a stack; sessions of ended threads are closed at
       once; blocks on a single shared connection take turns; forks are safe;
       :meth:`run`; joining Zope's transaction. ``expire_on_commit``
       defaults to False.
    """

    #: First backoff of :meth:`run`, in seconds; doubled after each attempt.
    retry_delay: float = 0.02
    #: Upper bound of one backoff of :meth:`run`, in seconds.
    retry_max_delay: float = 1.0

    def __init__(
        self,
        engine: Engine,
        base: type[Any],
        *,
        join: str = "auto",
        twophase: bool = False,
        **session_options: Any,
    ) -> None:
        _check_base(base)
        self._join, self._twophase = _check_join(engine, join, twophase)
        self._engine = engine
        self._base_ref = weakref.ref(base)
        self._base_name = f"{base.__module__}.{base.__qualname__}"
        session_options.setdefault("expire_on_commit", False)
        own_class = session_options.get("class_", Session)
        self._session_factory = sessionmaker(bind=engine, **session_options)
        self._local = threading.local()
        self._tasks: dict[Task[Any], _Scope] = {}
        self._Session = scoped_session(self._session_factory)
        self._Session.registry = _Registry(self)  # type: ignore[assignment]
        self._pool: Pool | None = None
        self._gate: _Gate | _ThreadGate | None = None
        # The outermost open block of the current context: a thread or task
        # started from inside a block (asyncio.to_thread, create_task) sees it.
        self._open_block: contextvars.ContextVar[weakref.ref[_Block] | None] = (
            contextvars.ContextVar("sparc.sa open block", default=None)
        )
        self._sqlite_begin = engine.dialect.name == "sqlite" and engine.driver in (
            "pysqlite",
            "pysqlcipher",
        )
        factory = self._session_factory
        # A Session class of the application's own cannot switch to
        # JoinedSession; it gets a listener instead.
        self._switch_class = own_class is Session
        if not self._switch_class:
            sa_event.listen(factory, "before_commit", _refuse_commit_when_joined)
        if self._sqlite_begin and not isinstance(engine.pool, StaticPool):
            # On StaticPool blocks take turns on the one connection, so their
            # reads are isolated without it; nested blocks still begin first.
            sa_event.listen(factory, "after_begin", _begin_on_sqlite)
        fork.track(self)

    def __repr__(self) -> str:
        from sparc.sa.options import hide_dsn

        return (
            f"<{type(self).__name__} engine=Engine({hide_dsn(self._engine.url)}) "
            f"Base={self._base_name} join={self._join!r}>"
        )

    # -- the interface -----------------------------------------------------------

    @property
    def Base(self) -> type[Any] | None:
        """The declarative base; None once it has been garbage-collected."""
        return self._base_ref()

    @property
    def engine(self) -> Engine:
        return self._engine

    @property
    def join(self) -> str:
        """``"auto"``, ``"always"`` or ``"never"``: see :mod:`sparc.sa.joined`."""
        return self._join

    @property
    def twophase(self) -> bool:
        """Whether a joined transaction commits in two phases."""
        return self._twophase

    @property
    def gate_timeout(self) -> float:
        """Seconds a block waits for a connection every thread shares
        (StaticPool): the pool's ``timeout`` if it has one, else 30."""
        timeout = getattr(self._engine.pool, "_timeout", None)
        return float(timeout) if isinstance(timeout, (int, float)) else DEFAULT_GATE_TIMEOUT

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
        if session is not None:
            if scope.blocks:
                return session
            joined = scope.joined
            if joined is not None:
                joined.fresh = False  # used outside a block: it may write
                return session
        return self._idle_session(scope)

    @property
    def scoped_session(self) -> scoped_session[Session]:
        """The ISAScopedSession provider that blocks yield."""
        return self._Session

    def __call__(self, savepoint: bool = True) -> _Block:
        """A block: ``with tx():`` commits on success, rolls back on any
        exception; nested, a SAVEPOINT (or, with ``savepoint=False``, a part
        of the outer transaction)."""
        if savepoint is not True and savepoint is not False:
            raise TypeError(
                f"'savepoint' must be True or False, got {savepoint!r} ({type(savepoint).__name__})"
            )
        return _Block(self, savepoint)

    def run(self, fn: Callable[..., _T], /, *args: Any, attempts: int = 3, **kwargs: Any) -> _T:
        """Call ``fn(session, *args, **kwargs)`` in a block and return its result,
        running the whole block again, up to *attempts* times in all, when
        the database aborts it for a serialization failure or a deadlock.
        Inside an open block, or inside a joined transaction (whose owner
        retries), *fn* runs once in a SAVEPOINT."""
        if type(attempts) is not int or attempts < 1:
            raise ValueError(f"'attempts' must be a positive integer, got {attempts!r}")
        if inspect.iscoroutinefunction(fn) or inspect.isawaitable(fn):
            raise TypeError(
                f"run() calls {fn!r} without awaiting it; for a coroutine function "
                "use the asyncio manager: `await tx.run(fn)` with ISAAsyncScopedTransaction, "
                "or call a plain function"
            )
        scope = self._scope()
        if scope.blocks or scope.joined is not None or self._transaction_to_join() is not None:
            # Retrying an inner block cannot help: the server aborted the
            # whole transaction, which only its owner can restart.
            block = _Block(self, True)
            with block:
                return _no_coroutine(fn(block._session, *args, **kwargs), fn)
        attempt = 1
        while True:
            block = _Block(self, True)
            try:
                with block:
                    return _no_coroutine(fn(block._session, *args, **kwargs), fn)
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
            if "gevent" in sys.modules:
                _link_greenlet(scope)
        return scope

    def _existing_scope(self) -> _Scope | None:
        if _get_running_loop() is not None:
            task = _current_task()
            if task is not None:
                return self._tasks.get(task)
        scope: _Scope | None = getattr(self._local, "scope", None)
        return scope

    def _idle_session(self, scope: _Scope) -> Session:
        """The session of a scope with no open block."""
        ref = self._open_block.get()
        opened = None if ref is None else ref()
        if opened is not None and opened._scope is not scope and opened._state is _OPEN:
            raise CrossScopeSessionError(
                "transaction.session was used outside any block in a thread or task "
                "started from inside another thread's or task's block (asyncio.to_thread, "
                "create_task...): it is not that block's session, and its work would be "
                "committed later by an unrelated block. Pass the block's session to the "
                "worker, or open a block (`with tx():`) in the worker"
            )
        session = scope.session
        if session is None:
            session = scope.session = self._session_factory()
        if _WATCHED not in session.info:
            _watch(session)
        return session

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
        self._open_block = contextvars.ContextVar("sparc.sa open block", default=None)
        # A gate inherited in a held state would block the child forever.
        self._engine.pool.__dict__.pop(_GATE_ATTR, None)
        self._pool = None

    def _begin_nested(self, session: Session) -> Any:
        """``session.begin_nested()``, on pysqlite inside a transaction: a
        SAVEPOINT outside one starts a transaction of its own, whose RELEASE
        commits, so the outer block could no longer roll it back."""
        if self._sqlite_begin:
            connection = session.connection()
            _begin_on_sqlite(session, None, connection)
        return session.begin_nested()

    def _refresh_gate(self, pool: Pool) -> _Gate | _ThreadGate | None:
        # First use, or the engine was disposed and has a new pool.
        self._gate = _gate_for(pool)
        self._pool = pool
        return self._gate

    def _current_gate(self) -> _Gate | _ThreadGate | None:
        pool = self._engine.pool
        return self._gate if pool is self._pool else self._refresh_gate(pool)

    def _transaction_to_join(self) -> Any:
        """The transaction of the ``transaction`` package that blocks of this
        scope join now, or None."""
        if self._join == "never" or (self._join == "auto" and "transaction" not in sys.modules):
            return None  # nobody imported it, so no transaction is running
        return _joined.transaction_to_join(self._join)

    def _freshen(self, session: Session) -> None:
        """Give an outermost block a view no older than its start.

        A scope used outside any block may hold a transaction: a snapshot and
        loaded objects. Only reads: end it, and every object reloads on next
        access. Writes (pending objects, flushes, DML): they keep their 1.x
        fate and are committed by this block, in their own transaction; the
        loaded objects are still refreshed.
        """
        if session.info.pop(_IN_BLOCK, None):
            # A block's exit was interrupted before it reset the session: what
            # it holds is that block's, which raised, so it is discarded.
            session.rollback()
            return
        if not session.in_transaction():
            return
        if wrote(session) or session.new or session.deleted or session.dirty:
            session.flush()
            session.expire_all()
            if logger.isEnabledFor(_DEBUG):
                logger.debug("block continues writes made outside any block: %r", session)
            return
        session.rollback()


def _check_join(engine: Engine, join: object, twophase: object) -> tuple[str, bool]:
    if join not in JOIN_MODES:
        raise ValueError(f"'join' must be one of 'auto', 'always' or 'never', got {join!r}")
    if twophase is not True and twophase is not False:
        raise TypeError(f"'twophase' must be True or False, got {twophase!r}")
    if twophase and engine.dialect.name == "sqlite":
        raise ValueError(
            "'twophase' is not supported by SQLite, which has no prepared "
            "transactions; use join without twophase on SQLite"
        )
    if twophase and join == "never":
        raise ValueError(
            "'twophase' applies to joined transactions; it needs join 'auto' or 'always'"
        )
    if join == "always":
        try:
            import transaction  # noqa: F401
        except ImportError:
            raise ImportError(
                "join='always' joins the transaction of the `transaction` package, "
                "which is not installed: pip install transaction"
            ) from None
    return str(join), bool(twophase)


def _check_base(base: object) -> None:
    if not isinstance(base, type):
        raise TypeError(f"expected a declarative base class, got {type(base).__name__} {base!r}")
    if "__mapper__" in vars(base) or "__table__" in vars(base):
        raise TypeError(
            f"{base.__module__}.{base.__qualname__} is a mapped model class; a "
            "transaction manager serves a declarative base: pass the Base the "
            "models derive from (declarative_base(), or a DeclarativeBase subclass)"
        )


def _no_coroutine(result: _T, fn: Any) -> _T:
    if inspect.isawaitable(result):
        close = getattr(result, "close", None)
        if close is not None:
            close()
        raise TypeError(
            f"run() got an awaitable from {fn!r}; the block was rolled back. For "
            "asynchronous work use the asyncio manager: `await tx.run(fn)`"
        )
    return result


_ABANDONED: Final = (
    "a generator was closed while suspended inside its block, so the block "
    "rolled back, and with it %d inner block(s) that had ended normally "
    "meanwhile (blocks opened on this thread while the generator was suspended "
    "nest in its block); close such generators before opening other blocks"
)


#: The "savepoint" of a joined block that is alone in its SQL transaction.
WHOLE_TRANSACTION: Final = object()


class _Abandoned(BaseException):
    """The exit of a block whose `with` statement is gone."""


# The states of a block.
_NEW: Final = 0
_OPEN: Final = 1
_DONE: Final = 2
_CANCELLED: Final = 3  # rolled back when an outer block ended before it


class _Block:
    """One ``with tx():`` block."""

    __slots__ = (
        "__weakref__",
        "_debug",
        "_dm",
        "_gate",
        "_inner_done",
        "_manager",
        "_nested_",
        "_ref",
        "_savepoint",
        "_scope",
        "_session",
        "_sp",
        "_state",
        "_token",
    )

    def __init__(self, manager: ThreadLocalSASessionTransaction, savepoint: bool) -> None:
        self._manager = manager
        self._savepoint = savepoint
        self._state = _NEW
        self._scope: _Scope | None = None
        self._token: contextvars.Token[weakref.ref[_Block] | None] | None = None
        self._sp: Any = None  # the SAVEPOINT's SessionTransaction
        self._dm: SessionDataManager | None = None
        self._gate: _Gate | _ThreadGate | None = None
        self._debug = False
        self._inner_done = 0  # inner blocks that ended normally inside this one
        self._session: Any = None
        self._nested_ = False
        self._ref = weakref.ref(self)

    # __enter__ and __exit__ run on every transaction: the common case (a
    # thread outside asyncio, a pool of its own connections, no debug log) is
    # written out inline rather than through helper calls.

    def __enter__(self) -> scoped_session[Session]:
        if self._state is not _NEW:
            raise RuntimeError("a block can be entered once; call tx() for each block")
        manager = self._manager
        scope: _Scope
        if _get_running_loop() is None:
            try:
                scope = manager._local.scope
            except AttributeError:
                scope = manager._scope()
        else:
            scope = manager._scope()
        blocks = scope.blocks
        if blocks:
            self._enter_nested(scope, blocks)
            return manager._Session
        if scope.interrupted:
            _after_interruption(scope)
        self._scope = scope
        dm = scope.joined
        if dm is not None:
            self._enter_joined(scope, dm.txn)
            return manager._Session
        join = manager._join
        if join != "never":
            # Inline, as it runs for every block: is a transaction of the
            # `transaction` package running for this thread? (sparc.sa.joined)
            module = sys.modules.get("transaction")
            running = False
            if module is not None:
                tm = module.manager  # the thread's TransactionManager is tm.manager
                running = getattr(tm, "manager", tm).__dict__.get("_txn") is not None
            if running or join == "always":
                txn = _joined.transaction_to_join(join)
                if txn is not None:
                    self._enter_joined(scope, txn)
                    return manager._Session
        pool = manager._engine.pool
        gate = manager._gate if pool is manager._pool else manager._refresh_gate(pool)
        # From here on every step is undone if an exception (a KeyboardInterrupt
        # from a signal, say) lands before the block is fully open.
        try:
            if gate is not None:
                gate.acquire(scope, manager)
            self._gate = gate
            session = scope.session
            if session is None:
                session = scope.session = manager._session_factory()
            elif session.in_transaction() or _IN_BLOCK in session.info:
                manager._freshen(session)
            self._session = session
            session.info[_IN_BLOCK] = True
            self._token = manager._open_block.set(self._ref)
            debug = self._debug = logger.isEnabledFor(_DEBUG)
            blocks.append(self._ref)  # the block is open
            self._state = _OPEN
        except BaseException:
            self._abandon_entry(scope, gate)
            raise
        if debug:
            logger.debug("block entered: %r in %r", session, manager)
        return manager._Session

    def __del__(self) -> None:
        # Runs for every block, so the common case (ended) is kept short.
        # getattr: __init__ itself may have been interrupted.
        state = getattr(self, "_state", _NEW)
        if state is not _OPEN:
            gate = getattr(self, "_gate", None)
            if gate is not None:
                scope = self._scope
                if scope is not None and not scope.blocks and gate.held_by(scope):
                    gate.release(scope)  # left held by an interrupted exit
            return
        # Still open, yet nobody holds it: its `with` statement was left
        # without __exit__ running (an interruption before its first line).
        # End it as if it had raised, so that the scope is not wedged.
        # Exceptions cannot leave __del__; an interruption here is logged.
        try:
            self.__exit__(_Abandoned, None, None)
        except BlockOrderError:
            pass
        except BaseException:
            logger.error("ending an abandoned block failed", exc_info=True)

    def _abandon_entry(self, scope: _Scope, gate: _Gate | _ThreadGate | None) -> None:
        self._state = _NEW
        error = sys.exc_info()[1]
        if error is not None and not isinstance(error, Exception):
            _note_interruption(scope, error.__traceback__)
        if self._session is not None:
            self._session.info.pop(_IN_BLOCK, None)
        if scope.blocks and scope.blocks[-1] is self._ref:
            scope.blocks.pop()
        token = self._token
        if token is not None:
            self._manager._open_block.reset(token)
            self._token = None
        if gate is not None:
            gate.release(scope)

    def _enter_nested(self, scope: _Scope, blocks: list[weakref.ref[_Block]]) -> None:
        top = blocks[-1]()
        if top is None or top._state is not _OPEN:
            _prune(scope, blocks)
            if not blocks:
                raise RuntimeError("stale blocks")  # pragma: no cover - see _prune
        self._nested_ = True
        outer = blocks[0]()
        if outer is None:
            raise RuntimeError("the outer block was abandoned")  # pragma: no cover
        session = outer._session
        self._scope = scope
        self._session = session
        self._debug = outer._debug
        if not self._savepoint:
            self._sp = None
            blocks.append(self._ref)
            self._state = _OPEN
            return
        before = session.get_nested_transaction()
        try:
            self._sp = self._manager._begin_nested(session)
            blocks.append(self._ref)
            self._state = _OPEN
        except BaseException:
            if blocks[-1] is self._ref:
                blocks.pop()
            self._state = _NEW
            made = session.get_nested_transaction()
            if made is not None and made is not before:
                _rollback_savepoint(scope, made)
            raise

    def _enter_joined(self, scope: _Scope, txn: Any) -> None:
        """The outermost block of a scope inside a transaction of the
        ``transaction`` package: it runs in a SAVEPOINT of that transaction,
        or, while nothing has been written in it yet, in the whole of it."""
        manager = self._manager
        dm = scope.joined
        try:
            if dm is None:
                dm = _joined.join_scope(manager, scope, txn)
            self._dm = dm
            session = self._session = dm.session
            session.info[_IN_BLOCK] = True
            self._debug = logger.isEnabledFor(_DEBUG)
            before = session.get_nested_transaction()
            try:
                if self._savepoint:
                    if dm.fresh and session._is_clean():
                        # Nothing written yet in this transaction: rolling it
                        # back whole undoes exactly this block, so the two
                        # round trips of a SAVEPOINT and its RELEASE are saved.
                        self._sp = WHOLE_TRANSACTION
                    else:
                        self._sp = manager._begin_nested(session)
                self._token = manager._open_block.set(self._ref)
                scope.blocks.append(self._ref)
                self._state = _OPEN
            except BaseException:
                made = session.get_nested_transaction()
                if made is not None and made is not before:
                    _rollback_savepoint(scope, made)
                raise
        except BaseException:
            self._state = _NEW
            if scope.blocks and scope.blocks[-1] is self._ref:
                scope.blocks.pop()
            if self._token is not None:
                manager._open_block.reset(self._token)
            raise
        if self._debug:
            logger.debug("joined block entered: %r in %r", session, manager)

    async def __aenter__(self) -> Any:
        raise TypeError(
            "`async with tx()` needs an asyncio manager, which sparc.sa does not "
            "have yet; this manager's blocks are synchronous: use `with tx():`, "
            "which works inside a coroutine too, scoped to its task"
        )

    async def __aexit__(self, *exc_info: Any) -> None:  # pragma: no cover - never entered
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._state is not _OPEN:
            self._exit_closed(exc_type)
            return
        scope = self._scope
        assert scope is not None
        if exc_type is not None and not issubclass(exc_type, Exception):
            _note_interruption(scope, tb)
        if scope.forgotten:
            # The block was opened before os.fork() and this is the child.
            self._state = _DONE
            if exc_type is None:
                raise ForkedTransactionError(
                    f"this block was opened in process {scope.pid} before "
                    f"os.fork(); process {os.getpid()} cannot commit or roll "
                    "it back, so nothing was committed here"
                )
            return
        blocks = scope.blocks
        if not blocks or self._ref not in blocks:
            # Open, but no longer on the stack: an earlier exit was interrupted
            # after it had taken the block off. Finish what it began.
            self._state = _DONE
            if self._nested_:
                if self._sp is not None and self._sp.is_active:
                    _rollback_savepoint(scope, self._sp)
            elif self._dm is None:
                _rollback(self._session, None)
                self._close(scope, self._session)
            return
        if blocks[-1] is not self._ref:
            _prune(scope, blocks)
        if blocks[-1] is not self._ref:
            _exit_out_of_order(self, scope, blocks)
        if len(blocks) > 1:
            self._exit_nested(scope, blocks, exc_type)
            return
        if self._dm is not None:
            self._exit_joined(scope, exc_type, exc)
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
                if exc_type is GeneratorExit and self._inner_done:
                    raise BlockOrderError(_ABANDONED % self._inner_done)
        except BaseException as error:
            if not isinstance(error, Exception):
                _note_interruption(scope, error.__traceback__)
            _rollback(session, error)
            raise
        finally:
            in_flight = sys.exc_info()[1]  # what is propagating, if anything
            if in_flight is not None and not isinstance(in_flight, Exception):
                _note_interruption(scope, in_flight.__traceback__)
            # Each step runs even if the one before it is interrupted. An
            # interruption before the stack is emptied leaves this block open
            # and unreachable: __del__ ends it. One before the session is
            # closed leaves the session marked, and the next block discards
            # what it holds instead of carrying it on.
            try:
                blocks.clear()
                self._state = _DONE
                scope.doomed = False
            finally:
                self._close(scope, session)

    def _close(self, scope: _Scope, session: Session) -> None:
        """Reset the session and give the gate and context back."""
        try:
            try:
                session.close()
            except BaseException as error:
                # Interrupted half-way (a KeyboardInterrupt, say): closing
                # again finishes the job, so the connection goes back to the
                # pool; then the interruption propagates.
                if not isinstance(error, Exception):
                    _note_interruption(scope, error.__traceback__)
                session.close()
                raise
            session.info.pop(_IN_BLOCK, None)  # finished: nothing left to discard
        except Exception:
            _close_failed(scope, session)
        finally:
            try:
                self._leave_context()
            finally:
                gate = self._gate
                if gate is not None:
                    gate.release(scope)

    def _exit_closed(self, exc_type: type[BaseException] | None) -> None:
        if self._state is _CANCELLED:
            self._state = _DONE
            scope = self._scope
            if scope is not None and not scope.blocks and scope.joined is None:
                # Whatever this block's code did after the scope was reset
                # belongs to no block: do not leave it for the next one.
                session = scope.session
                if session is not None and session.in_transaction():
                    _rollback(session, None)
            raise BlockOrderError(
                "this block was rolled back, not committed: a block around it "
                "ended while it was still open (blocks of one thread or task "
                "must end innermost first; a generator suspended inside a block "
                "keeps that block open)"
            )
        if self._state is _NEW:
            raise RuntimeError("this block was never entered")
        raise RuntimeError("this block has already ended")

    def _exit_nested(
        self,
        scope: _Scope,
        blocks: list[weakref.ref[_Block]],
        exc_type: type[BaseException] | None,
    ) -> None:
        blocks.pop()
        self._state = _DONE
        outer = blocks[0]() if blocks else None
        savepoint = self._sp
        if savepoint is None:  # joined: the outer block must not commit half of it
            if exc_type is not None:
                scope.doomed = True
            elif outer is not None:
                outer._inner_done += 1
            return
        if exc_type is None:
            try:
                _release(savepoint, self._session)
            except BaseException:
                # RELEASE (or the flush before it) failed: undo the inner work
                # and let the error reach the outer block's code.
                _rollback_savepoint(scope, savepoint)
                raise
            if outer is not None:
                outer._inner_done += 1
            return
        _rollback_savepoint(scope, savepoint)

    def _leave_context(self) -> None:
        """Forget this block as the open block of its context."""
        token = self._token
        if token is not None:
            self._token = None
            try:  # noqa: SIM105 - cheaper than contextlib.suppress()
                self._manager._open_block.reset(token)
            except ValueError:
                pass  # closed from another context than it opened in

    def _exit_joined(
        self, scope: _Scope, exc_type: type[BaseException] | None, exc: BaseException | None
    ) -> None:
        self._state = _DONE
        scope.blocks.clear()
        doomed, scope.doomed = scope.doomed, False
        self._leave_context()
        _joined.finish_joined_block(self, scope, exc_type, exc, doomed)


def _note_interruption(scope: _Scope, tb: TracebackType | None) -> None:
    in_pool = False
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename.replace(os.sep, "/")
        if "/sqlalchemy/pool/" in name or name.endswith("/sqlalchemy/util/queue.py"):
            in_pool = True
            break
        tb = tb.tb_next
    scope.interrupted = max(scope.interrupted, 2 if in_pool else 1)


def _after_interruption(scope: _Scope) -> None:
    """The first outermost block after an interruption (KeyboardInterrupt,
    SystemExit...) of this scope.

    An interruption that lands inside SQLAlchemy's connection handling can
    leave a connection that nothing refers to but a reference cycle, holding
    its locks until the garbage collector runs SQLAlchemy's finaliser, which
    rolls it back and returns it; by now the interrupted code's exception is
    gone, so collect. One that lands inside the pool itself can lose a
    connection from the pool's bookkeeping for good: replace the pool. Other
    threads' checked-out connections go on working and are discarded when
    returned."""
    where = "inside the connection pool" if scope.interrupted == 2 else "during a block"
    scope.interrupted = 0
    gc.collect()
    if _gate_for(scope.engine.pool) is not None:
        return  # one shared connection: it is the database (in-memory SQLite), keep it
    # Where an interruption lands is not always known (one inside a
    # finaliser is swallowed by Python), so the pool is replaced after any.
    logger.warning(
        "a block was interrupted %s; replacing the pool of %r so that no "
        "connection is lost from its count",
        where,
        scope.engine,
    )
    scope.engine.dispose()


def _prune(scope: _Scope, blocks: list[weakref.ref[_Block]]) -> None:
    """Drop entries an interrupted exit left on top of the stack: blocks that
    ended, or whose finaliser already rolled them back."""
    while len(blocks) > 1:
        top = blocks[-1]()
        if top is not None and top._state is _OPEN:
            return
        blocks.pop()
        if top is not None and top._sp is not None and top._sp.is_active:
            _rollback_savepoint(scope, top._sp)


def _exit_out_of_order(block: _Block, scope: _Scope, refs: list[weakref.ref[_Block]]) -> None:
    """*block* ends while blocks opened after it are still open: roll the
    whole transaction back, cancel every open block of the scope, and say so."""
    inner = len(refs) - 1 - refs.index(block._ref)
    blocks = [ref() for ref in refs]
    outermost = blocks[0] or block
    for other in blocks:
        if other is not None:
            other._state = _CANCELLED
    block._state = _DONE
    refs.clear()
    scope.doomed = False
    session = outermost._session
    dm = outermost._dm
    if dm is not None:
        dm.doom("blocks of one scope ended out of order")
    else:
        _rollback(session, None)
        outermost._close(scope, session)
    raise BlockOrderError(
        f"a block ended while {inner} block(s) opened inside it were still open; "
        "the transaction was rolled back, not committed (blocks of one thread or "
        "task must end innermost first; a generator suspended inside a block keeps "
        "that block open)"
    )


def _close_failed(scope: _Scope, session: Session) -> None:
    # The scope must not stay wedged on a session that failed to close: drop
    # it, and the scope gets a fresh one on next use.
    logger.error("closing the session after a block failed", exc_info=True)
    if scope.session is session:
        scope.session = None


def _release(savepoint: Any, session: Session) -> None:
    """Flush and RELEASE a SAVEPOINT; our own doing, so not refused inside a
    joined transaction as a user's session.commit() is."""
    info = session.info
    info[_COMMITTING] = True
    try:
        savepoint.commit()
    finally:
        info.pop(_COMMITTING, None)


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
    _check_base(base)
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


def configure_shared(
    manager: ThreadLocalSASessionTransaction,
    join: str | None,
    twophase: bool | None,
    where: str,
) -> None:
    """Set the join mode of a shared manager, as ``<sa:transaction>`` does.

    Two configurations that disagree about one engine and base are an error
    that names where the first one was made.
    """
    wanted_join = manager._join if join is None else join
    wanted_two = manager._twophase if twophase is None else twophase
    first = manager.__dict__.get("_configured_at")
    if first is not None and (wanted_join, wanted_two) != (manager._join, manager._twophase):
        raise ValueError(
            f"join={wanted_join!r} twophase={wanted_two} disagrees with "
            f"join={manager._join!r} twophase={manager._twophase} set for the same "
            f"engine and base at {first}"
        )
    manager._join, manager._twophase = _check_join(manager._engine, wanted_join, wanted_two)
    if first is None:
        manager.__dict__["_configured_at"] = " ".join(where.split())


def _after_fork_in_child() -> None:
    # A lock held by a thread at fork time stays held in the child, where that
    # thread does not exist: start the child with fresh ones.
    global _cache_lock, _gate_lock
    _cache_lock = threading.Lock()
    _gate_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


# Last: joined.py builds on this module.
from sparc.sa import joined as _joined  # noqa: E402
