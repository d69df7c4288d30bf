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

import inspect
import logging
import sys
from collections.abc import Callable
from typing import Any, Final, TypeVar

from sqlalchemy.engine import Engine
from zope.component import adapter
from zope.interface import implementer

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
from sparc.sa.replicas.positions import check_readonly_arguments
from sparc.sa.replicas.readonly import ReadOnlyBlock, run_readonly
from sparc.sa.replicas.tokens import commit_token
from sparc.sa.tx import cache, sessions
from sparc.sa.tx.block import Block
from sparc.sa.tx.manager import JOIN_MODES, ManagerCore, reconfigure
from sparc.sa.tx.retry import (
    RETRY_MYSQL_ERRORS,
    RETRY_SQLITE_CODES,
    RETRY_SQLSTATES,
    check_attempts,
    is_retryable,
    run_in_blocks,
)
from sparc.sa.tx.stack import check_savepoint

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
    "ScopedTransaction",
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


@implementer(ISAScopedTransaction)
class ScopedTransaction(ManagerCore):
    """Thread- and task-scoped sessions with commit-or-roll-back blocks.

    1.x called it ``ThreadLocalSASessionTransaction``; that name is kept, for
    the same class (its scopes are asyncio tasks too, so the new name says
    what the old one no longer did).

    ``ScopedTransaction(engine, Base)`` builds a private
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

    def __repr__(self) -> str:
        from sparc.sa.options import hide_dsn

        return (
            f"<{type(self).__name__} engine=Engine({hide_dsn(self._engine.url)}) "
            f"Base={self._base_name} join={self._join!r}>"
        )

    @property
    def commit_token(self) -> str | None:
        """The WAL position of this scope's latest commit on an engine with
        replicas, as a string for ``tx(readonly=True, after=token)`` in another
        scope, request or process; None when this scope wrote nothing."""
        return commit_token(self._engine)

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
        check_savepoint(savepoint)
        isolation = sessions.check_isolation(isolation_level)
        if transaction_manager is not None:
            _check_manager(transaction_manager, self._join)
        if readonly or after is not None:
            _no_isolation_when_readonly(isolation)
            return _readonly_block(self, readonly, after, transaction_manager)
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
        if transaction_manager is not None:
            _check_manager(transaction_manager, self._join)
        if readonly or after is not None:
            _no_isolation_when_readonly(isolation)
            _readonly_block(self, readonly, after)  # checks the arguments
            return run_readonly(self, fn, args, kwargs, attempts, after, transaction_manager)
        return _run(
            self, fn, args, kwargs, check_attempts(attempts), isolation, transaction_manager
        )


#: The 1.x name, kept: the same class.
ThreadLocalSASessionTransaction = ScopedTransaction


def _run(
    manager: ScopedTransaction,
    fn: Callable[..., _T],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    attempts: int,
    isolation: str | None = None,
    tm: Any = None,
) -> _T:
    """The body of :meth:`ScopedTransaction.run`."""
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
        or manager.transaction_to_join() is not None
    ):
        # Retrying an inner block cannot help: the server aborted the
        # whole transaction, which only its owner can restart.
        return run_in_blocks(
            lambda: Block(manager, True, tm, False, isolation), fn, args, kwargs, 1, 0.0, 0.0
        )
    return run_in_blocks(
        lambda: Block(manager, True, None, False, isolation),
        fn,
        args,
        kwargs,
        attempts,
        manager.retry_delay,
        manager.retry_max_delay,
    )


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
    manager: ScopedTransaction, readonly: object, after: object, tm: Any = None
) -> Any:
    return ReadOnlyBlock(manager, check_readonly_arguments(readonly, after, "tx"), tm)


# -- the shared managers ----------------------------------------------------------

_CACHE_ATTR: Final = "_sparc_sa_transactions"


def scoped_transaction(engine: Engine, base: type[Any]) -> ScopedTransaction:
    """The adapter factory: the one shared manager for *engine* and *base*
    (see :mod:`sparc.sa.tx.cache`)."""
    return cache.shared(engine.__dict__, _CACHE_ATTR, base, lambda: ScopedTransaction(engine, base))


# Declared after the fact: zope's decorators return the function itself, but
# untyped, which would hide its signature from type checkers.
implementer(ISAScopedTransaction)(scoped_transaction)
adapter(ISAEngine, ISADeclarativeMeta)(scoped_transaction)


def configure_shared(
    manager: ScopedTransaction,
    join: str | None,
    twophase: bool | None,
    where: str,
) -> None:
    """Set the join mode of a shared manager, as ``<sa:transaction>`` does.

    Two configurations that disagree about one engine and base are an error
    that names where the first one was made.
    """
    reconfigure(manager, join, twophase, where)


def configure_transaction(
    engine: Engine,
    base: type[Any],
    *,
    join: str | None = None,
    twophase: bool | None = None,
) -> ScopedTransaction:
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
