"""Replicas: an engine configuration's replica keys, and attaching the
replica engines to their primary."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from sqlalchemy.engine import Engine

from sparc.sa.replicas import gtid
from sparc.sa.replicas.routing import ATTR, ReplicaSet

#: The keys of an engine configuration that describe its replicas.
REPLICA_KEYS: Final = ("replicas", "replica_max_lag", "replica_wait")


# -- configuration -----------------------------------------------------------------


def split_config(section: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``(primary config, replica options or None)`` from an engine config section."""
    primary = {key: value for key, value in section.items() if key not in REPLICA_KEYS}
    if not any(key in section for key in REPLICA_KEYS):
        return primary, None
    raw = section.get("replicas")
    if raw is None:
        raw = []
    if isinstance(raw, str):
        raw = raw.split()
    if not isinstance(raw, Sequence):
        raise TypeError(
            f"'replicas' must be a list of DSNs or of {{'dsn': ..., 'kwargs': {{...}}}} "
            f"mappings (or a space-separated string), got {type(raw).__name__}"
        )
    shared = section.get("kwargs") or {}
    configs = []
    for index, entry in enumerate(raw):
        if isinstance(entry, str):
            configs.append({"dsn": entry, "kwargs": dict(shared)})
        elif isinstance(entry, Mapping):
            unknown = sorted(str(key) for key in entry if key not in ("dsn", "kwargs"))
            if unknown or "dsn" not in entry:
                raise ValueError(
                    f"replicas[{index}] must be a DSN or a mapping with 'dsn' and optionally "
                    f"'kwargs', got keys {sorted(map(str, entry))}"
                )
            own = entry.get("kwargs") or {}
            if not isinstance(own, Mapping):
                raise TypeError(f"replicas[{index}]['kwargs'] must be a mapping")
            configs.append({"dsn": entry["dsn"], "kwargs": {**shared, **own}})
        else:
            raise TypeError(
                f"replicas[{index}] must be a DSN string or a mapping, got {type(entry).__name__}"
            )
    return primary, {
        "replicas": configs,
        "max_lag": _seconds(section, "replica_max_lag", None),
        "wait": _seconds(section, "replica_wait", 0.2),
    }


def _seconds(section: Mapping[str, Any], name: str, default: float | None) -> float | None:
    value = section.get(name)
    if value is None or value == "":
        return default
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = -1.0
    if not seconds >= 0 or not math.isfinite(seconds):
        raise ValueError(
            f"{name!r} must be a number of seconds (0 or more, and finite), got {value!r}"
        )
    return seconds


def attach(primary: Engine, options: dict[str, Any], build: Callable[[Any], Any]) -> ReplicaSet:
    """Build the replica engines with *build* and attach them to *primary*."""
    from sparc.sa.config.secrets import hide_dsn

    mariadb = primary.dialect.name in gtid.DIALECTS  # GTID positions (sparc.sa.replicas.gtid)
    if primary.dialect.name != "postgresql" and not mariadb:
        raise ValueError(
            f"'replicas' are supported for PostgreSQL and MariaDB only (read-your-writes "
            f"rests on their WAL positions and GTIDs), got a {primary.dialect.name} engine "
            f"for {hide_dsn(primary.url)}"
        )
    engines = [build(config) for config in options["replicas"]]
    for engine in engines:
        sync = getattr(engine, "sync_engine", engine)
        if sync.dialect.is_async != primary.dialect.is_async:
            raise ValueError(_mismatch(primary, sync))
        if mariadb:
            if sync.dialect.name not in gtid.DIALECTS:
                raise ValueError(
                    f"a replica must be a MariaDB database like its primary, got "
                    f"{hide_dsn(sync.url)}"
                )
            gtid.keep_read_only(sync)
        elif sync.dialect.name != "postgresql":
            raise ValueError(
                f"a replica must be a PostgreSQL database like its primary, got "
                f"{hide_dsn(sync.url)}"
            )
    rs = ReplicaSet(primary, engines, max_lag=options["max_lag"], wait=options["wait"])
    primary.__dict__[ATTR] = rs
    return rs


def _mismatch(primary: Engine, replica: Engine) -> str:
    from sparc.sa.config.secrets import hide_dsn

    def kind(engine: Engine) -> str:
        mode = "an asyncio" if engine.dialect.is_async else "a synchronous"
        return f"{mode} driver ({engine.dialect.driver})"

    example = (
        "mysql+asyncmy:// for both or mysql+pymysql:// for both"
        if primary.dialect.name in gtid.DIALECTS
        else "postgresql+asyncpg:// for both or postgresql+psycopg:// for both"
    )
    return (
        f"replica {hide_dsn(replica.url)} has {kind(replica)} and its primary "
        f"{hide_dsn(primary.url)} has {kind(primary)}: a replica serves the "
        f"primary's manager, so both need the same kind, e.g. {example}"
    )
