"""The adapter cache: one shared transaction manager per engine and base.

Both adapters, ``(ISAEngine, ISADeclarativeMeta) -> ISAScopedTransaction``
and its asyncio twin, return the same manager for the same pair on every
lookup, so that the whole application shares one registry of sessions.
Managers are kept in a dict on the engine, keyed by the base's id and holding
the base weakly: dropping the engine drops its managers, and dropping a base
drops its entry (before its id can be reused).
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["check_base", "shared"]

_M = TypeVar("_M")

# Makes sure two threads that first look up one (engine, base) get one manager.
_lock = threading.Lock()


def shared(holder: dict[str, Any], attr: str, base: type[Any], make: Callable[[], _M]) -> _M:
    """The manager cached in ``holder[attr]`` for *base*, made by *make* on
    first use. *holder* is the engine's ``__dict__``."""
    cache = holder.get(attr)
    if cache is not None:
        entry = cache.get(id(base))
        if entry is not None and entry[0]() is base:
            return entry[1]  # type: ignore[no-any-return]
    check_base(base)
    with _lock:
        cache = holder.setdefault(attr, {})
        key = id(base)
        entry = cache.get(key)
        if entry is not None and entry[0]() is base:
            return entry[1]  # type: ignore[no-any-return]
        manager = make()

        def forget(ref: weakref.ref[Any], cache: dict[int, Any] = cache) -> None:
            # Runs as soon as the base dies, before its id can be reused.
            if cache.get(key, (None,))[0] is ref:
                del cache[key]

        cache[key] = (weakref.ref(base, forget), manager)
        return manager


def check_base(base: object) -> None:
    """A TypeError unless *base* is a declarative base class (not a model)."""
    if not isinstance(base, type):
        raise TypeError(f"expected a declarative base class, got {type(base).__name__} {base!r}")
    if "__mapper__" in vars(base) or "__table__" in vars(base):
        raise TypeError(
            f"{base.__module__}.{base.__qualname__} is a mapped model class; a "
            "transaction manager serves a declarative base: pass the Base the "
            "models derive from (declarative_base(), or a DeclarativeBase subclass)"
        )


def _after_fork_in_child() -> None:
    # A lock held by a thread at fork time stays held in the child, where that
    # thread does not exist: start the child with a fresh one.
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
