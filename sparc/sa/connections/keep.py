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
"""

from __future__ import annotations

import contextlib
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine, ExceptionContext
from sqlalchemy.pool import SingletonThreadPool, StaticPool

__all__ = ["keep_shared_connection"]


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
