"""Fork safety: a child process never touches what its parent holds.

After ``os.fork()`` (gunicorn's pre-fork workers, multiprocessing's "fork"
start method) the child shares the parent's sockets. If the child used,
reset or even closed an inherited connection, it would talk over the parent's
session and corrupt it. So, in the child:

* engines built by the factory are disposed with ``close=False``, which
  replaces their pool without touching the old one;
* every transaction manager forgets its open scopes;
* everything inherited (old pools, sessions, connections) is kept alive for
  the rest of the child's life, so that no finaliser ever resets or closes it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import weakref
from typing import Any, Protocol

from sqlalchemy.engine import Engine

__all__ = ["orphan", "track", "track_engine"]


class _Forgetful(Protocol):
    def forget_after_fork(self) -> None: ...


# Guards the two registries below; replaced in the child because the thread
# that held it at fork time does not exist there.
_lock = threading.Lock()
_engines: weakref.WeakSet[Engine] = weakref.WeakSet()
_managers: weakref.WeakSet[Any] = weakref.WeakSet()

# What the child inherited and must never finalise: a pooled connection that
# is garbage-collected is rolled back (and a psycopg2 one is closed) over the
# parent's socket. The list itself is given one reference that is never
# released, so even interpreter shutdown leaves its contents alone.
_orphans: list[Any] = []
with contextlib.suppress(AttributeError):  # not CPython: nothing to pin
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(_orphans))


def track_engine(engine: Engine) -> None:
    """Dispose *engine*'s pool, without closing it, in any forked child."""
    with _lock:
        _engines.add(engine)


def track(manager: _Forgetful) -> None:
    """Call ``manager.forget_after_fork()`` in any forked child."""
    with _lock:
        _managers.add(manager)


def orphan(obj: object) -> None:
    """Keep *obj*, inherited from the parent, alive and untouched for good."""
    _orphans.append(obj)


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()
    for manager in list(_managers):
        manager.forget_after_fork()
    for engine in list(_engines):
        _orphans.append(engine.pool)
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_after_fork_in_child)
