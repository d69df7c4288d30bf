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

from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine, ExceptionContext
from sqlalchemy.pool import SingletonThreadPool, StaticPool

__all__ = ["keep_shared_connection"]


def keep_shared_connection(engine: Engine) -> None:
    """Make interruptions on *engine* leave its shared SQLite connection open.

    Does nothing unless *engine* is SQLite on a pool of one shared
    connection. Idempotent, and cheap after the first call."""
    if engine.dialect.name != "sqlite":
        return
    if not _keeps(engine):
        return
    if not event.contains(engine, "handle_error", _not_a_disconnect):
        event.listen(engine, "handle_error", _not_a_disconnect)


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
