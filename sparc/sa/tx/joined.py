"""Joined mode: blocks that commit with a transaction of the ``transaction`` package.

Inside a Zope request every change commits or aborts with the request's
transaction: ZODB's, and now the database's. A transaction manager's
``join`` mode says when its blocks join that transaction:

``"never"``
    Every outermost block commits by itself (sparc.sa 1.x's behaviour).
``"always"``
    Every block joins the current transaction: the request's during a
    Pyramid request that pyramid_tm manages, else that of the thread's
    ``transaction.manager`` (beginning one in implicit mode); nothing is
    committed until that transaction commits.
``"auto"`` (the default)
    Blocks join a transaction that the application began: with
    ``transaction.begin()``, ``with transaction.manager:`` or
    ``attempts()`` (implicit or explicit mode), while Zope's publisher
    publishes a request, and during a Pyramid request that pyramid_tm
    manages (``request.tm``, whichever manager its ``tm.manager_hook``
    makes). A transaction that exists only because something called
    ``transaction.get()`` is not joined (:mod:`sparc.sa.tx.begun` tells them
    apart). Otherwise as ``"never"``.

``with tx(transaction_manager=tm):`` joins *tm*'s current transaction
whatever the mode (except ``"never"``), and leaves the thread's own
manager alone, as ``zope.sqlalchemy.register(session, transaction_manager=tm)``
does.

Blocks opened after a transaction has ended (in its after-commit and
after-abort hooks) do not join it: they commit by themselves. Blocks in
before-commit and before-abort hooks still belong to it.

All managers of one engine share one SQL transaction per joined
transaction, on one connection (see :mod:`sparc.sa.tx.datamanager`).

In a joined transaction the outermost block of a scope runs in a SAVEPOINT:
on normal exit it flushes and releases it, on an exception it rolls back to
it and re-raises, so a block is still all-or-nothing and the request can go
on. The SQL COMMIT happens when the transaction commits, voting after ZODB
(sort key), so a ZODB conflict at vote rolls the SQL back; any abort rolls
back everything the request wrote. Every write commits, whoever issued it:
there is no ``mark_changed()``. After the transaction ends, committed or
aborted, the session is reset and its connection is back in the pool. A
session reset meanwhile (``tx.session.rollback()``, ``close()``, the 1.x
``Session.remove()``) dooms the transaction with a JoinedTransactionError,
rather than letting it commit only the work done after the reset.

A serialization failure or deadlock reaches the transaction's owner as a
:class:`~sparc.sa.exceptions.RetryableDatabaseError`, a ``TransientError``,
so Zope's publisher retries the request.

With ``twophase=True`` the vote PREPAREs the database transaction and the
finish commits it (PostgreSQL prepared transactions, MySQL/MariaDB XA).
"""

from __future__ import annotations

import importlib
import logging
import sys
from types import FrameType
from typing import Any

from sqlalchemy.orm import Session

from sparc.sa.exceptions import (
    AbortedTransactionError,
    DoomedTransactionError,
    IsolationLevelError,
    JoinedTransactionError,
    RetryableDatabaseError,
)
from sparc.sa.foreign import of_transaction
from sparc.sa.foreign.of_transaction import ENDING_HOOKS
from sparc.sa.tx import begun, liveness, sessions
from sparc.sa.tx.datamanager import WHOLE_TRANSACTION, Joiner, SessionDataManager
from sparc.sa.tx.retry import retryable_in_request
from sparc.sa.tx.scope import Scope

__all__ = [
    "WHOLE_TRANSACTION",
    "Joiner",
    "SessionDataManager",
    "finish_block",
    "join_scope",
    "manager_of",
    "request_ended",
    "transaction_to_join",
]

logger = logging.getLogger("sparc.sa.joined")  # its name before the move


# -- which transaction ---------------------------------------------------------------


def transaction_to_join(mode: str, tm: Any = None) -> Any:
    """The transaction that a block opened now joins under *mode*, or None
    (the block commits by itself). *tm*: a transaction manager the block
    was given, whose current transaction it joins."""
    if tm is not None:
        txn = tm.get()  # begins one in implicit mode, as zope.sqlalchemy does
    else:
        txn = _request_transaction()
        if txn is None:
            module: Any = sys.modules.get("transaction")
            if module is None:
                if mode != "always":
                    return None  # nobody imported it, so no transaction is running
                module = importlib.import_module("transaction")
            txn = _thread_transaction(module.manager, mode)
    if txn is None or not _joinable(txn):
        return None
    return txn


def manager_of(txn: Any, tm: Any = None) -> Any:
    """The transaction manager whose transaction *txn* is: *tm* when the
    block was given one, pyramid_tm's ``request.tm`` during its request, else
    the thread's ``transaction.manager``. Kept by the data manager, as
    zope.sqlalchemy's keeps the one it was registered with."""
    if tm is not None:
        return tm
    threadlocal = sys.modules.get("pyramid.threadlocal")
    if threadlocal is not None:
        environ = getattr(threadlocal.get_current_request(), "environ", None)
        if environ and environ.get("tm.active"):
            request_tm = environ.get("tm.manager")
            if request_tm is not None and _running(request_tm)[0] is txn:
                return request_tm
    return sys.modules["transaction"].manager


def _running(tm: Any) -> Any:
    """*tm*'s transaction if one is running; never begins one."""
    # transaction.manager is a ThreadTransactionManager: the thread's own
    # TransactionManager is its `manager`, which knows the running
    # transaction; get() would create one in implicit mode.
    inner = getattr(tm, "manager", tm)
    return of_transaction.running(inner), inner


def _thread_transaction(tm: Any, mode: str) -> Any:
    if mode == "always":
        return tm.get()
    txn, inner = _running(tm)
    begun.watch(inner)
    if txn is None:
        return None
    if getattr(inner, "explicit", False):
        return txn  # explicit mode: only begin() makes a transaction
    if begun.began(txn, inner) is begun.NOT_BEGUN:
        # It exists because something called transaction.get() (opening a
        # ZODB connection does): nobody promised to commit it.
        return None
    return txn


def _request_transaction() -> Any:
    """The transaction of the Pyramid request being handled, when pyramid_tm
    manages it: ``request.tm`` is a manager of its own (``explicit_manager``
    makes one per request), which the thread's global manager knows nothing
    of."""
    threadlocal = sys.modules.get("pyramid.threadlocal")
    if threadlocal is None:
        return None
    request = threadlocal.get_current_request()
    environ = getattr(request, "environ", None)
    if not environ or not environ.get("tm.active"):
        return None
    tm = environ.get("tm.manager")
    return None if tm is None else _running(tm)[0]


def request_ended() -> bool:
    """Whether the Pyramid request being handled is one whose transaction
    pyramid_tm has already ended (its finished callbacks run now): work
    begun now belongs to no transaction of that request."""
    threadlocal = sys.modules.get("pyramid.threadlocal")
    if threadlocal is None:
        return False
    request = threadlocal.get_current_request()
    if request is None:
        return False
    # pyramid_tm's tween took request.tm (reified into the request's
    # __dict__) and began it; it removes tm.active when it ends it.
    return "tm" in getattr(request, "__dict__", ()) and not request.environ.get("tm.active")


def _joinable(txn: Any) -> bool:
    """Whether a block should join *txn*: not once it is committing or has
    committed, and not in the hooks that run after it ended. A block in an
    after-commit or after-abort hook that joined would never commit."""
    status = str(getattr(txn, "status", "Active"))
    if status in ("Committing", "Committed"):
        return False
    # A transaction whose commit failed is still "joined", so that join()
    # raises TransactionFailedError rather than the block committing alone
    # (a retried request would write twice).
    if not of_transaction.ending_hooks_pending(txn):
        # With no ending hook registered, none is running, and the walk up a
        # request's deep stack is not needed.
        return True
    frame: FrameType | None = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name in ENDING_HOOKS and frame.f_locals.get("self") is txn:
            return False
        frame = frame.f_back
    return True


# -- joining -----------------------------------------------------------------------------


def join_scope(
    manager: Joiner,
    scope: Scope,
    txn: Any,
    isolation: str | None = None,
    tm: Any = None,
) -> SessionDataManager:
    """Join *scope* to *txn* and return the data manager of its engine there.
    The first scope of an engine in *txn* brings its session; later ones
    (other managers of the engine) work with that same session. *isolation*:
    the level the SQL transaction must run at (the first block's); *tm*: the
    transaction manager the block was given, if any."""
    session = scope.session
    if session is None:
        session = scope.session = manager.new_session()
    engine = session.get_bind()
    dm = _data_manager(txn, engine)
    if dm is not None:
        _join_another(dm, scope, session, isolation)
        return dm
    gate = manager.current_gate()
    if gate is not None:
        gate.acquire(scope, manager)
    try:
        if session.in_transaction() or sessions.IN_BLOCK in session.info:
            sessions.freshen(session)
        if manager.twophase:
            if session.in_transaction():
                raise JoinedTransactionError(
                    "writes made through tx.session outside any block cannot join a "
                    "two-phase transaction; make them inside a block"
                )
            session.twophase = True
        dm = SessionDataManager(manager, scope, session, txn, gate, manager_of(txn, tm))
        if isolation is not None:
            _set_isolation(dm, session, isolation)
        # Writes made outside any block, carried into this transaction by
        # freshen(): a failing block must not roll them back whole.
        dm.fresh = not session.in_transaction()
        scope.joined = dm
        session.info[sessions.JOINED] = True
        if manager.switches_class:
            sessions.switch_to_joined(session)
        session.info[sessions.IN_BLOCK] = True  # a BEGIN first on pysqlite
        txn.join(dm)
        txn.set_data(engine, dm)
        # Take the connection now, trusting one returned a moment ago: if it
        # died meanwhile, the request is retried (see sparc.sa.tx.liveness).
        with liveness.trusting_recent_connections():
            dm.note_root()
    except BaseException:
        _unjoin(scope, session, gate)
        raise
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("joined %r to %r", session, txn)
    return dm


def _join_another(
    dm: SessionDataManager, scope: Scope, session: Session, isolation: str | None
) -> None:
    """Join *scope* to a transaction another manager of its engine works
    in already: with that manager's session."""
    if isolation is not None:
        check_isolation(dm, isolation)
    _set_aside(session)
    dm.attach(scope)
    dm.check_whole()


def _set_isolation(dm: SessionDataManager, session: Session, isolation: str) -> None:
    """The level the joined SQL transaction runs at, asked by its first block."""
    if sessions.established_connection(session) is not None:
        # Writes made outside any block began the transaction already.
        sessions.check_late_options(
            sessions.established_connection(session), {"isolation_level": isolation}
        )
    dm.isolation = isolation


def _unjoin(scope: Scope, session: Session, gate: Any) -> None:
    """Undo what joining did, when it failed half-way."""
    scope.joined = None
    session.info.pop(sessions.JOINED, None)
    session.twophase = False
    sessions.switch_back(session)
    if gate is not None:
        gate.release(scope)


def check_isolation(dm: SessionDataManager, isolation: str | None) -> None:
    """A block asking for *isolation* in a transaction already joined: it
    shares that SQL transaction, so only the level it runs at will do."""
    if isolation is None or dm.isolation == isolation:
        return
    if dm.isolation is None:
        connection = sessions.established_connection(dm.session)
        if connection is not None:
            sessions.check_late_options(connection, {"isolation_level": isolation})
            return
    raise IsolationLevelError(
        f"this block asked for isolation_level={isolation!r}, but it joins a "
        "transaction whose SQL transaction runs "
        + (f"at {dm.isolation!r}" if dm.isolation else "at the engine's level")
        + " already (an earlier block or a use of tx.session in the same "
        "transaction began it); give the level to the first block of the "
        "transaction, or set it on the engine"
    )


def _data_manager(txn: Any, engine: Any) -> SessionDataManager | None:
    """The data manager of *engine* in *txn*, if one joined and is not done."""
    try:
        dm: SessionDataManager = txn.data(engine)
    except (KeyError, AttributeError):
        return None
    return None if dm.ended else dm


def _set_aside(session: Session) -> None:
    """A scope's own session, about to give way to the shared one: what it
    only read is dropped; writes made outside any block cannot move over."""
    if not session.in_transaction():
        return
    if sessions.wrote(session) or session.new or session.dirty or session.deleted:
        raise JoinedTransactionError(
            "writes made through tx.session outside any block cannot join a "
            "transaction that another manager of the same engine already works in; "
            "make them inside a block"
        )
    session.rollback()


# -- ending a block ------------------------------------------------------------------------


def _refuse_release(dm: SessionDataManager, savepoint: Any, doomed: bool) -> None:
    """A block that ended normally, but whose work cannot stay: an inner block
    joined with savepoint=False failed (*doomed*), or the server aborted the
    transaction. Roll it back and say so."""
    if doomed:
        dm.undo(savepoint, "an inner block joined with savepoint=False failed")
        raise DoomedTransactionError(
            "an inner block joined with savepoint=False failed; the block was rolled back"
        )
    dm.undo(savepoint, "a statement failed inside the block")
    raise AbortedTransactionError(
        "a statement failed inside this block and its error was caught; "
        "PostgreSQL aborted the transaction, so the block was rolled back "
        "(run the statement in a nested block to let it fail alone)"
    )


def finish_block(
    dm: SessionDataManager,
    savepoint: Any,
    exc_type: type[BaseException] | None,
    exc: BaseException | None,
    doomed: bool,
) -> None:
    """End the outermost block of a scope inside a joined transaction: release
    its *savepoint* (None for none, or :data:`WHOLE_TRANSACTION`), or roll
    back to it."""
    session = dm.session
    if exc_type is None:
        if doomed or dm.aborted():
            _refuse_release(dm, savepoint, doomed)
        try:
            if (
                savepoint is None
                or savepoint is WHOLE_TRANSACTION
                # Rolled back by transaction.savepoint()'s rollback of a
                # savepoint taken before the block: what the block did since
                # lives in the transaction already.
                or not savepoint.is_active
                # A savepoint taken inside the block (transaction.savepoint())
                # is still open: keep ours open too, so that it stays valid.
                or session.get_nested_transaction() is not savepoint
            ):
                session.flush()
            else:
                sessions.release(savepoint, session)  # flush, then RELEASE SAVEPOINT
        except BaseException as error:
            dm.undo(savepoint, "the block's flush failed")
            if retryable_in_request(error):
                raise RetryableDatabaseError(
                    f"the database aborted the transaction ({type(error).__name__}); "
                    "the request can be retried"
                ) from error
            raise
        dm.fresh = False
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("joined block released: %r", session)
        return
    dm.undo(savepoint, f"the block raised {exc_type.__name__}")
    if (
        exc is not None
        and not isinstance(exc, RetryableDatabaseError)
        and retryable_in_request(exc)
    ):
        raise RetryableDatabaseError(
            f"the database aborted the transaction ({type(exc).__name__}); "
            "the request can be retried"
        ) from exc
