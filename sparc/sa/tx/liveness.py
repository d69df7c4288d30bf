"""Liveness checks on checkout: a connection the server killed while it sat
in the pool is never handed to a block.

Server engines built by the factory use SQLAlchemy's own ``pool_pre_ping``:
each connection that has been used before is pinged as it leaves the pool.
Two additions. On PostgreSQL a block's checkout is checked by its BEGIN
(below). Elsewhere, a connection taken for a Zope request (a joined
transaction) is not pinged if a Zope request took it less than
:data:`RECENT` seconds earlier, so it cannot have sat idle in the pool for
longer than that. A busy site reuses its connections within milliseconds, so
this saves a round trip on nearly every request. If such a connection did
die in that moment, the request's first statement fails with a disconnect;
nothing has been committed, and the error reaches Zope's publisher as a
``TransientError``, so the request is published again on a fresh connection.
Outside joined transactions every checkout is pinged, exactly as
``pool_pre_ping`` does.

Both wrap the ping of the engine's own dialect, so any other checkout runs
SQLAlchemy's code path: no pool event listener, nothing per checkout or
checkin beyond what ``pool_pre_ping`` itself costs and the look at the
stack below (see docs/benchmarks.rst).

A configuration that sets ``pool_pre_ping`` itself gets SQLAlchemy's own
ping on every checkout, without that shortcut (and with the one below).

**The ping that is the BEGIN** (PostgreSQL with psycopg 3 or asyncpg). A
ping is a round trip of its own: psycopg sends ``;`` outside any transaction
and then, before the first statement, the transaction's BEGIN; SQLAlchemy's
asyncpg adapter sends BEGIN, ``;`` and ROLLBACK (since SQLAlchemy 2.0.21)
and then BEGIN again. When the checkout is the one a session of
sparc.sa's (:class:`sparc.sa.tx.sessions.BlockSession`) makes to begin its
transaction, the check is that transaction's own BEGIN, sent as the
connection leaves the pool, the one the driver would have sent before the
first statement: if the connection died in the pool, the BEGIN fails as
the ping would, and SQLAlchemy replaces the connection exactly as after a
failed ping. A block's one-row insert then takes three
round trips (BEGIN, INSERT, COMMIT) where a pinged ``sessionmaker.begin()``
takes four on psycopg and six on asyncpg (four before SQLAlchemy 2.0.21).

Which checkout is the session's own is read from the call stack: the ping
runs inside SQLAlchemy's ``SessionTransaction._connection_for_bind``, which
takes the connection for a session's transaction and begins it, and whose
arguments say how. That is the only place where nothing can come between
the checkout and the transaction's begin: a flag set by the session before
it asks for a connection would also be seen by any other checkout in
between (``engine.connect()`` or ``raw_connection()`` in application code,
which may go on to switch the connection to autocommit, refused once a
transaction has begun). The frame is found once by a walk up the stack and
then looked at directly: about 2 µs per checkout, 6 µs for a block's.

Not when anything could still change how the transaction begins, which the
driver only allows before it has begun: a checkout with execution options
(``session.connection(execution_options=...)``, or the session's own), on
an engine whose own execution options set a connection characteristic
(isolation level, read-only, deferrable), for a two-phase session or a
read-only block on the primary (its transaction begins READ ONLY), or for
anything but a session of sparc.sa's. Those are pinged as above. A
read-only block on a replica begins as any block does, so its checkout is
checked by its BEGIN too.
"""

from __future__ import annotations

import contextvars
import sys
import time
import weakref
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, Final

from sqlalchemy.engine import Engine
from sqlalchemy.orm.session import SessionTransaction
from sqlalchemy.util import concurrency

from sparc.sa.foreign.of_sqlalchemy import (
    CONNECTION_FOR_BIND,
    adapted_connection,
    adapter_began,
    pre_pings,
    psycopg_has_start_query,
    psycopg_start_query,
    start_adapter_transaction,
)
from sparc.sa.tx.sessions import READONLY, BlockSession

__all__ = [
    "RECENT",
    "begins_on_checkout",
    "install",
    "is_checked",
    "trusting_recent_connections",
]

#: Seconds since a Zope request last took it within which a joined
#: transaction's connection is not pinged.
RECENT: Final = 1.0

_MARK: Final = "_sparc_sa_liveness"
_BEGINS_MARK: Final = "_sparc_sa_begins_on_checkout"
_trust_recent: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "sparc.sa trust recent connections", default=False
)


def install(engine: Engine, *, trust_recent: bool = True) -> None:
    """Check *engine*'s connections on checkout (see the module docstring);
    *trust_recent*: with the shortcut for Zope requests.

    *engine* must have been created with ``pool_pre_ping=True``; for an
    ``AsyncEngine``, pass its ``sync_engine``.
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

    begin = _begin_for(engine)  # a key of BEGINS, looked up on each use
    loaded_dbapi_error = dialect.loaded_dbapi.Error

    def checked_ping(dbapi_connection: Any) -> bool:
        # SQLAlchemy's pre-ping calls this for every checkout of a connection
        # that is not fresh from connect(); outside Zope requests, it pings.
        if begin is not None and _begins_session_transaction(engine):
            try:
                if BEGINS[begin](dbapi_connection):
                    return True
            except loaded_dbapi_error as error:
                # As SQLAlchemy's ping: a disconnect replaces the connection.
                if dialect.is_disconnect(error, dbapi_connection, None):
                    return False
                raise
        if trust_recent and _trust_recent.get():
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
    engine.__dict__[_BEGINS_MARK] = begin is not None


def begins_on_checkout(engine: Engine) -> bool:
    """Whether a block's checkout from *engine* is checked by its BEGIN."""
    return bool(engine.__dict__.get(_BEGINS_MARK))


def is_checked(engine: Engine) -> bool:
    """Whether connections are checked for liveness as they leave the pool."""
    return bool(engine.__dict__.get(_MARK) or pre_pings(engine.pool))


@contextmanager
def trusting_recent_connections() -> Iterator[None]:
    """Within: skip the ping of a connection a Zope request took moments ago."""
    token = _trust_recent.set(True)
    try:
        yield
    finally:
        _trust_recent.reset(token)


# -- the ping that is the BEGIN ----------------------------------------------------------

_IDLE: Final = 0  # libpq's PQTRANS_IDLE: no transaction open
# How far up the stack SessionTransaction._connection_for_bind runs, counted
# from _begins_session_transaction (8 on SQLAlchemy 2.1.9, sync and asyncio
# alike). Found by a walk up to _DEPTH frames, then looked at directly:
# SQLAlchemy takes the same path to the ping from every session checkout,
# and a walk costs about 5 µs on Python 3.11, where each frame passed
# becomes an object; a direct look, about 1.
_DEPTH: Final = 16
_found_at: list[int] = []


def _begins_session_transaction(engine: Engine) -> bool:
    """Whether the checkout being pinged is the one a BlockSession makes on
    *engine* to begin its transaction, as it is (see the module docstring)."""
    if _found_at:
        try:
            frame = sys._getframe(_found_at[0])
        except ValueError:  # a shallower stack than any session checkout's
            return False
        if frame.f_code.co_name != CONNECTION_FOR_BIND:
            return False
        return _is_session_checkout(frame, engine)
    walked: FrameType | None = sys._getframe(2)
    for depth in range(2, _DEPTH):
        if walked is None:
            return False
        if walked.f_code.co_name == CONNECTION_FOR_BIND:
            if not _is_session_checkout(walked, engine):
                return False
            _found_at.append(depth)
            return True
        walked = walked.f_back
    return False


def _is_session_checkout(frame: FrameType, engine: Engine) -> bool:
    """*frame* runs ``_connection_for_bind``: is it the root transaction of
    a BlockSession taking a connection from *engine* as it is?"""
    local = frame.f_locals
    transaction = local.get("self")
    if not isinstance(transaction, SessionTransaction):
        return False  # Session's own: SessionTransaction's is further in
    session = transaction.session
    return (
        local.get("bind") is engine
        and transaction.parent is None
        and not local.get("execution_options")
        and not getattr(session, "execution_options", None)
        and isinstance(session, BlockSession)
        and not session.twophase
        # A read-only block on the primary begins READ ONLY (set as it
        # begins); one on a replica ("replica") begins as any block does.
        and session.info.get(READONLY) is not True
    )


def _begin_for(engine: Engine) -> str | None:
    """The key in :data:`BEGINS` of how to begin a transaction as the ping
    of *engine*'s connections; None where it cannot (see the module docstring)."""
    dialect = engine.dialect
    if dialect.name != "postgresql":
        return None
    characteristics = getattr(dialect, "connection_characteristics", {})
    if set(engine.get_execution_options()) & set(characteristics):
        return None  # set on each connection after checkout: before any BEGIN
    if dialect.driver == "psycopg":
        import psycopg

        if not psycopg_has_start_query(psycopg.Connection):  # pragma: no cover
            return None  # a psycopg without it: the ping as usual
        return "psycopg_async" if dialect.is_async else "psycopg"
    if dialect.driver == "asyncpg":
        return "asyncpg"
    return None


def _begin_psycopg(connection: Any) -> bool:
    """Send psycopg's own BEGIN now, as it would before the first statement
    (the same command: isolation level, READ ONLY, DEFERRABLE as set)."""
    if connection.autocommit or connection.pgconn.transaction_status != _IDLE:
        return False
    with connection.lock:
        connection.wait(psycopg_start_query(connection))
    return True


def _begin_psycopg_async(adapter: Any) -> bool:
    connection = adapted_connection(adapter)  # psycopg's AsyncConnection
    if connection.autocommit or connection.pgconn.transaction_status != _IDLE:
        return False
    _await_for(adapter)(_start_psycopg_async(connection))
    return True


async def _start_psycopg_async(connection: Any) -> None:
    async with connection.lock:
        await connection.wait(psycopg_start_query(connection))


def _begin_asyncpg(adapter: Any) -> bool:
    """Start SQLAlchemy's adapter's transaction now, as its first statement
    would (asyncpg's ``Transaction``, with the adapter's isolation level,
    read-only and deferrable settings)."""
    if adapter.isolation_level == "autocommit":
        return False
    if adapter_began(adapter):
        return False
    _await_for(adapter)(start_adapter_transaction(adapter))
    return True


def _await_for(adapter: Any) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    """The adapter's way to wait for a coroutine from sync code: its own
    (SQLAlchemy 2.0), else SQLAlchemy's ``await_`` (2.1; ``await_only`` in 2.0)."""
    own = getattr(type(adapter), "await_", None)
    if own is not None:
        return own  # type: ignore[no-any-return]
    return getattr(concurrency, "await_", None) or concurrency.await_only


#: How each driver begins a transaction as the ping: True if it did, False
#: if it cannot now (the caller pings). Looked up on each checkout, so that
#: bench/ can count these BEGINs.
BEGINS: dict[str, Callable[[Any], bool]] = {
    "psycopg": _begin_psycopg,
    "psycopg_async": _begin_psycopg_async,
    "asyncpg": _begin_asyncpg,
}
