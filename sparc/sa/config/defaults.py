"""Engine configuration: the two defaults sparc.sa sets (see
:func:`sparc.sa.options.normalize`)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import pool as sa_pool
from sqlalchemy.engine import URL

from sparc.sa.config.conversions import QUEUE_POOL_OPTIONS

# -- defaults -----------------------------------------------------------------


def is_async_url(url: URL) -> bool:
    """True when the URL names an asyncio driver (postgresql+asyncpg, ...)."""
    try:
        return bool(getattr(url.get_dialect(), "is_async", False))
    except Exception:  # an unknown dialect is reported by create_engine()
        return False


def is_memory_sqlite(url: URL) -> bool:
    """True for a SQLite URL whose database lives only in memory."""
    if url.get_backend_name() != "sqlite":
        return False
    return url.database in (None, "", ":memory:", "file::memory:") or (
        url.query.get("mode") == "memory"
    )


def apply_defaults(url: URL, kwargs: dict[str, Any]) -> None:
    if url.get_backend_name() == "sqlite":
        if is_memory_sqlite(url):
            sizing = sorted(QUEUE_POOL_OPTIONS.intersection(kwargs))
            if sizing and "poolclass" not in kwargs and "pool" not in kwargs:
                raise ValueError(
                    f"create_engine option(s) {', '.join(map(repr, sizing))} size a pool of "
                    "many connections, but each connection to an in-memory SQLite "
                    "database has a database of its own, so every thread would see "
                    "an empty one. Leave them out (sparc.sa then shares one database "
                    "through StaticPool), or use a SQLite file"
                )
            user_chose_pool = "poolclass" in kwargs or "pool" in kwargs or "creator" in kwargs
            if not user_chose_pool:
                kwargs["poolclass"] = sa_pool.StaticPool
            if url.get_driver_name() in ("pysqlite", "pysqlcipher"):
                connect_args = dict(kwargs.get("connect_args") or {})
                connect_args.setdefault("check_same_thread", False)
                kwargs["connect_args"] = connect_args
    else:
        kwargs.setdefault("pool_pre_ping", True)
