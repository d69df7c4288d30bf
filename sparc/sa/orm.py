"""The scoped transaction manager: (ISAEngine, ISADeclarativeMeta) -> ISAScopedTransaction.

::

    tx = getMultiAdapter((engine, Base), ISAScopedTransaction)
    with tx() as Session:
        Session.add(obj)            # or tx.session.add(obj)

Scopes
    A *scope* is the running asyncio task when there is one, otherwise the
    current thread. Each scope has its own session, created on first use and
    kept for the scope's lifetime. When a thread or task ends, its session is
    closed at once and its connection returned to the pool
    (:mod:`sparc.sa.tx.scope`).

Blocks
    ``with tx():`` commits on success and rolls back on any exception,
    re-raising it unchanged. The open blocks of a scope form a stack: a block
    opened inside another runs in a SAVEPOINT (or joins the outer transaction
    with ``savepoint=False``), and only the innermost open block may end.
    Entering a block is atomic: it is either fully open or nothing changed.
    The outermost block starts from a fresh view of the database
    (:mod:`sparc.sa.tx.block`).

Joined mode
    Inside a transaction of the ``transaction`` package (a Zope request),
    blocks join it instead of committing by themselves; see
    :mod:`sparc.sa.tx.joined`.

This module holds the manager and the adapter; the parts they are built from
each have a module of their own (see DEVELOPERS.md, "Layout").
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import sys
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, TypeVar

from sqlalchemy import event as sa_event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, scoped_session, sessionmaker
from sqlalchemy.pool import StaticPool
from zope.component import adapter
from zope.interface import implementer

from sparc.sa.connections import fork, resets
from sparc.sa.connections.keep import keep_shared_connection
from sparc.sa.exceptions import (
    BlockOrderError,
    CrossScopeSessionError,
    DoomedTransactionError,
    ForkedTransactionError,
    InterleavedTransactionError,
    JoinedTransactionError,
    RetryableDatabaseError,
)
from sparc.sa.foreign.of_asyncio import running_loop
from sparc.sa.foreign.of_transaction import RUNNING
from sparc.sa.interfaces import (
    ISADeclarativeMeta,
    ISAEngine,
    ISAScopedSession,
    ISAScopedTransaction,
    ISASession,
)
from sparc.sa.legacy import package_path
from sparc.sa.replicas.positions import check_readonly_arguments
from sparc.sa.replicas.readonly import ReadOnlyBlock, run_readonly
from sparc.sa.replicas.tokens import commit_token
from sparc.sa.tx import begun, cache, joined, sessions
from sparc.sa.tx.block import Block
from sparc.sa.tx.cache import check_base
from sparc.sa.tx.datamanager import ENDED, guard, hand_out
from sparc.sa.tx.gate import Gate, GateCache, ThreadGate, forget_gate, gate_timeout
from sparc.sa.tx.retry import (
    RETRY_MYSQL_ERRORS,
    RETRY_SQLITE_CODES,
    RETRY_SQLSTATES,
    check_attempts,
    delay_before_next,
    is_retryable,
)
from sparc.sa.tx.scope import Scope, ScopeRegistry

if TYPE_CHECKING:
    from asyncio import Task

__all__ = [
    "JOIN_MODES",
    "RETRY_MYSQL_ERRORS",
    "RETRY_SQLITE_CODES",
    "RETRY_SQLSTATES",
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
    "configure_transaction",
    "is_retryable",
    "scoped_transaction",
]

logger = logging.getLogger(__name__)

# A package to the import system, for sparc.sa 1.x's submodule paths
# (``sparc.sa.orm.session``); see sparc.sa.legacy.
__path__ = package_path(__name__)
_T = TypeVar("_T")

#: The join modes of :class:`ThreadLocalSASessionTransaction`.
JOIN_MODES: Final = ("auto", "always", "never")


class _Registry:
    """The registry behind the yielded ``scoped_session``: the current scope's
    session, with the interface SQLAlchemy's ScopedRegistry offers."""

    __slots__ = ("_manager",)

    def __init__(self, manager: ThreadLocalSASessionTransaction) -> None:
        self._manager = manager

    def __call__(self) -> Session:
        return self._manager.session

    def has(self) -> bool:
        scope = self._manager.scopes.existing()
        return scope is not None and scope.session is not None

    def set(self, session: Session) -> None:
        scope = self._manager.scopes.current()
        scope.session = session

    def clear(self) -> None:
        scope = self._manager.scopes.existing()
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
    :mod:`sparc.sa.tx.joined`), and *twophase* whether a joined transaction
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
        check_base(base)
        self._join, self._twophase = _check_join(engine, join, twophase)
        self._engine = engine
        self._base_ref = weakref.ref(base)
        self._base_name = f"{base.__module__}.{base.__qualname__}"
        session_options.setdefault("expire_on_commit", False)
        own_class = session_options.setdefault("class_", sessions.BlockSession)
        factory = self.new_session = sessionmaker(bind=engine, **session_options)
        self.scopes = ScopeRegistry(engine)
        self._Session = scoped_session(factory)
        self._Session.registry = _Registry(self)  # type: ignore[assignment]
        self.gates = GateCache()
        # The outermost open block of the current context: a thread or task
        # started from inside a block (asyncio.to_thread, create_task) sees it.
        self.open_block: contextvars.ContextVar[weakref.ref[Block] | None] = contextvars.ContextVar(
            "sparc.sa open block", default=None
        )
        #: pysqlite begins only before DML: blocks send BEGIN themselves.
        self.sqlite_begin = engine.dialect.name == "sqlite" and engine.driver in (
            "pysqlite",
            "pysqlcipher",
        )
        # A Session class of the application's own cannot switch to
        # JoinedSession; it gets a listener instead.
        self.switches_class = own_class in (Session, sessions.BlockSession)
        #: PostgreSQL via psycopg: a transaction the server aborted is never
        #: COMMITted (which would silently roll it back).
        self.checks_aborted = sessions.checks_aborted(engine)
        if not self.switches_class:
            sa_event.listen(factory, "before_commit", sessions.refuse_commit_when_joined)
        if self.sqlite_begin and not isinstance(engine.pool, StaticPool):
            # On StaticPool blocks take turns on the one connection, so their
            # reads are isolated without it; nested blocks still begin first.
            sa_event.listen(factory, "after_begin", sessions.begin_on_sqlite)
        # No pool reset ROLLBACK after a COMMIT or ROLLBACK of these sessions
        # (BlockSession marks its connections; another class gets a listener).
        resets.install(engine)
        if not issubclass(own_class, sessions.BlockSession):
            sa_event.listen(factory, "after_begin", resets.note_session_transaction)
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
        """``"auto"``, ``"always"`` or ``"never"``: see :mod:`sparc.sa.tx.joined`."""
        return self._join

    @property
    def twophase(self) -> bool:
        """Whether a joined transaction commits in two phases."""
        return self._twophase

    @property
    def gate_timeout(self) -> float:
        """Seconds a block waits for a connection every thread shares
        (StaticPool): the pool's ``timeout`` if it has one, else 30."""
        return gate_timeout(self._engine.pool)

    @property
    def session(self) -> Session:
        """The current scope's session."""
        scope: Scope
        if running_loop() is None:  # the common case, inline
            try:
                scope = self.scopes.local.scope
            except AttributeError:
                scope = self.scopes.current()
        else:
            scope = self.scopes.current()
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
    def commit_token(self) -> str | None:
        """The WAL position of this scope's latest commit on an engine with
        replicas, as a string for ``tx(readonly=True, after=token)`` in another
        scope, request or process; None when this scope wrote nothing."""
        return commit_token(self._engine)

    @property
    def scoped_session(self) -> scoped_session[Session]:
        """The ISAScopedSession provider that blocks yield."""
        return self._Session

    def __call__(
        self,
        savepoint: bool = True,
        *,
        transaction_manager: Any = None,
        readonly: bool = False,
        after: str | None = None,
        isolation_level: str | None = None,
    ) -> Any:
        """A block: ``with tx():`` commits on success, rolls back on any
        exception; nested, a SAVEPOINT (or, with ``savepoint=False``, a part
        of the outer transaction).

        *transaction_manager*: a manager of the ``transaction`` package whose
        current transaction the block joins (``tm.get()``), instead of the
        thread's ``transaction.manager``, as
        ``zope.sqlalchemy.register(session, transaction_manager=tm)`` does.

        ``tx(readonly=True)`` is a read-only block: on a replica that has
        replayed this scope's own writes (and the commit token *after*) when
        the engine has replicas, else on the primary in a READ ONLY
        transaction; see :mod:`sparc.sa.replicas.readonly`.

        *isolation_level* (``"SERIALIZABLE"``, ``"REPEATABLE READ"``,
        ``"READ COMMITTED"``, ...): the level the block's transaction runs at,
        set before it begins, for this block only. A nested block, or a block
        joining a transaction that runs already, may only name the level in
        force; anything else raises
        :class:`~sparc.sa.exceptions.IsolationLevelError`, as do execution
        options given to ``session.connection()`` once the transaction has
        begun (SQLAlchemy would ignore them with a warning).

        .. versionchanged:: 2.0
           *transaction_manager*, *readonly*, *after*, *isolation_level*.
        """
        isolation = sessions.check_isolation(isolation_level)
        if readonly or after is not None:
            _no_isolation_when_readonly(isolation)
            return _readonly_block(self, readonly, after)
        if savepoint is not True and savepoint is not False:
            raise TypeError(
                f"'savepoint' must be True or False, got {savepoint!r} ({type(savepoint).__name__})"
            )
        if transaction_manager is not None:
            _check_manager(transaction_manager, self._join)
        return Block(self, savepoint, transaction_manager, False, isolation)

    def run(
        self,
        fn: Callable[..., _T],
        /,
        *args: Any,
        attempts: int = 3,
        readonly: bool = False,
        after: str | None = None,
        isolation_level: str | None = None,
        transaction_manager: Any = None,
        **kwargs: Any,
    ) -> _T:
        """Call ``fn(session, *args, **kwargs)`` in a block and return its result,
        running the whole block again, up to *attempts* times in all, when
        the database aborts it for a serialization failure or a deadlock.
        Inside an open block, or inside a joined transaction (whose owner
        retries), *fn* runs once in a SAVEPOINT.

        With ``readonly=True`` the block is read-only (see :meth:`__call__`),
        and a read whose replica dies under it runs once more elsewhere.
        *isolation_level* and *transaction_manager* are the block's, as for
        :meth:`__call__`; with a *transaction_manager* the block joins its
        transaction, whose owner retries, so *fn* runs once."""
        isolation = sessions.check_isolation(isolation_level)
        if readonly or after is not None:
            _no_isolation_when_readonly(isolation)
            _readonly_block(self, readonly, after)  # checks the arguments
            return run_readonly(self, fn, args, kwargs, attempts, after)
        if transaction_manager is not None:
            _check_manager(transaction_manager, self._join)
        return _run(
            self, fn, args, kwargs, check_attempts(attempts), isolation, transaction_manager
        )

    # -- scopes --------------------------------------------------------------------

    def _scope(self) -> Scope:
        """The current task's or thread's scope, made on first use."""
        return self.scopes.current()

    def _existing_scope(self) -> Scope | None:
        return self.scopes.existing()

    @property
    def _tasks(self) -> dict[Task[Any], Scope]:
        return self.scopes.tasks

    def _idle_session(self, scope: Scope) -> Session:
        """The session of a scope with no open block."""
        ref = self.open_block.get()
        opened = None if ref is None else ref()
        if opened is not None and opened.is_open_elsewhere(scope):
            raise CrossScopeSessionError(
                "transaction.session was used outside any block in a thread or task "
                "started from inside another thread's or task's block (asyncio.to_thread, "
                "create_task...): it is not that block's session, and its work would be "
                "committed later by an unrelated block. Pass the block's session to the "
                "worker, or open a block (`with tx():`) in the worker"
            )
        if self._join != "never" and not scope.forgotten:
            txn = self._running_transaction(scope)
            if txn is not None:
                # Used outside any block while the application's transaction
                # runs (request.dbsession.add() in a view): the session goes
                # with that transaction, committed or aborted with it, as
                # zope.sqlalchemy's registered session does.
                keep_shared_connection(self._engine)  # as a joined block does
                dm = joined.join_scope(self, scope, txn)
                dm.fresh = False  # it may write outside any block
                return dm.session
        session = scope.session
        if session is None:
            session = scope.session = self.new_session()
        info = session.info
        if sessions.WATCHED not in info:
            sessions.watch(session)
        if joined.request_ended():
            # A Pyramid request whose transaction has ended (its finished
            # callbacks): the next request on this thread would commit writes
            # made now outside any block. Refuse them.
            guard(session)
        elif ENDED in info:
            hand_out(session)
        return session

    def _running_transaction(self, scope: Scope) -> Any:
        """The transaction of the ``transaction`` package that this scope's
        work joins now (see :mod:`sparc.sa.tx.joined`), or None; cheap when the
        application runs none."""
        module = sys.modules.get("transaction")
        if module is not None:
            tm = module.manager
            inner = getattr(tm, "manager", tm)
            if scope.watched is not inner:
                begun.watch(inner)
                scope.watched = inner
            if (
                inner.__dict__.get(RUNNING) is None
                and self._join != "always"
                and "pyramid_tm" not in sys.modules
            ):
                return None
        elif self._join != "always" and "pyramid_tm" not in sys.modules:
            return None
        return joined.transaction_to_join(self._join)

    def current_gate(self) -> Gate | ThreadGate | None:
        """The gate of the engine's current pool (None for most pools)."""
        return self.gates.current(self._engine.pool)

    def _forget_after_fork(self) -> None:
        self.scopes.forget_after_fork()
        self.open_block = contextvars.ContextVar("sparc.sa open block", default=None)
        # A gate inherited in a held state would block the child forever.
        forget_gate(self._engine.pool)
        self.gates = GateCache()

    def _transaction_to_join(self) -> Any:
        """The transaction of the ``transaction`` package that blocks of this
        scope join now, or None."""
        if self._join == "never" or (self._join == "auto" and "transaction" not in sys.modules):
            return None  # nobody imported it, so no transaction is running
        return joined.transaction_to_join(self._join)


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


def _run(
    manager: ThreadLocalSASessionTransaction,
    fn: Callable[..., _T],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    attempts: int,
    isolation: str | None = None,
    tm: Any = None,
) -> _T:
    """The body of :meth:`ThreadLocalSASessionTransaction.run`."""
    if inspect.iscoroutinefunction(fn) or inspect.isawaitable(fn):
        raise TypeError(
            f"run() calls {fn!r} without awaiting it; for a coroutine function "
            "use the asyncio manager: `await tx.run(fn)` with ISAAsyncScopedTransaction, "
            "or call a plain function"
        )
    scope = manager.scopes.current()
    if (
        scope.blocks
        or scope.joined is not None
        or tm is not None
        or manager._transaction_to_join() is not None
    ):
        # Retrying an inner block cannot help: the server aborted the
        # whole transaction, which only its owner can restart.
        block = Block(manager, True, tm, False, isolation)
        with block:
            return _no_coroutine(fn(block.session, *args, **kwargs), fn)
    attempt = 1
    while True:
        block = Block(manager, True, None, False, isolation)
        try:
            with block:
                return _no_coroutine(fn(block.session, *args, **kwargs), fn)
        except sa_exc.DBAPIError as error:
            delay = delay_before_next(
                error, attempt, attempts, manager.retry_delay, manager.retry_max_delay
            )
            time.sleep(delay)
            attempt += 1


def _no_isolation_when_readonly(isolation: str | None) -> None:
    if isolation is not None:
        raise TypeError(
            "a read-only block chooses its own isolation (a snapshot on the replica "
            "or READ ONLY on the primary); give isolation_level to writing blocks only"
        )


def _check_manager(tm: object, join: str) -> None:
    if not callable(getattr(tm, "get", None)) or not callable(getattr(tm, "begin", None)):
        raise TypeError(
            "'transaction_manager' must be a transaction manager of the `transaction` "
            f"package (transaction.TransactionManager, request.tm), got {type(tm).__name__}"
        )
    if join == "never":
        raise ValueError(
            "this manager's join mode is 'never', so its blocks never join a "
            "transaction; a transaction_manager needs join 'auto' or 'always'"
        )


def _readonly_block(
    manager: ThreadLocalSASessionTransaction, readonly: object, after: object
) -> Any:
    return ReadOnlyBlock(manager, check_readonly_arguments(readonly, after, "tx"))


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


# -- the shared managers ----------------------------------------------------------

_CACHE_ATTR: Final = "_sparc_sa_transactions"


def scoped_transaction(engine: Engine, base: type[Any]) -> ThreadLocalSASessionTransaction:
    """The adapter factory: the one shared manager for *engine* and *base*
    (see :mod:`sparc.sa.tx.cache`)."""
    return cache.shared(
        engine.__dict__, _CACHE_ATTR, base, lambda: ThreadLocalSASessionTransaction(engine, base)
    )


# Declared after the fact: zope's decorators return the function itself, but
# untyped, which would hide its signature from type checkers.
implementer(ISAScopedTransaction)(scoped_transaction)
adapter(ISAEngine, ISADeclarativeMeta)(scoped_transaction)


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


def configure_transaction(
    engine: Engine,
    base: type[Any],
    *,
    join: str | None = None,
    twophase: bool | None = None,
) -> ThreadLocalSASessionTransaction:
    """Set the join mode and two-phase commit of the shared manager of
    *engine* and *base* (the one every ``getMultiAdapter((engine, Base),
    ISAScopedTransaction)`` returns), as ``<sa:transaction>`` does in ZCML,
    and return it. Options left None keep their value.

    A second configuration that disagrees with the first raises ValueError
    naming where the first was made.

    .. versionadded:: 2.0
    """
    caller = sys._getframe(1)
    where = f"{caller.f_code.co_filename}, line {caller.f_lineno}"
    manager = scoped_transaction(engine, base)
    configure_shared(manager, join, twophase, where)
    return manager
