"""A transaction the server aborted: after a statement fails, PostgreSQL
refuses every statement until the transaction ends, and turns a COMMIT into
a silent ROLLBACK. A block that ends normally must not "commit" it
(:func:`sparc.sa.tx.stack.commit`, :mod:`sparc.sa.tx.datamanager`), so
:func:`aborted` tells, per driver: psycopg and psycopg2 from libpq's own
status; asyncpg, which does not report it, by a ``SELECT 1`` after a
statement failed on the connection.
"""

from __future__ import annotations

from typing import Any, Final

from sqlalchemy import event as sa_event
from sqlalchemy.orm import Session

from sparc.sa.foreign.of_sqlalchemy import connections_of

__all__ = ["aborted", "checks_aborted"]


#: The driver's "transaction aborted, commands ignored until end of
#: transaction block" status: psycopg 3's and psycopg2's TransactionStatus.INERROR.
_PG_INERROR: Final = 3


def aborted(session: Session) -> bool:
    """Whether the server aborted *session*'s transaction after a statement
    failed (PostgreSQL). A COMMIT then silently rolls everything back, so a
    block that ends normally must not commit it."""
    transaction = session.get_transaction()
    if transaction is None:
        return False
    for connection, *_ in connections_of(transaction):
        if connection.closed or connection.invalidated:
            continue
        driver = connection.connection.driver_connection
        # psycopg 3 (and its asyncio connection): libpq's own status, an int;
        # its `info.transaction_status` builds an object and an enum member
        # on every read. psycopg2: info.
        pgconn = getattr(driver, "pgconn", None)
        if pgconn is not None:
            status = pgconn.transaction_status
        elif connection.info.get(_FAILED):  # asyncpg, after a statement failed
            return _probe_aborted(connection)
        else:
            status = getattr(getattr(driver, "info", None), "transaction_status", None)
        if status == _PG_INERROR:
            return True
    return False


#: Set on a connection (asyncpg's) when a statement failed on it since its
#: transaction began: asyncpg does not expose the server's transaction status.
_FAILED: Final = "sparc_sa_statement_failed"

#: SQLSTATE in_failed_sql_transaction.
_IN_FAILED_TRANSACTION: Final = "25P02"


def _note_failure(context: Any) -> None:
    connection = context.connection
    if connection is not None and not context.is_disconnect:
        connection.info[_FAILED] = True


def _forget_failure(connection: Any) -> None:
    connection.info.pop(_FAILED, None)


def _probe_aborted(connection: Any) -> bool:
    """asyncpg: ask the server with a statement, which an aborted transaction
    refuses (one round trip, only after a statement failed)."""
    try:
        connection.exec_driver_sql("SELECT 1")
    except Exception as error:
        orig = getattr(error, "orig", None)
        code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
        if code == _IN_FAILED_TRANSACTION:
            return True
        raise
    connection.info.pop(_FAILED, None)
    return False


def checks_aborted(engine: Any) -> bool:
    """Whether :func:`aborted` can tell for *engine*'s driver (a sync engine:
    an AsyncEngine's ``sync_engine``); for asyncpg, which does not say, the
    engine's failed statements are noted from here on."""
    if engine.dialect.name != "postgresql":
        return False
    if engine.driver in ("psycopg", "psycopg2"):
        return True
    if engine.driver == "asyncpg":
        if not sa_event.contains(engine, "handle_error", _note_failure):
            sa_event.listen(engine, "handle_error", _note_failure)
            sa_event.listen(engine, "begin", _forget_failure)
        return True
    return False
