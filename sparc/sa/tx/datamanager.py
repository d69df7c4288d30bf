"""The data manager: sessions taking part in a transaction of the
``transaction`` package.

One :class:`SessionDataManager` joins the transaction for each engine whose
blocks join it. It holds one session, and so one SQL transaction on one
connection. The first scope to join brings the session; scopes of other
managers of the same engine (another declarative base, another add-on) use
that same session until the transaction ends, so that one request's SQL
commits atomically, on one connection, even without two-phase commit, and
their blocks and savepoints nest in one stack. On SQLite that sharing is
what makes two bases in one request possible at all.

The protocol, as the ``transaction`` package drives it: ``tpc_begin``
flushes; ``tpc_vote`` COMMITs (or PREPAREs, in two-phase mode) after ZODB
has voted (see :meth:`SessionDataManager.sortKey`); ``tpc_finish`` COMMITs
what was prepared; ``abort`` and ``tpc_abort`` roll back. Whatever happens,
the end resets the session, gives every scope its own session back and the
connection back to the pool.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Final, Protocol

from sqlalchemy import event as sa_event
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError
from zope.interface import implementer

from sparc.sa.exceptions import (
    AbortedTransactionError,
    BlockOrderError,
    JoinedTransactionError,
    RetryableDatabaseError,
)
from sparc.sa.tx import begun, sessions
from sparc.sa.tx.aborted import aborted, checks_aborted
from sparc.sa.tx.gate import Gate, ThreadGate
from sparc.sa.tx.retry import is_retryable, retryable_in_request

__all__ = [
    "ENDED",
    "WHOLE_TRANSACTION",
    "JoinedScope",
    "Joiner",
    "SessionDataManager",
    "guard",
    "hand_out",
]

logger = logging.getLogger("sparc.sa.datamanager")  # its name before the move

#: Key of Session.info: the transaction this session last worked in has
#: ended, and nobody has taken the session from ``tx.session`` or joined it
#: to another since. Whoever still holds it (``request.dbsession`` in a
#: finished callback, an after-commit hook) writes in no transaction.
ENDED: Final = "sparc.sa.ended"
# Key of Session.info: the listener that refuses such writes is installed.
_GUARDED: Final = "sparc.sa.guarded"

#: The "savepoint" of a joined block that is alone in its SQL transaction:
#: rolling back the whole SQL transaction undoes exactly that block.
WHOLE_TRANSACTION: Final = object()

try:
    from transaction.interfaces import IDataManager, IDataManagerSavepoint, ISavepointDataManager
except ImportError:  # pragma: no cover - joined mode is never entered without it
    _DM_INTERFACES: tuple[Any, ...] = ()
    _SP_INTERFACES: tuple[Any, ...] = ()
else:
    _DM_INTERFACES = (IDataManager, ISavepointDataManager)
    _SP_INTERFACES = (IDataManagerSavepoint,)

_RESET: Final = (
    "the session was rolled back, closed or removed (tx.session.rollback(), "
    "close(), Session.remove()) while it belonged to a transaction of the "
    "`transaction` package, so the work of earlier blocks is gone; the "
    "transaction cannot commit part of its work and has been doomed. Let the "
    "transaction end (commit or abort) instead of resetting the session"
)


@contextmanager
def _transient(what: str, lost_connection: bool = True) -> Iterator[None]:
    """Turn a serialization failure or deadlock (and, unless at the COMMIT,
    a lost connection) into a TransientError."""
    try:
        yield
    except (sa_exc.DBAPIError, StaleDataError) as error:
        if is_retryable(error) or (lost_connection and retryable_in_request(error)):
            cause = getattr(error, "orig", error)
            raise RetryableDatabaseError(
                f"the database aborted the transaction at {what} "
                f"({type(cause).__name__}); the request can be retried"
            ) from error
        raise


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


class JoinedScope(Protocol):
    """What the data manager needs of a scope that joins its transaction
    (:class:`sparc.sa.tx.scope.Scope`)."""

    session: Session | None
    joined: SessionDataManager | None
    doomed: bool

    @property
    def blocks(self) -> Sequence[object]: ...
    @property
    def thread(self) -> int: ...
    def cancel_open_blocks(self) -> None: ...


@implementer(*_DM_INTERFACES)
class SessionDataManager:
    """Takes part in a transaction of the ``transaction`` package for one
    scope's session. Created by the first block of a scope that joins it."""

    def __init__(
        self,
        manager: Joiner,
        scope: JoinedScope,
        session: Session,
        txn: Any,
        gate: Gate | ThreadGate | None,
        transaction_manager: Any,
    ) -> None:
        self._manager = manager
        #: The scopes whose blocks run in this transaction; the first one
        #: brought the session and holds the gate.
        self.scopes = [scope]
        # Other scopes' own sessions, given back when the transaction ends.
        self._own_sessions: list[tuple[JoinedScope, Session | None]] = []
        self.session = session
        self.txn = txn
        self._gate = gate
        self._twophase = manager.twophase
        self._checks_aborted = checks_aborted(session.get_bind())
        self._committed = False
        self._ended = False
        #: Nothing has been written in this transaction by a finished block:
        #: a failing block may roll back the whole SQL transaction.
        self.fresh = True
        #: The session's root transaction when the transaction was joined:
        #: a different one means somebody reset the session meanwhile.
        self.root: Any = None
        #: The isolation level its SQL transaction runs at, if a block asked.
        self.isolation: str | None = None
        #: IDataManager: the transaction manager of the joined transaction,
        #: the one the block was given if it was given one.
        self.transaction_manager = transaction_manager
        begun.note_open(self)  # reported at exit if its transaction never ends
        session.info.pop(ENDED, None)

    @property
    def ended(self) -> bool:
        return self._ended

    def may_lose_work(self) -> bool:
        """Whether ending the transaction without a commit could lose work:
        its session has changes not yet flushed, or a SQL transaction that
        may hold written rows. A session that was only taken (``tx.session``
        joins) and then closed, or never used, has nothing to lose."""
        if self._ended:
            return False
        session = self.session
        return session.in_transaction() or bool(session.new or session.deleted or session.dirty)

    def attach(self, scope: JoinedScope) -> None:
        """Let *scope* (of another manager of the same engine) work in this
        transaction, with this session, until the transaction ends."""
        self._own_sessions.append((scope, scope.session))
        scope.session = self.session
        scope.joined = self
        self.scopes.append(scope)

    def others_open(self, scope: JoinedScope) -> bool:
        """Whether a scope other than *scope* has a block open here."""
        return any(other.blocks for other in self.scopes if other is not scope)

    def __repr__(self) -> str:
        return f"<SessionDataManager for {self._manager!r}>"

    # -- helpers for blocks -----------------------------------------------------------

    def doom(self, reason: str) -> None:
        """Make sure the transaction cannot commit."""
        logger.warning("dooming the transaction: %s", reason)
        txn = self.txn
        # Only an active transaction can be doomed; one that is committing
        # fails by the error that follows.
        if not txn.isDoomed() and str(txn.status) == "Active":
            txn.doom()

    def check_whole(self) -> None:
        """Refuse to go on with a session that was reset since it joined."""
        root = self.root
        if root is not None and self.session.get_transaction() is not root:
            self.doom("the session was reset during the transaction")
            raise JoinedTransactionError(_RESET)

    def note_root(self) -> None:
        """Remember the session's current root transaction (beginning one)."""
        if self.isolation is None:
            self.session.connection()
        else:
            self.session.connection(execution_options={"isolation_level": self.isolation})
        self.root = self.session.get_transaction()

    def undo(self, savepoint: Any, reason: str) -> None:
        """Roll a block's work back: to its savepoint, the whole SQL
        transaction if it held nothing else, or doom the transaction."""
        if savepoint is None:  # savepoint=False
            self.doom(reason)
            return
        try:
            if savepoint is WHOLE_TRANSACTION:
                self.session.rollback()
                self.root = None  # our own doing: the next block begins afresh
            elif savepoint.is_active:
                savepoint.rollback()
            else:
                # Rolled back already by transaction.savepoint()'s rollback of
                # a savepoint taken before this block: this block's remaining
                # work cannot be told apart from what came before.
                self.doom(reason + ", and its savepoint had been rolled back by another")
        except Exception:
            logger.error("rolling back to a savepoint failed", exc_info=True)
            self.doom(reason + ", and rolling back to its savepoint failed")

    def aborted(self) -> bool:
        """Whether the server aborted the SQL transaction (PostgreSQL)."""
        return self._checks_aborted and aborted(self.session)

    # -- IDataManager ---------------------------------------------------------------------

    def sortKey(self) -> str:
        # After ZODB's connections (their keys start with a storage name), so
        # that ZODB votes first: a conflict there rolls the SQL back.
        return f"~sparc.sa:{id(self):016x}"

    def abort(self, txn: Any) -> None:
        self._end()

    def tpc_begin(self, txn: Any) -> None:
        if any(scope.blocks for scope in self.scopes):
            raise BlockOrderError(
                "the transaction is committing while a sparc.sa block is still open; "
                "end the block before transaction.commit()"
            )
        self.check_whole()
        with _transient("flush"):
            self.session.flush()

    def commit(self, txn: Any) -> None:
        pass

    def tpc_vote(self, txn: Any) -> None:
        self._check_not_aborted()
        with self._committing(), _transient("commit", lost_connection=False):
            if self._twophase:
                _release_savepoints(self.session)
                self.session.prepare()
            else:
                self.session.commit()
                self._committed = True

    def tpc_finish(self, txn: Any) -> None:
        try:
            if self._twophase:
                with self._committing():
                    self.session.commit()  # COMMIT PREPARED / XA COMMIT
                self._committed = True
        finally:
            self._end()

    def tpc_abort(self, txn: Any) -> None:
        self._end()

    def should_retry(self, error: BaseException) -> bool:
        return retryable_in_request(error)

    def _check_not_aborted(self) -> None:
        if self.aborted():
            raise AbortedTransactionError(
                "a statement failed in this transaction and its error was caught; "
                "PostgreSQL aborted the transaction, so committing it would "
                "silently commit nothing: it is rolled back instead"
            )

    @contextmanager
    def _committing(self) -> Iterator[None]:
        info = self.session.info
        info[sessions.COMMITTING] = True
        try:
            yield
        finally:
            info.pop(sessions.COMMITTING, None)

    # -- ISavepointDataManager ------------------------------------------------------------

    def savepoint(self) -> _Savepoint:
        return _Savepoint(self)

    # -- the end ------------------------------------------------------------------------------

    def _end(self) -> None:
        """Roll back what was not committed, reset the session, give every
        scope its own session back. Runs once, after commit or abort;
        resetting comes last so that a failure in it cannot leave a scope
        attached to a dead transaction."""
        _end_transaction(self)


def _end_transaction(dm: SessionDataManager) -> None:
    """The body of :meth:`SessionDataManager._end`."""
    if dm._ended:
        return
    dm._ended = True
    session = dm.session
    for scope in dm.scopes:
        scope.cancel_open_blocks()
    try:
        if not dm._committed:
            sessions.rollback(session, None)
    finally:
        info = session.info
        info.pop(sessions.JOINED, None)
        info.pop(sessions.IN_BLOCK, None)
        session.twophase = False
        sessions.switch_back(session)
        first = dm.scopes[0]
        try:
            session.close()
        except Exception:
            sessions.close_failed(first, session)
        finally:
            guard(session)
            for scope in dm.scopes:
                if scope.joined is dm:
                    scope.joined = None
            for scope, own in dm._own_sessions:
                if scope.session is session:
                    scope.session = own
            if dm._gate is not None:
                dm._gate.release(first)
            if logger.isEnabledFor(logging.DEBUG):
                state = "committed" if dm._committed else "rolled back"
                logger.debug("joined transaction %s: %r", state, session)


def guard(session: Session) -> None:
    """Refuse writes on *session* outside any block until it is taken from
    ``tx.session`` again outside a request, or joins a transaction."""
    info = session.info
    info[ENDED] = True
    if _GUARDED not in info:
        info[_GUARDED] = True
        sa_event.listen(session, "after_attach", _refuse_after_end)


def hand_out(session: Session) -> None:
    """*session* is taken from ``tx.session``: writes on it are the
    caller's, outside any transaction, with their 1.x fate."""
    session.info.pop(ENDED, None)


def _refuse_after_end(session: Session, instance: Any) -> None:
    """A write on a session whose transaction ended, through a reference
    kept from that transaction: nothing would commit it but the next
    transaction or block of this thread, another request's maybe."""
    info = session.info
    if ENDED in info and sessions.IN_BLOCK not in info and sessions.JOINED not in info:
        session.expunge(instance)
        raise JoinedTransactionError(
            f"{type(instance).__name__} was added outside any block to a session whose "
            "transaction has ended (committed or aborted): in a request's finished "
            "callback, or through a reference kept from that transaction. Nothing would "
            "commit it but the next transaction or block on this thread, another "
            "request's maybe. Write before the request's transaction ends, or in a "
            "block of its own (`with tx():`)"
        )


def _release_savepoints(session: Session) -> None:
    """Release the SAVEPOINTs still open (taken by ``transaction.savepoint()``,
    which never releases them), innermost first: two-phase commit PREPAREs
    the root transaction only."""
    nested = session.get_nested_transaction()
    while nested is not None:
        nested.commit()
        nested = session.get_nested_transaction()


@implementer(*_SP_INTERFACES)
class _Savepoint:
    """``transaction.savepoint()`` for our session: a SAVEPOINT, on SQLite too.

    Rolling it back undoes what the session did since, blocks included; it
    can be rolled back again. A block that ends normally while a savepoint
    taken inside it is still open keeps its own SAVEPOINT open rather than
    releasing it, so that this one stays valid. If the savepoint no longer
    exists (a block around it failed and rolled back past it), rolling back
    raises: it could no longer undo what it promised to."""

    def __init__(self, dm: SessionDataManager) -> None:
        self._dm = dm
        dm.check_whole()
        session = dm.session
        session.info[sessions.IN_BLOCK] = True  # a BEGIN first on pysqlite
        self._nested = sessions.begin_nested(session, dm._manager.sqlite_begin)

    def rollback(self) -> None:
        dm = self._dm
        dm.check_whole()
        if not self._nested.is_active:
            raise JoinedTransactionError(
                "this savepoint no longer exists: a block around it ended by rolling "
                "back, which discarded it; rolling back to it cannot undo what it "
                "should, so the transaction must abort"
            )
        self._nested.rollback()
        # The transaction package lets a savepoint be rolled back again.
        self._nested = sessions.begin_nested(dm.session, dm._manager.sqlite_begin)
