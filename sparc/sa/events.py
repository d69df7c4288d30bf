"""Events notified through zope.event."""

from __future__ import annotations

from typing import Any

# Importing zope.component.event installs its dispatcher into zope.event, so a
# <subscriber for=".IEngineCreatedEvent"> registered in ZCML receives our
# events even in a process that never imported it otherwise.
import zope.component.event  # noqa: F401
from sqlalchemy import event as sa_event
from sqlalchemy.engine import Engine
from zope.component import adapter
from zope.interface import implementer

from sparc.sa.interfaces import IEngineCreatedEvent

__all__ = ["EngineCreatedEvent", "IEngineCreatedEvent", "sqlite_foreign_keys"]


@implementer(IEngineCreatedEvent)
class EngineCreatedEvent:
    """The factory built *engine* from *config* (secrets already hidden)."""

    def __init__(self, engine: Engine, config: dict[str, Any]) -> None:
        self.engine = engine
        self.config = config

    def __repr__(self) -> str:
        return f"<EngineCreatedEvent {self.config.get('dsn')}>"


def sqlite_foreign_keys(event: IEngineCreatedEvent) -> None:
    """Enforce foreign keys on every connection of a new SQLite engine.

    SQLite leaves foreign key constraints unenforced unless each connection
    asks for them. Register this subscriber to ask for them::

        <subscriber handler="sparc.sa.events.sqlite_foreign_keys" />

    Engines of other databases are left alone.
    """
    engine = event.engine
    if engine.dialect.name == "sqlite":
        sa_event.listen(engine, "connect", _enable_foreign_keys)


def _enable_foreign_keys(dbapi_connection: Any, connection_record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


adapter(IEngineCreatedEvent)(sqlite_foreign_keys)
