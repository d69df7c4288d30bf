"""SQLAlchemy's private names that sparc.sa relies on, and those of the
drivers under it (see the package). This module imports no driver: each
is used only where it is installed."""

from __future__ import annotations

from collections.abc import Coroutine, Iterable
from typing import Any, Final

__all__ = [
    "CONNECTION_FOR_BIND",
    "adapted_connection",
    "adapter_began",
    "aiosqlite_connection",
    "connections_of",
    "driver_transport",
    "is_clean",
    "isolation_lookup",
    "limit_clause",
    "max_overflow",
    "pool_class_is_asyncio",
    "pool_timeout",
    "pre_pings",
    "psycopg_has_start_query",
    "psycopg_start_query",
    "savepoint_name",
    "start_adapter_transaction",
]

# -- SQLAlchemy -------------------------------------------------------------------------

#: The method of ``SessionTransaction`` that takes the connection for a
#: session's transaction and begins it; its frame's locals ``self``,
#: ``bind`` and ``execution_options`` say how. The liveness check looks for
#: it up the stack of a checkout (sparc.sa.tx.liveness).
CONNECTION_FOR_BIND: Final = "_connection_for_bind"


def connections_of(transaction: Any) -> Iterable[tuple[Any, ...]]:
    """The connections *transaction* (a ``SessionTransaction``) holds, each
    as ``(connection, connection transaction, should commit, autoclose)``:
    its ``_connections``, by bind. None taken yet: empty."""
    return getattr(transaction, "_connections", {}).values()


def savepoint_name(transaction: Any) -> str | None:
    """The SAVEPOINT's name of *transaction* (a Core ``NestedTransaction``),
    or None for any other transaction."""
    return getattr(transaction, "_savepoint", None)


def is_clean(session: Any) -> bool:
    """Whether *session* holds nothing to flush (nothing new, deleted or
    modified): ``Session._is_clean()``, without the walk over every object
    that ``session.dirty`` makes."""
    return bool(session._is_clean())


def pre_pings(pool: Any) -> bool:
    """Whether *pool* pings connections as they leave it (``pool_pre_ping``)."""
    return bool(getattr(pool, "_pre_ping", False))


def max_overflow(pool: Any, default: Any = None) -> Any:
    """A ``QueuePool``'s ``max_overflow``, or *default*."""
    return getattr(pool, "_max_overflow", default)


def pool_timeout(pool: Any) -> Any:
    """A pool's ``timeout`` setting (``QueuePool``), or None."""
    return getattr(pool, "_timeout", None)


def pool_class_is_asyncio(poolclass: Any) -> bool:
    """Whether *poolclass* is one of SQLAlchemy's asyncio pools."""
    return bool(getattr(poolclass, "_is_asyncio", False))


def isolation_lookup(dialect: Any) -> Any:
    """The isolation levels *dialect* knows, where it keeps them in a table
    (SQLite, psycopg, psycopg2, SQL Server), else None. Unlike the public
    ``get_isolation_level_values()``, this needs no DBAPI connection."""
    return getattr(dialect, "_isolation_lookup", None)


def limit_clause(query: Any) -> Any:
    """The LIMIT *query* (an ORM ``Query``) has, or None."""
    return getattr(query, "_limit_clause", None)


# -- SQLAlchemy's adapters of asyncio drivers --------------------------------------------


def adapted_connection(adapter: Any) -> Any:
    """The driver's connection under SQLAlchemy's adapter *adapter*
    (psycopg's ``AsyncConnection``)."""
    return adapter._connection


def adapter_began(adapter: Any) -> bool:
    """Whether SQLAlchemy's asyncpg adapter *adapter* has started its
    transaction (``_started`` on SQLAlchemy 2.0; ``_transaction`` set, on 2.1)."""
    started = getattr(adapter, "_started", None)  # SQLAlchemy 2.0 only
    return bool(started or (started is None and adapter._transaction is not None))


def start_adapter_transaction(adapter: Any) -> Coroutine[Any, Any, Any]:
    """SQLAlchemy's asyncpg adapter's own start of its transaction, as its
    first statement would make it (isolation level, read-only, deferrable)."""
    return adapter._start_transaction()  # type: ignore[no-any-return]


# -- drivers ----------------------------------------------------------------------------


def psycopg_has_start_query(connection_class: Any) -> bool:
    """Whether psycopg's *connection_class* begins its transactions with
    ``_start_query()``."""
    return hasattr(connection_class, "_start_query")


def psycopg_start_query(connection: Any) -> Any:
    """psycopg's own BEGIN of *connection*'s next transaction, as it would
    send it before the first statement: a generator for ``connection.wait()``,
    which sends nothing if a transaction is already open."""
    return connection._start_query()


def driver_transport(driver: Any) -> Any:
    """The asyncio transport of an asyncpg connection (``_transport``), or
    of an aiomysql or asyncmy one (``_writer.transport``), else None."""
    transport = getattr(driver, "_transport", None)  # asyncpg
    if transport is None:  # asyncmy, aiomysql
        transport = getattr(getattr(driver, "_writer", None), "transport", None)
    return transport


def aiosqlite_connection(driver: Any) -> Any:
    """The sqlite3 connection under aiosqlite's *driver* connection, or None
    (aiosqlite keeps it as ``_connection``, None once closed)."""
    return getattr(driver, "_connection", None)
