"""Joined mode: blocks that commit with a transaction of the ``transaction`` package.

Inside a Zope request every change commits or aborts with the request's
transaction: ZODB's, and now the database's. A transaction manager's
``join`` mode says when its blocks join that transaction:

``"never"``
    Every outermost block commits by itself (sparc.sa 1.x's behaviour).
``"always"``
    Every block joins the current transaction of the thread's
    ``transaction.manager`` (beginning one in implicit mode); nothing is
    committed until that transaction commits.
``"auto"`` (the default)
    Blocks join when a transaction is known to be running for this thread:
    while Zope's publisher publishes a request (a request is set in
    ``zope.globalrequest`` and a transaction is begun), and inside a
    transaction begun on an explicit-mode ``transaction.manager``
    (pyramid_tm's way). Otherwise as ``"never"``.

In a joined transaction the outermost block of a scope runs in a SAVEPOINT:
on normal exit it flushes and releases it, on an exception it rolls back to
it and re-raises, so a block is still all-or-nothing and the request can go
on. The SQL COMMIT happens when the transaction commits, voting after ZODB
(sort key), so a ZODB conflict at vote rolls the SQL back; any abort rolls
back everything the request wrote. Every write commits, whoever issued it:
there is no ``mark_changed()``. After the transaction ends, committed or
aborted, the session is reset and its connection is back in the pool.

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
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final, Protocol

from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session
from zope.interface import implementer

from sparc.sa import liveness, sessions
from sparc.sa.exceptions import (
    BlockOrderError,
    DoomedTransactionError,
    JoinedTransactionError,
    RetryableDatabaseError,
)
from sparc.sa.gate import Gate, ThreadGate
from sparc.sa.retry import is_retryable, retryable_in_request
from sparc.sa.scope import Scope

__all__ = [
    "WHOLE_TRANSACTION",
    "Joiner",
    "SessionDataManager",
    "finish_block",
    "join_scope",
    "transaction_to_join",
]

logger = logging.getLogger(__name__)

#: The "savepoint" of a joined block that is alone in its SQL transaction:
#: rolling back the whole SQL transaction undoes exactly that block.
WHOLE_TRANSACTION: Final = object()


class Joiner(Protocol):
    """What joined mode needs of a transaction manager."""

    @property
    def gate_timeout(self) -> float: ...
    @property
    def twophase(self) -> bool: ...
    @property
    def sqlite_begin(self) -> bool: ...
    @property
    def switches_class(self) -> bool: ...
    def new_session(self) -> Session: ...
    def current_gate(self) -> Gate | ThreadGate | None: ...


try:
    from transaction.interfaces import IDataManager, IDataManagerSavepoint, ISavepointDataManager
except ImportError:  # pragma: no cover - joined mode is never entered without it
    _DM_INTERFACES: tuple[Any, ...] = ()
    _SP_INTERFACES: tuple[Any, ...] = ()
else:
    _DM_INTERFACES = (IDataManager, ISavepointDataManager)
    _SP_INTERFACES = (IDataManagerSavepoint,)


def transaction_to_join(mode: str) -> Any:
    """The transaction that a block opened now joins under *mode*, or None."""
    module: Any = sys.modules.get("transaction")
    if module is None:
        if mode != "always":
            return None  # nobody imported it, so no transaction is running
        module = importlib.import_module("transaction")
    tm = module.manager
    if mode == "always":
        return tm.get()
    # transaction.manager is a ThreadTransactionManager: the thread's own
    # TransactionManager is its `manager`. Its `_txn` is the running
    # transaction, which get() would create in implicit mode.
    try:
        inner = tm.manager
        txn = inner._txn
    except AttributeError:  # not a ThreadTransactionManager of transaction 3+
        inner, txn = tm, getattr(tm, "_txn", None)
    if txn is None:
        return None
    if inner.explicit:
        return txn
    globalrequest = sys.modules.get("zope.globalrequest")
    if globalrequest is not None and globalrequest.getRequest() is not None:
        return txn  # ZPublisher sets the request around begin() ... commit()
    return None


def join_scope(manager: Joiner, scope: Scope, txn: Any) -> SessionDataManager:
    """Join *scope*'s session to *txn* and return its data manager."""
    gate = manager.current_gate()
    if gate is not None:
        gate.acquire(scope, manager)
    session = None
    try:
        session = scope.session
        if session is None:
            session = scope.session = manager.new_session()
        elif session.in_transaction() or sessions.IN_BLOCK in session.info:
            sessions.freshen(session)
        if manager.twophase:
            if session.in_transaction():
                raise JoinedTransactionError(
                    "writes made through tx.session outside any block cannot join a "
                    "two-phase transaction; make them inside a block"
                )
            session.twophase = True
        dm = SessionDataManager(manager, scope, session, txn, gate)
        # Writes made outside any block, carried into this transaction by
        # _freshen: a failing block must not roll them back whole.
        dm.fresh = not session.in_transaction()
        scope.joined = dm
        session.info[sessions.JOINED] = True
        if manager.switches_class:
            session.__class__ = sessions.JoinedSession
        session.info[sessions.IN_BLOCK] = True  # a BEGIN first on pysqlite
        txn.join(dm)
        # Take the connection now, trusting one returned a moment ago: if it
        # died meanwhile, the request is retried (see sparc.sa.liveness).
        with liveness.trusting_recent_connections():
            session.connection()
    except BaseException:
        scope.joined = None
        if session is not None:
            session.info.pop(sessions.JOINED, None)
            session.twophase = False
            if session.__class__ is sessions.JoinedSession:
                session.__class__ = Session  # type: ignore[assignment]
        if gate is not None:
            gate.release(scope)
        raise
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("joined %r to %r", session, txn)
    return dm


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
        if doomed:
            dm.undo(savepoint, "an inner block joined with savepoint=False failed")
            raise DoomedTransactionError(
                "an inner block joined with savepoint=False failed; the block was rolled back"
            )
        try:
            if savepoint is not None and savepoint is not WHOLE_TRANSACTION:
                sessions.release(savepoint, session)  # flush, then RELEASE SAVEPOINT
            else:
                session.flush()
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


@contextmanager
def _transient(what: str, lost_connection: bool = True) -> Iterator[None]:
    """Turn a serialization failure or deadlock (and, unless at the COMMIT,
    a lost connection) into a TransientError."""
    try:
        yield
    except sa_exc.DBAPIError as error:
        if is_retryable(error) or (lost_connection and retryable_in_request(error)):
            raise RetryableDatabaseError(
                f"the database aborted the transaction at {what} "
                f"({type(error.orig).__name__}); the request can be retried"
            ) from error
        raise


@implementer(*_DM_INTERFACES)
class SessionDataManager:
    """Takes part in a transaction of the ``transaction`` package for one
    scope's session. Created by the first block of a scope that joins it."""

    def __init__(
        self,
        manager: Joiner,
        scope: Scope,
        session: Session,
        txn: Any,
        gate: Gate | ThreadGate | None,
    ) -> None:
        self._manager = manager
        self._scope = scope
        self.session = session
        self.txn = txn
        self._gate = gate
        self._twophase = manager.twophase
        self._committed = False
        self._ended = False
        #: Nothing has been written in this transaction by a finished block:
        #: a failing block may roll back the whole SQL transaction.
        self.fresh = True
        self.transaction_manager = sys.modules["transaction"].manager

    def __repr__(self) -> str:
        return f"<SessionDataManager for {self._manager!r}>"

    # -- helpers for blocks -----------------------------------------------------------

    def doom(self, reason: str) -> None:
        """Make sure the transaction cannot commit."""
        logger.warning("dooming the transaction: %s", reason)
        if not self.txn.isDoomed():
            self.txn.doom()

    def undo(self, savepoint: Any, reason: str) -> None:
        """Roll a block's work back: to its savepoint, the whole SQL
        transaction if it held nothing else, or doom the transaction."""
        if savepoint is None:
            self.doom(reason)
            return
        try:
            if savepoint is WHOLE_TRANSACTION:
                self.session.rollback()
            else:
                savepoint.rollback()
        except Exception:
            logger.error("rolling back to a savepoint failed", exc_info=True)
            self.doom(reason + ", and rolling back to its savepoint failed")

    # -- IDataManager ---------------------------------------------------------------------

    def sortKey(self) -> str:
        # After ZODB's connections (their keys start with a storage name), so
        # that ZODB votes first: a conflict there rolls the SQL back.
        return f"~sparc.sa:{id(self):016x}"

    def abort(self, txn: Any) -> None:
        self._end()

    def tpc_begin(self, txn: Any) -> None:
        if self._scope.blocks:
            raise BlockOrderError(
                "the transaction is committing while a sparc.sa block is still open; "
                "end the block before transaction.commit()"
            )
        with _transient("flush"):
            self.session.flush()

    def commit(self, txn: Any) -> None:
        pass

    def tpc_vote(self, txn: Any) -> None:
        info = self.session.info
        info[sessions.COMMITTING] = True
        try:
            with _transient("commit", lost_connection=False):
                if self._twophase:
                    self.session.prepare()
                else:
                    self.session.commit()
                    self._committed = True
        finally:
            info.pop(sessions.COMMITTING, None)

    def tpc_finish(self, txn: Any) -> None:
        try:
            if self._twophase:
                info = self.session.info
                info[sessions.COMMITTING] = True
                try:
                    self.session.commit()  # COMMIT PREPARED / XA COMMIT
                finally:
                    info.pop(sessions.COMMITTING, None)
                self._committed = True
        finally:
            self._end()

    def tpc_abort(self, txn: Any) -> None:
        self._end()

    def should_retry(self, error: BaseException) -> bool:
        return retryable_in_request(error)

    # -- ISavepointDataManager ------------------------------------------------------------

    def savepoint(self) -> _Savepoint:
        return _Savepoint(self)

    # -- the end ------------------------------------------------------------------------------

    def _end(self) -> None:
        """Roll back what was not committed, reset the session, free the scope.
        Runs once, after commit or abort; resetting comes last so that a
        failure in it cannot leave the scope attached to a dead transaction."""
        if self._ended:
            return
        self._ended = True
        scope = self._scope
        session = self.session
        scope.cancel_open_blocks()
        try:
            if not self._committed:
                sessions.rollback(session, None)
        finally:
            info = session.info
            info.pop(sessions.JOINED, None)
            info.pop(sessions.IN_BLOCK, None)
            session.twophase = False
            if session.__class__ is sessions.JoinedSession:
                session.__class__ = Session  # type: ignore[assignment]
            try:
                session.close()
            except Exception:
                sessions.close_failed(scope, session)
            finally:
                if scope.joined is self:
                    scope.joined = None
                if self._gate is not None:
                    self._gate.release(scope)
                if logger.isEnabledFor(logging.DEBUG):
                    state = "committed" if self._committed else "rolled back"
                    logger.debug("joined transaction %s: %r", state, session)


@implementer(*_SP_INTERFACES)
class _Savepoint:
    """``transaction.savepoint()`` for our session: a SAVEPOINT, on SQLite too."""

    def __init__(self, dm: SessionDataManager) -> None:
        self._dm = dm
        session = dm.session
        session.info[sessions.IN_BLOCK] = True  # a BEGIN first on pysqlite
        self._nested = sessions.begin_nested(session, dm._manager.sqlite_begin)

    def rollback(self) -> None:
        if self._nested.is_active:
            self._nested.rollback()
        # The transaction package lets a savepoint be rolled back again.
        self._nested = sessions.begin_nested(self._dm.session, self._dm._manager.sqlite_begin)
