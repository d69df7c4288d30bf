"""Liveness checks on checkout: a connection the server killed while it sat
in the pool is never handed to a block.

Server engines built by the factory check each connection as it leaves the
pool, as SQLAlchemy's ``pool_pre_ping`` does, with one difference: a
connection taken for a Zope request (a joined transaction) within
:data:`RECENT` seconds of being returned is not pinged. A busy site reuses
its connections within milliseconds, so this saves a round trip on nearly
every request. If such a connection did die in that moment, the request's
first statement fails with a disconnect; nothing has been committed, and the
error reaches Zope's publisher as a ``TransientError``, so the request is
published again on a fresh connection. Outside joined transactions every
checkout is pinged.

A configuration that sets ``pool_pre_ping`` itself gets SQLAlchemy's own.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final

from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine

__all__ = ["RECENT", "install", "is_checked", "trusting_recent_connections"]

#: Seconds since its return within which a joined transaction's connection
#: is not pinged.
RECENT: Final = 1.0

_CHECKED_IN_AT: Final = "sparc.sa.checked_in_at"
_MARK: Final = "_sparc_sa_liveness"
_trust_recent: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "sparc.sa trust recent connections", default=False
)


def install(engine: Engine) -> None:
    """Check *engine*'s connections on checkout (see the module docstring)."""
    dialect = engine.dialect

    def on_checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        returned = record.info.get(_CHECKED_IN_AT)
        if returned is None:
            return  # fresh from connect(): alive by construction
        if _trust_recent.get() and time.monotonic() - returned < RECENT:
            return
        if not _ping(dialect, dbapi_connection):
            # As SQLAlchemy's pre-ping: this connection and every older one
            # in the pool are replaced, and the checkout is tried again.
            raise sa_exc.InvalidatePoolError()

    def on_checkin(dbapi_connection: Any, record: Any) -> None:
        if record is not None:
            record.info[_CHECKED_IN_AT] = time.monotonic()

    event.listen(engine, "checkout", on_checkout)
    event.listen(engine, "checkin", on_checkin)
    engine.__dict__[_MARK] = True


def _ping(dialect: Any, dbapi_connection: Any) -> bool:
    """As SQLAlchemy's pre-ping: False for a connection the server dropped."""
    try:
        return bool(dialect.do_ping(dbapi_connection))
    except dialect.loaded_dbapi.Error as error:
        if dialect.is_disconnect(error, dbapi_connection, None):
            return False
        raise


def is_checked(engine: Engine) -> bool:
    """Whether connections are checked for liveness as they leave the pool."""
    return bool(engine.__dict__.get(_MARK) or getattr(engine.pool, "_pre_ping", False))


@contextmanager
def trusting_recent_connections() -> Iterator[None]:
    """Within: skip the ping of a connection returned moments ago."""
    token = _trust_recent.set(True)
    try:
        yield
    finally:
        _trust_recent.reset(token)
