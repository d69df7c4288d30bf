"""Events notified through zope.event."""

from __future__ import annotations

from typing import Any

# Importing zope.component.event installs its dispatcher into zope.event, so a
# <subscriber for=".IEngineCreatedEvent"> registered in ZCML receives our
# events even in a process that never imported it otherwise.
import zope.component.event  # noqa: F401
from sqlalchemy.engine import Engine
from zope.interface import implementer

from sparc.sa.interfaces import IEngineCreatedEvent

__all__ = ["EngineCreatedEvent", "IEngineCreatedEvent"]


@implementer(IEngineCreatedEvent)
class EngineCreatedEvent:
    """The factory built *engine* from *config* (secrets already hidden)."""

    def __init__(self, engine: Engine, config: dict[str, Any]) -> None:
        self.engine = engine
        self.config = config

    def __repr__(self) -> str:
        return f"<EngineCreatedEvent {self.config.get('dsn')}>"
