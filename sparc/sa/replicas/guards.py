"""Replicas: read-only transactions on the primary, and the guards that
refuse writes in read-only blocks."""

from __future__ import annotations

from typing import Any, Final

from sqlalchemy import event
from sqlalchemy.orm import Session

from sparc.sa.exceptions import ReadOnlyTransactionError
from sparc.sa.replicas import gtid
from sparc.sa.replicas.routing import statement_writes
from sparc.sa.tx.sessions import GUARDED, READONLY

_READ_ONLY_MODE: Final = "sparc.sa read only mode"
_LISTENING: Final = "sparc.sa readonly guard listening"


# -- read-only transactions on the primary and write guards --------------------------


def _read_only_mode(dbapi_connection: Any, on: bool) -> bool:
    """Switch a psycopg connection's next transactions to READ ONLY (no round
    trip: psycopg sends BEGIN READ ONLY); False if the driver cannot."""
    if hasattr(dbapi_connection, "read_only"):  # psycopg 3
        dbapi_connection.read_only = on
        return True
    if hasattr(dbapi_connection, "readonly"):  # psycopg2
        dbapi_connection.readonly = on
        return True
    return False


def after_begin(session: Session, transaction: Any, connection: Any) -> None:
    """A read-only block's transaction on the primary is READ ONLY."""
    if (
        session.info.get(READONLY)
        and not transaction.nested
        and connection.dialect.name in gtid.DIALECTS
    ):
        # MariaDB, on the primary and on replicas: the READ ONLY session
        # mode, which refuses DDL too (sparc.sa.replicas.gtid)
        session.info[_READ_ONLY_MODE] = (gtid.begin_read_only(connection), "mariadb")
        return
    if session.info.get(READONLY) is not True or transaction.nested:
        return
    name = connection.dialect.name
    raw = connection.connection.driver_connection
    if name == "sqlite":
        connection.exec_driver_sql("PRAGMA query_only = 1")
        session.info[_READ_ONLY_MODE] = (connection.connection.dbapi_connection, "sqlite")
    elif name == "postgresql":
        if not connection.dialect.is_async and _read_only_mode(
            raw, True
        ):  # psycopg: BEGIN READ ONLY, no extra round trip
            session.info[_READ_ONLY_MODE] = (raw, "psycopg")
        else:
            connection.exec_driver_sql("SET TRANSACTION READ ONLY")


def after_end(session: Session) -> None:
    """The connection goes back to the pool writable (after_commit, after_rollback)."""
    if session.get_nested_transaction() is not None:
        return  # a SAVEPOINT ended; the transaction goes on
    mode = session.info.pop(_READ_ONLY_MODE, None)
    if mode is None:
        return
    raw, kind = mode
    if kind == "sqlite":
        cursor = raw.cursor()  # the DBAPI connection, or SQLAlchemy's adapter of aiosqlite
        try:
            cursor.execute("PRAGMA query_only = 0")
        finally:
            cursor.close()
    elif kind == "mariadb":
        gtid.end_read_only(raw)
    else:
        _read_only_mode(raw, False)


def before_flush(session: Session, flush_context: Any, instances: Any) -> None:
    if (session.info.get(READONLY) or session.info.get(GUARDED)) and (
        session.new or session.deleted or session.dirty
    ):
        raise ReadOnlyTransactionError(
            "a read-only block (tx(readonly=True)) tried to write: the session has "
            f"{len(session.new)} new, {len(session.dirty)} changed and "
            f"{len(session.deleted)} deleted object(s); write in a block without "
            "readonly=True"
        )


def do_orm_execute(state: Any) -> None:
    info = state.session.info
    if not (info.get(READONLY) or info.get(GUARDED)) or state.is_select:
        return  # a SELECT is none of INSERT, UPDATE, DELETE: the common case, first
    writes = state.is_insert or state.is_update or state.is_delete
    if not writes:
        text = getattr(state.statement, "text", None)
        writes = isinstance(text, str) and statement_writes(text)
    if writes:
        raise ReadOnlyTransactionError(
            "a read-only block (tx(readonly=True)) tried to run a statement that "
            "writes; write in a block without readonly=True"
        )


def install_guards(factory: Any) -> None:
    """Listen on the sessionmaker of read-only blocks."""
    event.listen(factory, "after_begin", after_begin)
    event.listen(factory, "after_commit", after_end)
    event.listen(factory, "after_rollback", after_end)
    event.listen(factory, "before_flush", before_flush)
    event.listen(factory, "do_orm_execute", do_orm_execute)


def guard(session: Session) -> None:
    """Refuse writes in *session* until :func:`unguard` (a read-only block
    inside a writing one). The listeners go on this session only, the first
    time, and stay: removing an instance's listeners is not reliable in
    SQLAlchemy, and while unguarded they return at once."""
    info = session.info
    info[GUARDED] = info.get(GUARDED, 0) + 1
    if _LISTENING not in info:
        info[_LISTENING] = True
        event.listen(session, "before_flush", before_flush)
        event.listen(session, "do_orm_execute", do_orm_execute)


def unguard(session: Session) -> None:
    count = session.info.get(GUARDED, 1) - 1
    if count:
        session.info[GUARDED] = count
    else:
        session.info.pop(GUARDED, None)
