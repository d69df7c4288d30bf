"""MariaDB: a read-only block's session in READ ONLY mode, sent once and kept
by a replica's connection, reset on the primary's next checkout. Part of
:mod:`sparc.sa.replicas.gtid`, which its callers use."""

from __future__ import annotations

import logging
import threading
from typing import Any, Final

from sqlalchemy import event
from sqlalchemy import exc as sa_exc

logger = logging.getLogger("sparc.sa.gtid")


# connection_record.info keys
_MODE: Final = "sparc.sa mariadb read only"  # SET SESSION TRANSACTION READ ONLY is on
_KEEP: Final = "_sparc_sa_mariadb_keep_read_only"
_CHECKOUT: Final = "_sparc_sa_mariadb_checkout_reset"


# -- read-only mode and the guard ----------------------------------------------------


def begin_read_only(connection: Any) -> Any:
    """A read-only block's transaction begins on *connection*: its session is
    in READ ONLY mode (sent once; a replica's connection keeps it) and the
    guard is on. What :func:`end_read_only` takes at the block's end."""
    info = connection.connection.info
    keep = connection.engine.__dict__.get(_KEEP, False)
    if not keep:
        _reset_on_checkout(connection.engine)
    if not info.get(_MODE):
        # Noted first: a connection whose mode is in doubt (an interrupt
        # right after the SET) is set back as it is next checked out.
        info[_MODE] = True
        # No transaction is open yet (MariaDB's begins at the first statement),
        # and the next one, whatever ends this one, is READ ONLY too.
        connection.exec_driver_sql("SET SESSION TRANSACTION READ ONLY")
    return (connection.connection.dbapi_connection, info, keep)


def end_read_only(mode: Any) -> None:
    """The block's transaction ended (after_commit, after_rollback): the
    guard is off, and a primary's connection is READ WRITE again before it
    goes back to the pool."""
    dbapi_connection, info, keep = mode
    if keep or not info.get(_MODE):
        return
    try:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("SET SESSION TRANSACTION READ WRITE")
        finally:
            cursor.close()
    except Exception:
        # A connection left read-only must not serve writers: close it, and
        # the pool replaces it (a lost connection lands here too).
        logger.debug("could not set a connection back to READ WRITE", exc_info=True)
        try:
            dbapi_connection.close()
        except Exception:
            logger.debug("closing it failed too", exc_info=True)
    else:
        info.pop(_MODE, None)


# Guards the one-time listener below: two threads must not both add it.
_listen_lock = threading.Lock()


def _reset_on_checkout(engine: Any) -> None:
    """Make sure no connection of *engine* (a primary) is handed out still in
    READ ONLY mode. :func:`end_read_only` sets it back as the block ends,
    but an interrupt (KeyboardInterrupt, a signal, a cancellation) can land
    between the block's COMMIT and that statement, and the connection goes
    back to the pool read-only: the pool's checkout sets it back then, or
    replaces it. A dictionary look-up on every checkout otherwise."""
    if engine.__dict__.get(_CHECKOUT):
        return
    with _listen_lock:
        if not engine.__dict__.get(_CHECKOUT):
            event.listen(engine, "checkout", _checkout)
            engine.__dict__[_CHECKOUT] = True


def _checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
    if not record.info.get(_MODE):
        return
    try:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("SET SESSION TRANSACTION READ WRITE")
        finally:
            cursor.close()
    except Exception as error:
        # The pool discards it and connects anew.
        raise sa_exc.DisconnectionError(
            "a connection left in READ ONLY mode could not be set back to READ WRITE"
        ) from error
    record.info.pop(_MODE, None)
    logger.debug("a connection left in READ ONLY mode was set back to READ WRITE")


def keep_read_only(engine: Any) -> None:
    """A replica engine's connections stay in READ ONLY mode in the pool."""
    engine = getattr(engine, "sync_engine", engine)
    engine.__dict__[_KEEP] = True
