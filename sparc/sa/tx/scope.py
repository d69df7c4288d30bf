"""The scope registry: one session per thread or asyncio task.

A *scope* is the running asyncio task when there is one, otherwise the
current thread (a greenlet under gevent's monkey-patching). Each scope has
its own session, made on first use and kept for the scope's lifetime, and
its stack of open blocks. When a thread, task or greenlet ends, its session
is closed at once and its connection goes back to the pool, without waiting
for the garbage collector.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import threading
import weakref
from asyncio import current_task as _current_task
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import event as sa_event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sparc.sa.connections import fork
from sparc.sa.foreign.of_asyncio import running_loop
from sparc.sa.tx import begun
from sparc.sa.tx.gate import gate_for

if TYPE_CHECKING:
    from asyncio import Task

    from sparc.sa.tx.datamanager import SessionDataManager

__all__ = [
    "OpenBlock",
    "Scope",
    "ScopeRegistry",
    "ThreadScope",
    "after_interruption",
    "close_abandoned",
    "note_interruption",
    "watch_pool_interruptions",
]

logger = logging.getLogger("sparc.sa.scope")  # its name before the move
_get_ident = threading.get_ident


class OpenBlock(Protocol):
    """What the scope needs of a block on its stack."""

    def cancel(self) -> None:
        """Mark the block rolled back by someone else: its end raises."""


class Scope:
    """One thread's or task's session and its stack of open blocks."""

    __slots__ = (
        "__weakref__",
        "blocks",
        "doomed",
        "engine",
        "forgotten",
        "interrupted",
        "joined",
        "pid",
        "session",
        "set_aside",
        "thread",
        "watched",
    )

    def __init__(self, engine: Engine) -> None:
        self.session: Session | None = None
        # The scope's own session while an outermost read-only block runs in
        # a session of its own (sparc.sa.replicas.readonly): closed with the scope too.
        self.set_aside: Session | None = None
        # The open blocks, outermost first. Held weakly: a block whose `with`
        # statement is gone without its __exit__ having run (interrupted before
        # it began) dies, and its __del__ rolls it back instead of wedging us.
        self.blocks: list[weakref.ref[Any]] = []
        self.doomed = False  # a joined inner block failed; the outer must roll back
        self.forgotten = False  # inherited across os.fork(): never touch again
        # A block of this scope was interrupted (KeyboardInterrupt and the like):
        # 0 no, 1 yes, 2 yes and inside the engine's pool.
        self.interrupted = 0
        self.joined: SessionDataManager | None = None  # the transaction we are in
        self.pid = os.getpid()
        self.thread = _get_ident()
        self.engine = engine
        # The thread's manager of the `transaction` package, once its begins
        # are watched (sparc.sa.tx.begun): asked once per scope, not per block.
        self.watched: Any = None

    def cancel_open_blocks(self) -> None:
        """Empty the stack; every block still open on it raises when it ends."""
        for ref in self.blocks:
            block = ref()
            if block is not None:
                block.cancel()
        self.blocks.clear()
        self.doomed = False


class ThreadScope(Scope):
    """A thread's scope. It lives in a ``threading.local``, which CPython
    empties as soon as the thread ends, so ``__del__`` runs then, in that
    thread, rather than whenever the garbage collector gets to the session."""

    __slots__ = ()

    def __del__(self) -> None:
        close_abandoned(self)


class ScopeRegistry:
    """The scopes of one transaction manager: a ``threading.local`` for
    threads, a dict for asyncio tasks (emptied as each task finishes)."""

    __slots__ = ("__weakref__", "engine", "local", "tasks")

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.local = threading.local()
        self.tasks: dict[Task[Any], Scope] = {}

    def current(self) -> Scope:
        """The current task's or thread's scope, made on first use."""
        scope = self.existing()
        if scope is not None:
            return scope
        task = _current_task() if running_loop() is not None else None
        if task is not None:
            scope = self.tasks[task] = Scope(self.engine)
            task.add_done_callback(self._task_done)
        else:
            scope = self.local.scope = ThreadScope(self.engine)
            if "gevent" in sys.modules:
                _link_greenlet(scope)
        return scope

    def watch_set_aside(self, scope: Scope) -> None:
        """Close *scope*'s set-aside session when its thread ends, even while
        a block holds the scope (a task's ending closes it already)."""
        local = self.local
        if isinstance(scope, ThreadScope) and getattr(local, "scope", None) is scope:
            # One watch per thread and scope, kept: replacing it on every
            # block would make the old one's __del__ close the session just
            # set aside, and cost an object per block.
            watch = getattr(local, "set_aside_watch", None)
            if watch is None or watch.scope is not scope:
                local.set_aside_watch = SetAsideWatch(scope)

    def existing(self) -> Scope | None:
        """The current scope if it was made already, else None."""
        if running_loop() is not None:
            task = _current_task()
            if task is not None:
                return self.tasks.get(task)
        scope: Scope | None = getattr(self.local, "scope", None)
        return scope

    def _task_done(self, task: Task[Any]) -> None:
        scope = self.tasks.pop(task, None)
        if scope is not None:
            close_abandoned(scope)

    def forget_after_fork(self) -> None:
        """In a forked child: never touch the parent's scopes again."""
        scopes = [*self.tasks.values(), getattr(self.local, "scope", None)]
        for scope in scopes:
            if scope is not None:
                scope.forgotten = True
                fork.orphan(scope.session)
                if scope.set_aside is not None:
                    fork.orphan(scope.set_aside)
        self.tasks = {}
        self.local = threading.local()


def close_abandoned(scope: Scope) -> None:
    """Close the session of a scope whose thread or task has ended."""
    # getattr: a scope whose __init__ was interrupted (a KeyboardInterrupt)
    # is collected without some of its attributes.
    if getattr(scope, "forgotten", False):
        return
    close_set_aside(scope)
    session = getattr(scope, "session", None)
    if session is None:
        return
    if os.getpid() != scope.pid:
        # Inherited across fork (threads other than the forking one vanish in
        # the child, and their thread-locals with them): the session belongs
        # to the parent. Checked first: even at shutdown it must stay pinned.
        scope.session = None
        fork.orphan(session)
        return
    if scope.blocks or scope.joined is not None:
        # A block of this scope is still open, handed to another thread or
        # task to close, or the session belongs to a Zope transaction that is
        # still running: whoever ends those finishes and resets the session.
        joined = scope.joined
        if joined is not None and isinstance(scope, ThreadScope) and joined.may_lose_work():
            begun.warn_left(joined)  # most likely nobody will: say so
        return
    scope.session = None
    if sys.is_finalizing():
        # The interpreter is exiting: the server rolls back what the dying
        # connection held, and modules may already be half torn down.
        return
    gevent = sys.modules.get("gevent")
    if gevent is not None and _in_gevent_hub(gevent):
        # gevent ends a greenlet's locals from its event loop, which must not
        # block; closing may talk to the server (ROLLBACK).
        gevent.spawn(_close_session, scope.engine, session)
        return
    _close_session(scope.engine, session)


def close_set_aside(scope: Scope) -> None:
    """Close the session a read-only block still open set aside, once the
    scope's thread or task has ended: no block uses it, and nothing of the
    ended thread or task will again."""
    aside = getattr(scope, "set_aside", None)
    if aside is None or getattr(scope, "forgotten", False):
        return
    scope.set_aside = None
    if os.getpid() != scope.pid:
        fork.orphan(aside)
    elif not sys.is_finalizing():
        _close_session(scope.engine, aside)


class SetAsideWatch:
    """Kept in a thread's ``threading.local`` while a read-only block has set
    the thread's session aside. The block still open holds the scope, so the
    scope outlives the thread; this does not, and closes that session as
    the thread ends."""

    __slots__ = ("scope",)

    def __init__(self, scope: Scope) -> None:
        self.scope = scope

    def __del__(self) -> None:
        close_set_aside(self.scope)


def _close_session(engine: Engine, session: Session) -> None:
    try:
        gate = gate_for(engine.pool)
        if gate is None or not session.in_transaction():
            session.close()
        else:
            gate.close_when_free(session)
    except Exception:
        logger.warning("closing the session of an ended thread or task failed", exc_info=True)


def _in_gevent_hub(gevent: Any) -> bool:
    try:
        return bool(gevent.getcurrent() is gevent.get_hub())
    except Exception:  # pragma: no cover - a half-initialised gevent
        return False


def _link_greenlet(scope: Scope) -> None:
    """Under gevent's monkey-patching a "thread" is a greenlet, and its
    thread-local lives as long as the Greenlet object does (often held by
    whoever spawned it). Close the scope's session as soon as it ends instead."""
    gevent = sys.modules["gevent"]
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None or not monkey.is_module_patched("threading"):
        return
    current = gevent.getcurrent()
    rawlink = getattr(current, "rawlink", None)
    if rawlink is None:  # the hub, or a raw greenlet: nothing to watch
        return
    ref = weakref.ref(scope)

    def ended(greenlet: Any) -> None:
        found = ref()
        if found is not None:
            close_abandoned(found)  # from the hub: it spawns the close

    rawlink(ended)


# -- interruptions --------------------------------------------------------------


def note_interruption(scope: Scope, tb: TracebackType | None) -> None:
    """Remember that a block of *scope* was interrupted (KeyboardInterrupt,
    SystemExit...), and whether inside the connection pool."""
    in_pool = False
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename.replace(os.sep, "/")
        if "/sqlalchemy/pool/" in name or name.endswith("/sqlalchemy/util/queue.py"):
            in_pool = True
            break
        tb = tb.tb_next
    scope.interrupted = max(scope.interrupted, 2 if in_pool else 1)


#: In an engine's ``__dict__``: the scope registries told of interruptions
#: that its pool reports (:func:`watch_pool_interruptions`).
_POOL_WATCHERS = "sparc.sa pool interruptions"


def watch_pool_interruptions(registry: ScopeRegistry) -> None:
    """Let the pool of *registry*'s engine report interruptions that no
    block sees.

    An interruption can land inside SQLAlchemy's finaliser of a connection
    that the garbage collector frees, which Python then swallows: no block
    hears of it. On SQLAlchemy 2.0.0 (not 2.1.9) such a finaliser stops
    before it checks the connection in, and the pool's count keeps it. The
    finaliser does report it, as an invalidation whose error is the
    interruption; the current scope of each registry is then marked, so
    that its next outermost block replaces the pool (:func:`after_interruption`).
    One listener per engine; registries are held weakly."""
    engine = registry.engine
    watchers: weakref.WeakSet[ScopeRegistry] | None = engine.__dict__.get(_POOL_WATCHERS)
    if watchers is None:
        watchers = engine.__dict__[_POOL_WATCHERS] = weakref.WeakSet()
        sa_event.listen(engine, "invalidate", _invalidated_listener(watchers))
    watchers.add(registry)


def _invalidated_listener(watchers: weakref.WeakSet[ScopeRegistry]) -> Any:
    def invalidated(dbapi_connection: Any, record: Any, error: BaseException | None) -> None:
        if error is None or isinstance(error, Exception):
            return  # a failed connection: the pool's own business
        for registry in list(watchers):
            scope = registry.existing()
            if scope is not None:
                scope.interrupted = 2

    return invalidated


def after_interruption(scope: Scope) -> None:
    """The first outermost block after an interruption of this scope.

    An interruption that lands inside SQLAlchemy's connection handling can
    leave a connection that nothing refers to but a reference cycle, holding
    its locks until the garbage collector runs SQLAlchemy's finaliser, which
    rolls it back and returns it; by now the interrupted code's exception is
    gone, so collect. One that lands inside the pool itself can lose a
    connection from the pool's bookkeeping for good: replace the pool. Other
    threads' checked-out connections go on working and are discarded when
    returned."""
    where = "inside the connection pool" if scope.interrupted == 2 else "during a block"
    scope.interrupted = 0
    gc.collect()
    if gate_for(scope.engine.pool) is not None:
        return  # one shared connection: it is the database (in-memory SQLite), keep it
    # Where an interruption lands is not always known (one inside a
    # finaliser is swallowed by Python), so the pool is replaced after any.
    logger.warning(
        "a block was interrupted %s; replacing the pool of %r so that no "
        "connection is lost from its count",
        where,
        scope.engine,
    )
    scope.engine.dispose()
