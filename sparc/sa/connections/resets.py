"""The pool's reset of a connection whose transaction a block's session has
just ended.

When a connection goes back to the pool, SQLAlchemy rolls it back ("reset
on return"), unless the ``Connection`` was closed with its transaction
still open, which the close itself rolled back. A session's COMMIT ends its
transaction before the close, so the reset sends a ROLLBACK after every
COMMIT, and a session's ROLLBACK is followed by a second one. psycopg and
sqlite3 skip a ROLLBACK with no transaction open by themselves; PyMySQL,
mysqlclient, asyncmy and aiomysql send it to the server, a round trip of
its own (a quarter of a one-row insert's on MariaDB), and on aiosqlite it is
a trip to the connection's thread.

The sessions of sparc.sa's transaction managers close their connection as
the last step of every COMMIT or ROLLBACK of their transaction, with
nothing sent in between. So a connection such a session began a
transaction on is marked (:func:`note_session_transaction`, an
``after_begin`` listener); when that transaction's COMMIT or ROLLBACK
succeeds, the mark becomes "ended", and the next ROLLBACK on the connection,
the pool's reset, is skipped. Marks live on the pool's checkout of the
connection (the ``_ConnectionFairy``, made anew for each checkout), and a
transaction's begin clears them, so a mark never outlives the reset it was
made for. Everything else on the engine (``engine.connect()``, a plain
``Session``, a COMMIT or ROLLBACK that failed) is reset as SQLAlchemy resets
it.

This wraps the dialect's ``do_begin``, ``do_commit`` and ``do_rollback``
for one engine's dialect instance, as :mod:`sparc.sa.tx.liveness` wraps its
ping: no engine or pool event listener, nothing per statement.
"""

from __future__ import annotations

from typing import Any, Final

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import PoolProxiedConnection, SingletonThreadPool, StaticPool

__all__ = ["install", "is_installed", "note_session_transaction"]

_OURS: Final = "_sparc_sa_session_transaction"
_ENDED: Final = "_sparc_sa_transaction_ended"
_MARK: Final = "_sparc_sa_resets"


def _marks(connection: Any) -> dict[str, Any] | None:
    """The per-checkout dict of a pooled connection; None for anything else:
    a raw DBAPI connection, or the ad-hoc wrapper SQLAlchemy uses while it
    sets up a dialect, which has none."""
    if not isinstance(connection, PoolProxiedConnection):
        return None
    return getattr(connection, "__dict__", None)


def install(engine: Engine) -> None:
    """Skip the reset of *engine*'s connections whose transaction a block's
    session ended (see the module docstring). Idempotent.

    Not on a pool of one shared connection (``StaticPool``, as for in-memory
    SQLite, and ``SingletonThreadPool``): there the connection is the
    database, sqlite3 skips the ROLLBACK by itself, and an interruption
    inside the reset (a ``KeyboardInterrupt``) makes SQLAlchemy discard the
    connection, so no code of sparc.sa's runs inside it."""
    dialect = engine.dialect
    if dialect.__dict__.get(_MARK) or isinstance(engine.pool, (StaticPool, SingletonThreadPool)):
        return
    dialect_class = type(dialect)

    def do_begin(dbapi_connection: Any) -> None:
        marks = _marks(dbapi_connection)
        if marks is not None:
            marks.pop(_ENDED, None)
            marks.pop(_OURS, None)
        dialect_class.do_begin(dialect, dbapi_connection)

    def do_commit(dbapi_connection: Any) -> None:
        dialect_class.do_commit(dialect, dbapi_connection)
        marks = _marks(dbapi_connection)
        if marks is not None and marks.pop(_OURS, False):
            marks[_ENDED] = True

    def do_rollback(dbapi_connection: Any) -> None:
        marks = _marks(dbapi_connection)
        if marks is None:
            dialect_class.do_rollback(dialect, dbapi_connection)
            return
        if marks.pop(_ENDED, False):
            return  # nothing was sent since the session's COMMIT or ROLLBACK
        dialect_class.do_rollback(dialect, dbapi_connection)
        if marks.pop(_OURS, False):
            marks[_ENDED] = True

    # Instance attributes shadow the methods for this engine's dialect only.
    dialect.do_begin = do_begin  # type: ignore[method-assign]
    dialect.do_commit = do_commit  # type: ignore[method-assign]
    dialect.do_rollback = do_rollback  # type: ignore[method-assign]
    dialect.__dict__[_MARK] = True


def is_installed(engine: Engine) -> bool:
    """Whether :func:`install` wrapped *engine*'s dialect."""
    return bool(engine.dialect.__dict__.get(_MARK))


def note_session_transaction(session: Session, transaction: Any, connection: Any) -> None:
    """``after_begin`` of a transaction manager's sessions: mark the
    connection's checkout (see the module docstring)."""
    marks = _marks(connection.connection)
    if marks is not None:
        marks[_OURS] = True
