"""Adapters that explain a lookup made with the wrong kind of engine.

``ISAScopedTransaction`` adapts a synchronous Engine and
``ISAAsyncScopedTransaction`` an AsyncEngine. Asking for one with the other
kind of engine finds nothing, and zope.component would say only that no
adapter was found; these fallbacks say which interface to ask for instead.
"""

from __future__ import annotations

from typing import Any, NoReturn

from zope.component import adapter
from zope.interface.interfaces import ComponentLookupError

from sparc.sa.interfaces import ISAAsyncEngine, ISADeclarativeMeta, ISAEngine

__all__ = ["EngineKindError", "async_manager_for_sync_engine", "sync_manager_for_async_engine"]


class EngineKindError(ComponentLookupError, TypeError):  # type: ignore[misc]
    """A transaction manager was looked up for the other kind of engine."""


def sync_manager_for_async_engine(engine: Any, base: Any) -> NoReturn:
    raise EngineKindError(
        f"{engine!r} is an AsyncEngine: look up ISAAsyncScopedTransaction for it "
        "(sparc.sa.interfaces) and use `async with tx():`; ISAScopedTransaction "
        "adapts a synchronous Engine"
    )


def async_manager_for_sync_engine(engine: Any, base: Any) -> NoReturn:
    raise EngineKindError(
        f"{engine!r} is a synchronous Engine: look up ISAScopedTransaction for it "
        "(sparc.sa.interfaces) and use `with tx():`, or build an AsyncEngine from "
        "a DSN with an asyncio driver (such as postgresql+asyncpg://) for "
        "ISAAsyncScopedTransaction"
    )


adapter(ISAAsyncEngine, ISADeclarativeMeta)(sync_manager_for_async_engine)
adapter(ISAEngine, ISADeclarativeMeta)(async_manager_for_sync_engine)
