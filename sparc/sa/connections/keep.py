"""Keep the one connection of an in-memory SQLite database through interruptions.

SQLAlchemy treats a KeyboardInterrupt, a CancelledError or any other
BaseException raised while a statement runs as a lost connection, and closes
it: the protocol with a server may have been left half-way. SQLite has no
protocol: the interrupted call either ran or did not, and the connection is
as good as before. When that connection is the only one the pool hands out
(StaticPool, SingletonThreadPool), it *is* an in-memory database: closing it
would drop every committed row. So for those pools the interruption is not a
disconnect; the block that was interrupted rolls the connection back and
keeps it.

The cursor of a statement an interruption cut short is closed, so that it
keeps no lock on a database file: on pysqlite by a ``handle_error``
listener, on aiosqlite by :class:`CursorClosingConnection` (SQLAlchemy 2.0's
adapter holds the driver's cursor where no listener reaches it).
"""

from __future__ import annotations

import contextlib
import sqlite3
import weakref
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine, ExceptionContext
from sqlalchemy.pool import SingletonThreadPool, StaticPool

__all__ = ["CursorClosingConnection", "keep_shared_connection"]


def keep_shared_connection(engine: Engine) -> None:
    """Make interruptions on *engine* leave its shared SQLite connection open,
    and close the cursor of an interrupted statement on pysqlite, on any pool.

    Does nothing unless *engine* is SQLite. Idempotent, and cheap after the
    first call."""
    if engine.dialect.name != "sqlite":
        return
    if engine.dialect.driver == "pysqlite" and not event.contains(
        engine, "handle_error", _close_cursor
    ):
        event.listen(engine, "handle_error", _close_cursor)
    if not _keeps(engine):
        return
    if not event.contains(engine, "handle_error", _not_a_disconnect):
        event.listen(engine, "handle_error", _not_a_disconnect)


def _close_cursor(context: ExceptionContext) -> Any:
    """Close the cursor of a statement an interruption cut short.

    SQLAlchemy closes a lost connection without closing its cursor first.
    pysqlite's close() then leaves the connection open until the cursor is
    collected, and the cursor lives on in the interruption's traceback: a
    SELECT interrupted on a database file kept its transaction's lock for as
    long as the application kept the KeyboardInterrupt."""
    execution = context.execution_context
    cursor = getattr(execution, "cursor", None)
    if cursor is not None and not isinstance(context.original_exception, Exception):
        # the interruption is what the caller must see, not a failed close
        with contextlib.suppress(Exception):
            cursor.close()
    return None


class CursorClosingConnection(sqlite3.Connection):
    """A sqlite3 connection that closes the cursors still open before it
    rolls back or closes: :func:`_close_cursor`'s twin for aiosqlite.

    SQLAlchemy 2.0's aiosqlite adapter (before 2.1 moved the cursor onto its
    adapter, whose close SQLAlchemy calls on any error) kept the driver's
    cursor in a local of its ``execute()``: a cancellation between the
    statement and the cursor's close left it open. An open cursor keeps its
    statement running, so SQLite kept a read lock on the file, through the
    ROLLBACK and even through the connection's close, until the garbage
    collector freed the cursor: every other connection's COMMIT waited for
    it, then failed with "database is locked", and the connection itself
    could not drop the table ("database table is locked").

    The cursors are noted as they are made, in aiosqlite's thread, which
    runs one call at a time per connection.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The cursors made here and not yet freed.
        self.cursors: weakref.WeakSet[sqlite3.Cursor] = weakref.WeakSet()

    def cursor(self, *args: Any, **kwargs: Any) -> Any:
        made = super().cursor(*args, **kwargs)
        self.cursors.add(made)
        return made

    def rollback(self) -> None:
        self.close_cursors()
        super().rollback()

    def close(self) -> None:
        self.close_cursors()
        super().close()

    def close_cursors(self) -> None:
        """Close every cursor of this connection still open, so that no
        statement of a cancelled block keeps a lock on the database."""
        for made in list(self.cursors):
            with contextlib.suppress(sqlite3.Error):  # a closed connection's
                made.close()
        self.cursors.clear()


def _not_a_disconnect(context: ExceptionContext) -> Any:
    if isinstance(context.original_exception, Exception):
        return None  # a real error: SQLAlchemy's own judgement stands
    engine = context.engine
    if engine is not None and _keeps(engine):
        context.is_disconnect = False
        context.invalidate_pool_on_disconnect = False
    return None


def _keeps(engine: Engine) -> bool:
    """A pool of one shared connection, or aiosqlite on any pool: aiosqlite
    runs each call to its end in a thread of its own, so an interrupted await
    leaves a connection as good as before. Closing it instead, from a task
    that is being cancelled, can be cancelled itself, and would leave the
    connection open outside the pool, holding its write lock (issue 16)."""
    return isinstance(engine.pool, (StaticPool, SingletonThreadPool)) or (
        engine.dialect.driver == "aiosqlite"
    )
