"""The BEGIN an asyncio block sends on aiosqlite.

aiosqlite inherits pysqlite's legacy transaction control, which begins a
transaction only before DML (INSERT, UPDATE, DELETE, REPLACE): a block's
reads would run outside its transaction, so two reads of one block could see
two states of the database, and a SAVEPOINT outside a transaction starts one
of its own, whose RELEASE commits. So a block begins its transaction before
its first statement. (The synchronous driver's twin is
:func:`sparc.sa.tx.sessions.begin_on_sqlite`.)

Every statement on aiosqlite is a trip to the connection's own thread and
back, the largest cost of a short transaction there. A BEGIN sent as a
statement of its own would add a trip to each block that starts with a read.
Engines from sparc.sa's factory therefore open their sqlite3 connections
with :class:`BeginningConnection`, which sends the BEGIN inside the trip
that makes the first statement's cursor: no trip of its own. On an engine
built elsewhere, or one whose ``connect_args`` name a ``factory`` of their
own, the BEGIN is sent before the first statement as a statement, unless
that statement is DML, before which the driver begins by itself.

The same connections close the cursors a cancelled statement left open
(:class:`sparc.sa.connections.keep.CursorClosingConnection`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import event as sa_event
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session

from sparc.sa.connections.keep import CursorClosingConnection
from sparc.sa.foreign.of_sqlalchemy import aiosqlite_connection
from sparc.sa.tx.sessions import BlockSession

if TYPE_CHECKING:  # needs greenlet at run time; engine.py imports this module
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = [
    "AioSqliteSession",
    "BeginningConnection",
    "mark",
    "use_beginning_connections",
    "watch",
]


class BeginningConnection(CursorClosingConnection):
    """A sqlite3 connection that begins a block's transaction as the block's
    first cursor is made, in aiosqlite's thread (see the module docstring).

    ``begin_pending`` is set from the event loop while the connection is idle
    (between statements), and read and cleared in aiosqlite's thread by the
    next ``cursor()``; aiosqlite runs one call at a time per connection.
    """

    begin_pending = False

    def cursor(self, *args: Any, **kwargs: Any) -> Any:
        if self.begin_pending:
            self.begin_pending = False
            if not self.in_transaction and self.isolation_level is not None:
                # execute() makes its cursor through this method: the flag
                # is already clear.
                self.execute("BEGIN")
        return super().cursor(*args, **kwargs)


def use_beginning_connections(url: URL, kwargs: dict[str, Any]) -> bool:
    """Give an aiosqlite engine's connections the class above, unless its
    options make them some other way (a ``factory`` in ``connect_args``, a
    ``creator`` or ``async_creator``); whether it did."""
    if url.get_driver_name() != "aiosqlite" or {"creator", "async_creator"} & kwargs.keys():
        return False
    connect_args = kwargs.get("connect_args")
    if connect_args is None:
        kwargs["connect_args"] = {"factory": BeginningConnection}
    elif isinstance(connect_args, dict) and "factory" not in connect_args:
        kwargs["connect_args"] = {**connect_args, "factory": BeginningConnection}
    else:
        return False
    return True


def mark(engine: AsyncEngine) -> None:
    """Note that *engine*'s connections are :class:`BeginningConnection`: its
    blocks need no listener on every statement (whose mere presence costs
    every connection of the engine SQLAlchemy's per-connection event setup)."""
    engine.sync_engine.__dict__[_BEGINNING] = True


class AioSqliteSession(BlockSession):
    """The sync session under a block's AsyncSession on aiosqlite: it begins
    the block's transaction (see :func:`_begin`)."""


_NEEDS_BEGIN: Final = "sparc_sa_needs_begin"
_BEGINNING: Final = "_sparc_sa_beginning_connections"
# pysqlite (and so aiosqlite) begins a transaction by itself before these.
_SELF_BEGINNING: Final = ("INSERT", "UPDATE", "DELETE", "REPLACE")


def _begin(session: Session, transaction: Any, connection: Any) -> None:
    """``after_begin``: the session took its connection for a block; begin
    the transaction before its first statement."""
    if connection.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
        return
    raw = aiosqlite_connection(connection.connection.driver_connection)
    if isinstance(raw, BeginningConnection):
        raw.begin_pending = True
    elif _BEGINNING not in connection.engine.__dict__:
        connection.info[_NEEDS_BEGIN] = True  # see _begin_before_first_statement
    elif raw is not None and not raw.in_transaction:
        # An engine marked for them, given another connection anyway: no
        # statement listener there, so begin now, a trip of its own.
        connection.exec_driver_sql("BEGIN")


def _begin_before_first_statement(
    conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
) -> None:
    """``before_cursor_execute``, for connections of another class: send
    BEGIN before the block's first statement, unless that statement is DML,
    before which the driver begins by itself (so a block that starts by
    writing sends what plain SQLAlchemy sends)."""
    if not conn.info.pop(_NEEDS_BEGIN, False):
        return
    driver = conn.connection.driver_connection
    if driver is None or driver.in_transaction:
        return
    if statement.lstrip()[:7].upper().startswith(_SELF_BEGINNING):
        return
    cursor.execute("BEGIN")


def _forget_begin(dbapi_connection: Any, record: Any) -> None:
    """``checkin``: a block that sent nothing leaves no BEGIN pending."""
    record.info.pop(_NEEDS_BEGIN, None)
    raw = aiosqlite_connection(record.driver_connection)
    if isinstance(raw, BeginningConnection):
        raw.begin_pending = False


def watch(engine: AsyncEngine) -> None:
    """Install what *engine*'s blocks need, once: a checkin listener, and
    unless its connections are :class:`BeginningConnection`, the statement
    listener."""
    sync_engine = engine.sync_engine
    if sa_event.contains(sync_engine, "checkin", _forget_begin):
        return
    sa_event.listen(sync_engine, "checkin", _forget_begin)
    if _BEGINNING not in sync_engine.__dict__:
        sa_event.listen(sync_engine, "before_cursor_execute", _begin_before_first_statement)


sa_event.listen(AioSqliteSession, "after_begin", _begin)
