"""Liveness checks on checkout: a connection the server killed while it sat
in the pool is never handed to a block.

Server engines built by the factory use SQLAlchemy's own ``pool_pre_ping``:
each connection that has been used before is pinged as it leaves the pool.
The one addition: a connection taken for a Zope request (a joined
transaction) is not pinged if a Zope request took it less than
:data:`RECENT` seconds earlier, so it cannot have sat idle in the pool for
longer than that. A busy site reuses its connections within milliseconds, so
this saves a round trip on nearly every request. If such a connection did
die in that moment, the request's first statement fails with a disconnect;
nothing has been committed, and the error reaches Zope's publisher as a
``TransientError``, so the request is published again on a fresh connection.
Outside joined transactions every checkout is pinged, exactly as
``pool_pre_ping`` does.

The addition wraps the ping of the engine's own dialect, so a checkout
outside a Zope request runs SQLAlchemy's code path unchanged: no pool event
listener, nothing per checkout or checkin beyond what ``pool_pre_ping``
itself costs (see docs/benchmarks.rst).

A configuration that sets ``pool_pre_ping`` itself gets SQLAlchemy's own,
pinging every checkout.
"""

from __future__ import annotations

import contextvars
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final

from sqlalchemy.engine import Engine

__all__ = ["RECENT", "install", "is_checked", "trusting_recent_connections"]

#: Seconds since a Zope request last took it within which a joined
#: transaction's connection is not pinged.
RECENT: Final = 1.0

_MARK: Final = "_sparc_sa_liveness"
_trust_recent: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "sparc.sa trust recent connections", default=False
)


def install(engine: Engine) -> None:
    """Check *engine*'s connections on checkout (see the module docstring).

    *engine* must have been created with ``pool_pre_ping=True``.
    """
    dialect = engine.dialect
    # SQLAlchemy's pre-ping calls the dialect's do_ping (2.1 through
    # _do_ping_w_event, which handles the errors): wrap it for this engine's
    # own dialect instance, so both versions go through the check below. The
    # dialect class's own do_ping is looked up on each ping, as it is for an
    # engine without the wrapper.
    dialect_class = type(dialect)
    # DBAPI connection -> when a joined transaction last took it. Weak keys:
    # an entry goes with its connection. Only joined checkouts write here.
    taken_at: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()

    def checked_ping(dbapi_connection: Any) -> bool:
        # SQLAlchemy's pre-ping calls this for every checkout of a connection
        # that is not fresh from connect(); outside Zope requests, it pings.
        if _trust_recent.get():
            now = time.monotonic()
            try:
                last = taken_at.get(dbapi_connection)
                taken_at[dbapi_connection] = now
            except TypeError:  # a driver whose connections take no weak reference
                last = None
            # Idle in the pool for less than the time since it was last taken.
            if last is not None and now - last < RECENT:
                return True
        return dialect_class.do_ping(dialect, dbapi_connection)

    # An instance attribute shadows the method for this engine's dialect only.
    dialect.do_ping = checked_ping  # type: ignore[method-assign]
    engine.__dict__[_MARK] = True


def is_checked(engine: Engine) -> bool:
    """Whether connections are checked for liveness as they leave the pool."""
    return bool(engine.__dict__.get(_MARK) or getattr(engine.pool, "_pre_ping", False))


@contextmanager
def trusting_recent_connections() -> Iterator[None]:
    """Within: skip the ping of a connection a Zope request took moments ago."""
    token = _trust_recent.set(True)
    try:
        yield
    finally:
        _trust_recent.reset(token)
