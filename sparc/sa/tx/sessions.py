"""What sparc.sa notes on a session, and the steps that begin, release,
roll back and reset it for a block.

A session carries its state in ``Session.info`` under the keys below, so that
blocks, joined mode and the asyncio manager agree on it without holding a
reference to each other. None of these steps raises past what it reports:
a failed rollback is logged, and the error that caused it propagates.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Final, Protocol

from sqlalchemy import event as sa_event
from sqlalchemy.orm import Session

from sparc.sa.connections import resets
from sparc.sa.exceptions import IsolationLevelError, JoinedTransactionError
from sparc.sa.foreign.of_sqlalchemy import connections_of, savepoint_name
from sparc.sa.tx import frameworks

__all__ = [
    "COMMITTING",
    "GUARDED",
    "IN_BLOCK",
    "JOINED",
    "READONLY",
    "WROTE",
    "BlockSession",
    "JoinedSession",
    "SessionHolder",
    "begin_nested",
    "begin_on_sqlite",
    "check_isolation",
    "check_late_options",
    "close_failed",
    "established_connection",
    "freshen",
    "log_failed_rollback",
    "refuse_commit_when_joined",
    "release",
    "rollback",
    "rollback_savepoint",
    "switch_back",
    "switch_to_joined",
    "watch",
    "wrote",
]

logger = logging.getLogger("sparc.sa.sessions")  # its name before the move
_DEBUG: Final = logging.DEBUG

# Keys of Session.info. IN_BLOCK: a block of ours is open on the session.
# WROTE: the session wrote since its transaction began (flushes, DML).
# JOINED: the session belongs to a transaction of the `transaction` package.
# COMMITTING: our data manager is committing it (session.commit() allowed).
IN_BLOCK: Final = "sparc.sa.in_block"
WROTE: Final = "sparc.sa.wrote"
JOINED: Final = "sparc.sa.joined"
COMMITTING: Final = "sparc.sa.committing"
# Writes are noted only on sessions used outside blocks, whose next block
# must know whether to end their transaction or carry it on (the manager
# installs these on such a session once); blocks need no notes.
WATCHED: Final = "sparc.sa.watched"
#: ``session.info`` key: the session runs a read-only block (the whole
#: transaction). Set by sparc.sa.replicas' read-only blocks; the core reads
#: it, so it lives here and the feature imports it.
READONLY: Final = "sparc.sa readonly"
#: ``session.info`` key: read-only blocks nested in a writing block, open now.
GUARDED: Final = "sparc.sa readonly guard"


def wrote(session: Session) -> bool:
    """Whether *session* wrote (flushed, or executed anything but a SELECT)
    in the transaction it is in now. Writes are noted with the transaction
    they happened in, so a transaction that ended takes its note along."""
    noted = session.info.get(WROTE)
    return noted is not None and noted is session.get_transaction()


class SessionHolder(Protocol):
    """What these steps need of a scope (:class:`sparc.sa.tx.scope.Scope`)."""

    session: Session | None
    doomed: bool


class BlockSession(Session):
    """The class of the sessions of sparc.sa's transaction managers, unless
    the application names its own (``class_``, or ``sync_session_class``
    under asyncio).

    * Its connections are marked for :mod:`sparc.sa.connections.resets`: no pool reset
      ROLLBACK after its own COMMIT or ROLLBACK.
    * On PostgreSQL, the liveness check of the checkout that begins its
      transaction is that transaction's BEGIN (:mod:`sparc.sa.tx.liveness`).
    * Execution options given to :meth:`connection` once its transaction
      holds a connection raise :class:`~sparc.sa.exceptions.IsolationLevelError`
      instead of being ignored with a warning: an isolation level that does
      not apply could let an update be lost.
    """

    def connection(
        self,
        bind_arguments: Any = None,
        execution_options: Any = None,
    ) -> Any:
        if execution_options:
            established = established_connection(self)
            if established is not None:
                check_late_options(established, execution_options)
                return super().connection(bind_arguments)
        return super().connection(bind_arguments, execution_options)


def established_connection(session: Session) -> Any:
    """The connection *session*'s transaction holds, or None (not begun, or
    begun without one yet)."""
    transaction = session.get_transaction()
    if transaction is None:
        return None
    # SQLAlchemy offers no public way to ask whether a transaction has taken
    # its connection without taking one (DEVELOPERS.md, other packages'
    # private names).
    for connection, *_ in connections_of(transaction):
        return connection
    return None


def check_isolation(level: object) -> str | None:
    """A block's *isolation_level*, normalised (``"repeatable_read"`` ->
    ``"REPEATABLE READ"``), or None; a clear error for anything else."""
    if level is None:
        return None
    if not isinstance(level, str) or not level.strip():
        raise TypeError(
            "'isolation_level' must be a level's name such as 'SERIALIZABLE', "
            f"'REPEATABLE READ' or 'READ COMMITTED', got {level!r}"
        )
    normal = " ".join(level.upper().replace("_", " ").split())
    if normal == "AUTOCOMMIT":
        raise ValueError(
            "isolation_level='AUTOCOMMIT' would commit every statement on its own, "
            "and a block is all or nothing; use a connection of its own for that: "
            "engine.connect().execution_options(isolation_level='AUTOCOMMIT')"
        )
    return normal


def _same_level(wanted: object, connection: Any) -> bool:
    if not isinstance(wanted, str):
        return False
    current = connection.get_execution_options().get("isolation_level")
    if current is None:
        current = connection.get_isolation_level()  # the engine's or the server's
    return check_isolation(wanted) == check_isolation(current)


def check_late_options(connection: Any, options: dict[str, Any]) -> None:
    """Execution options asked for once *connection* runs the transaction:
    fine if they are in force already, else an error that says what to do."""
    current = connection.get_execution_options()
    late = sorted(
        key
        for key, value in options.items()
        if current.get(key) != value
        and not (key == "isolation_level" and _same_level(value, connection))
    )
    if not late:
        return
    names = ", ".join(repr(key) for key in late)
    raise IsolationLevelError(
        f"execution options {names} were given after this block's transaction had "
        "begun on its connection, where they cannot apply (SQLAlchemy would ignore "
        "them with a warning, and the block would run at another isolation level "
        "than asked). Give the level to the block that begins the transaction: "
        "`with tx(isolation_level='SERIALIZABLE'):` (or set it on the engine)"
    )


sa_event.listen(BlockSession, "after_begin", resets.note_session_transaction)


class JoinedSession(Session):
    """What a session becomes while it belongs to a transaction of the
    ``transaction`` package: its ``commit()`` is refused, except from our data
    manager. Sessions of sparc.sa's managers switch to this class when they
    join and back when the transaction ends, so other sessions pay nothing."""

    def commit(self) -> None:
        if not self.info.get(COMMITTING):
            raise JoinedTransactionError(frameworks.commit_refusal())
        super().commit()


# The class a session had before it switched to its JoinedSession class.
_OWN_CLASS: Final = "sparc_sa_own_class"
# A session class -> its JoinedSession subclass.
_joined_classes: weakref.WeakKeyDictionary[type[Session], type[Session]] = (
    weakref.WeakKeyDictionary()
)


def switch_to_joined(session: Session) -> None:
    """Make *session* a :class:`JoinedSession` while it is joined. The class
    is a subclass of both JoinedSession and the session's own class (its
    sessionmaker's), so that the sessionmaker's event listeners still apply."""
    own = type(session)
    if issubclass(own, JoinedSession):
        return
    joined = _joined_classes.get(own)
    if joined is None:
        made = type("JoinedSession", (JoinedSession, own), {"__module__": __name__})
        joined = _joined_classes.setdefault(own, made)
    session.info[_OWN_CLASS] = own
    session.__class__ = joined


def switch_back(session: Session) -> None:
    """Give a session switched by :func:`switch_to_joined` its own class back."""
    if isinstance(session, JoinedSession):
        session.__class__ = session.info.pop(_OWN_CLASS, Session)


def _note_flush(session: Session, flush_context: Any) -> None:
    session.info[WROTE] = session.get_transaction()


def _note_execute(state: Any) -> None:
    if not state.is_select:
        state.session.info[WROTE] = state.session.get_transaction()


def watch(session: Session) -> None:
    """Note the writes of *session*, used outside any block."""
    session.info[WATCHED] = True
    sa_event.listen(session, "after_flush", _note_flush)
    sa_event.listen(session, "do_orm_execute", _note_execute)


def refuse_commit_when_joined(session: Session) -> None:
    """``before_commit`` listener for a Session class of the application's
    own, which cannot switch to :class:`JoinedSession`."""
    info = session.info
    if info.get(JOINED) and not info.get(COMMITTING):
        if session.get_nested_transaction() is not None:
            return  # releasing the application's own SAVEPOINT (begin_nested())
        raise JoinedTransactionError(frameworks.commit_refusal())


def begin_on_sqlite(session: Session, transaction: Any, connection: Any) -> None:
    """pysqlite (legacy transaction control) begins a transaction only before
    DML, so a block's reads would run outside its transaction: a
    read-modify-write could not be isolated, and a SAVEPOINT outside a
    transaction starts one of its own, whose RELEASE commits. Inside our
    blocks, begin explicitly as soon as the session takes its connection.

    The BEGIN goes to the driver's connection directly, as SQLAlchemy's own
    implicit begin does on other drivers: through ``exec_driver_sql()`` it
    cost a block 30 µs of Python here, against 7 µs (docs/benchmarks.rst).
    If the driver refuses it, SQLAlchemy sends it again, so that the error
    a block raises is SQLAlchemy's wrapped one, as for any statement."""
    if not session.info.get(IN_BLOCK):
        return
    dbapi = connection.connection.dbapi_connection
    if (
        dbapi is not None
        and not dbapi.in_transaction
        and dbapi.isolation_level is not None
        and getattr(dbapi, "autocommit", -1) is not True
    ):
        try:
            dbapi.execute("BEGIN")
        except Exception:
            connection.exec_driver_sql("BEGIN")


def begin_nested(session: Session, sqlite_begin: bool) -> Any:
    """``session.begin_nested()``, on pysqlite (*sqlite_begin*) inside a
    transaction: a SAVEPOINT outside one starts a transaction of its own,
    whose RELEASE commits, so the outer block could no longer roll it back."""
    if sqlite_begin:
        begin_on_sqlite(session, None, session.connection())
    return session.begin_nested()


def freshen(session: Session) -> None:
    """Give an outermost block a view no older than its start.

    A scope used outside any block may hold a transaction: a snapshot and
    loaded objects. Only reads: end it, and every object reloads on next
    access. Writes (pending objects, flushes, DML): they keep their 1.x
    fate and are committed by this block, in their own transaction; the
    loaded objects are still refreshed.
    """
    if session.info.pop(IN_BLOCK, None):
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


def release(savepoint: Any, session: Session) -> None:
    """Flush and RELEASE a SAVEPOINT; our own doing, so not refused inside a
    joined transaction as a user's session.commit() is.

    If the RELEASE itself fails, the savepoint is rolled back before the
    error propagates: SQLAlchemy marks a savepoint whose RELEASE failed as
    inactive without undoing it, and on PostgreSQL the transaction would stay
    aborted, so that a later COMMIT silently rolls back everything.

    An interrupt (KeyboardInterrupt, SystemExit, a cancellation) reaches the
    caller as itself: if undoing the savepoint fails meanwhile (SQLAlchemy
    invalidated the connection, or the server had released it already), that
    failure is logged, not raised in its place, and the block dooms the outer
    transaction."""
    info = session.info
    info[COMMITTING] = True
    try:
        savepoint.commit()
    except BaseException as error:
        interrupted = not isinstance(error, Exception)
        try:
            _undo_failed_release(savepoint, interrupted)
        except BaseException:
            if not interrupted:
                raise
            # An `except Exception:` in the application must not swallow a
            # Ctrl-C because the undo of its savepoint failed (logged).
        raise
    finally:
        info.pop(COMMITTING, None)


def _undo_failed_release(savepoint: Any, interrupted: bool = False) -> None:
    for connection, transaction, *_ in list(connections_of(savepoint)):
        name = savepoint_name(transaction)
        if name is None or transaction.is_active or connection.closed:
            continue  # not a SAVEPOINT, or SQLAlchemy still owns its rollback
        if connection.invalidated:
            continue  # its DBAPI connection is closed: the server rolled it all back
        if connection.get_nested_transaction() is not transaction:
            continue  # released after all (the failure came later)
        # SQLAlchemy refuses statements on a connection whose savepoint is
        # inactive, so this one goes to the driver directly.
        quoted = connection.dialect.identifier_preparer.quote(name)
        try:
            cursor = connection.connection.dbapi_connection.cursor()
            try:
                cursor.execute(f"ROLLBACK TO SAVEPOINT {quoted}")
            finally:
                cursor.close()
        except Exception:
            if interrupted:
                # The RELEASE may have run before the interrupt: expected, and
                # the outer block rolls back (the nested block dooms it).
                logger.warning(
                    "rolling back to a savepoint whose RELEASE was interrupted failed; "
                    "the outer block will roll back",
                    exc_info=True,
                )
            else:
                logger.error(
                    "rolling back to a savepoint whose RELEASE failed failed", exc_info=True
                )
            raise


def rollback(session: Session, cause: BaseException | None) -> None:
    """Roll *session* back; a failure is logged, never raised, so that the
    error that caused the rollback is the one that propagates."""
    try:
        session.rollback()
        if logger.isEnabledFor(_DEBUG):
            logger.debug("block rolled back after %r: %r", type(cause).__name__, session)
    except Exception:
        log_failed_rollback(cause)


def log_failed_rollback(cause: BaseException | None) -> None:
    """Log the ROLLBACK that failed after *cause* (from an ``except``: with
    its traceback); the threaded and the asyncio blocks say it alike."""
    logger.error(
        "rolling back after %s failed; the original error propagates",
        type(cause).__name__,
        exc_info=True,
    )


def rollback_savepoint(scope: SessionHolder, savepoint: Any) -> None:
    """Roll back to *savepoint*; if that fails the inner work may still be
    there, so the scope is doomed: its outer block will roll back."""
    try:
        savepoint.rollback()
    except Exception:
        scope.doomed = True
        logger.error(
            "rolling back to a savepoint failed; the outer block will roll back",
            exc_info=True,
        )


def close_failed(scope: SessionHolder, session: Session) -> None:
    """Closing *session* failed: the scope must not stay wedged on it, so it
    is dropped, and the scope gets a fresh one on next use."""
    logger.error("closing the session after a block failed", exc_info=True)
    if scope.session is session:
        scope.session = None
