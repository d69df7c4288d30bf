"""Adapters that explain a lookup that would otherwise find nothing.

A lookup made with the wrong kind of engine:

``ISAScopedTransaction`` adapts a synchronous Engine and
``ISAAsyncScopedTransaction`` an AsyncEngine. Asking for one with the other
kind of engine finds nothing, and zope.component would say only that no
adapter was found; these fallbacks say which interface to ask for instead.

A lookup in a registry where sparc.sa's components were never registered (a
forgotten ``<include package="sparc.sa" />``, or a Pyramid application that
registered them in its own registry with ``config.include("sparc.sa")`` and
looks them up in zope.component's global one): :func:`install_hints` puts
adapters in that registry's empty places, which say what to include or
where to look. Registering the real adapters afterwards replaces them.
"""

from __future__ import annotations

import threading
from typing import Any, NoReturn

from zope.component import adapter, getGlobalSiteManager
from zope.interface.interfaces import ComponentLookupError

from sparc.sa.interfaces import (
    ISAAsyncEngine,
    ISAAsyncScopedTransaction,
    ISADeclarativeMeta,
    ISAEngine,
    ISAScopedTransaction,
)

__all__ = [
    "EngineKindError",
    "NotRegisteredError",
    "async_manager_for_sync_engine",
    "install_hints",
    "note_pyramid_registry",
    "sync_manager_for_async_engine",
]


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


class NotRegisteredError(ComponentLookupError, LookupError):  # type: ignore[misc]
    """sparc.sa's adapters are not registered in the registry looked in."""


# Whether config.include("sparc.sa") registered the components in a Pyramid
# registry in this process: the hint then says where they are. Written once
# at configuration time, read only to word a message.
_in_pyramid_registry = False
# Installing a hint reads, then writes the registry: two threads building
# engines at once must not both decide the place is empty.
_lock = threading.Lock()


def note_pyramid_registry() -> None:
    """config.include("sparc.sa") registered the components in a Pyramid
    application's registry."""
    global _in_pyramid_registry
    _in_pyramid_registry = True


def _not_registered(engine: Any, interface: str, block: str) -> NotRegisteredError:
    lookup = f"getMultiAdapter((engine, Base), {interface})"
    if _in_pyramid_registry:
        where = (
            'config.include("sparc.sa") registered them in the Pyramid application\'s '
            "registry, which zope.component's lookups use only after "
            f"config.hook_zca(): call it, or look up in that registry with "
            f"request.registry.{lookup} (or pass context=request.registry)"
        )
    else:
        where = (
            'include sparc.sa\'s ZCML in the site (<include package="sparc.sa" />; '
            "meta.zcml alone gives the directives, not the adapters); in Pyramid, "
            'config.include("sparc.sa"), then config.hook_zca() or '
            f"request.registry.{lookup}; elsewhere, sparc.sa.components.register()"
        )
    return NotRegisteredError(
        f"no {interface} adapter for {engine!r} is registered in the registry "
        f"this lookup used (zope.component's global registry, or the current site's) "
        f"to give the manager of `{block}` blocks: {where}"
    )


def sync_manager_not_registered(engine: Any, base: Any) -> NoReturn:
    raise _not_registered(engine, "ISAScopedTransaction", "with tx():")


def async_manager_not_registered(engine: Any, base: Any) -> NoReturn:
    raise _not_registered(engine, "ISAAsyncScopedTransaction", "async with tx():")


_HINTS = (
    (sync_manager_not_registered, (ISAEngine, ISADeclarativeMeta), ISAScopedTransaction),
    (async_manager_not_registered, (ISAAsyncEngine, ISADeclarativeMeta), ISAAsyncScopedTransaction),
)


def install_hints(registry: Any = None) -> None:
    """Put the explaining adapters in *registry*'s empty places (by default
    zope.component's global registry); a place that holds an adapter, real
    or mismatch, is left alone."""
    target = getGlobalSiteManager() if registry is None else registry
    with _lock:
        for factory, required, provided in _HINTS:
            if target.adapters.lookup(required, provided) is None:
                target.registerAdapter(factory, required, provided)
