"""The single-connection gate: blocks take turns on a pool that hands one
connection to everyone.

With ``StaticPool`` (in-memory SQLite, by default) every session of every
thread shares one DBAPI connection, and with ``SingletonThreadPool`` every
session of one thread does. A COMMIT or ROLLBACK by one would end the other's
transaction, so their blocks take turns: :class:`Gate` makes threads wait,
:class:`ThreadGate` refuses a second scope of the same thread (it could only
wait for itself). A pool's gate is made on first use and kept on the pool.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Final, Protocol

from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session
from sqlalchemy.pool import Pool, SingletonThreadPool, StaticPool

from sparc.sa.exceptions import InterleavedTransactionError
from sparc.sa.foreign.of_sqlalchemy import pool_timeout

__all__ = [
    "DEFAULT_GATE_TIMEOUT",
    "Gate",
    "GateCache",
    "Holder",
    "ThreadGate",
    "Waiter",
    "forget_gate",
    "gate_for",
    "gate_timeout",
    "quiet_close",
]

logger = logging.getLogger("sparc.sa.gate")  # its name before the move


class Holder(Protocol):
    """What a gate needs of the scope that takes it (a
    :class:`sparc.sa.tx.scope.Scope`, or an asyncio task's scope)."""

    @property
    def thread(self) -> int: ...


class Waiter(Protocol):
    """Who opens a block: a transaction manager, which says how long to wait."""

    @property
    def gate_timeout(self) -> float: ...


#: How long a block waits for a connection that every thread shares
#: (StaticPool) while another thread's block holds it, unless the pool says.
DEFAULT_GATE_TIMEOUT: Final = 30.0


class Gate:
    """Serialises blocks on a pool that hands one connection to every thread.

    With StaticPool every session shares one DBAPI connection, so a commit or
    rollback from one thread would end another thread's transaction. Blocks
    therefore take turns. Sessions of ended threads, whose close rolls the
    connection back, are closed only between blocks.

    Ownership is taken with ``dict.setdefault``, one C call that tests and
    sets at once: however a KeyboardInterrupt lands, ``owner`` tells exactly
    whether the gate was taken, so a block that fails to open can give it
    back. The gate may be released by another thread than the one that took
    it (a block closed elsewhere), which rules out an RLock.
    """

    __slots__ = ("_free", "_pending", "_state", "_waiting")

    def __init__(self) -> None:
        self._state: dict[str, Any] = {}  # {"owner": scope} while held
        self._waiting = 0  # threads inside acquire()'s wait loop
        # Reentrant: a block's __del__ (an abandoned block) may release the gate
        # while this thread is inside release() already.
        self._free = threading.Condition(threading.RLock())
        self._pending: list[Session] = []

    @property
    def owner(self) -> object:
        return self._state.get("owner")

    def acquire(self, scope: Holder, waiter: Waiter) -> bool:
        """Wait for the connection, at most the waiter's gate_timeout."""
        owner = self._state.setdefault("owner", scope)
        if owner is scope:
            return True
        if owner is not self and getattr(owner, "thread", None) == scope.thread:
            # Only this thread runs the holder, so waiting here would wait
            # for ourselves: another task, or another manager, of this thread.
            raise InterleavedTransactionError(
                "another block of this thread (an asyncio task, or a transaction "
                "manager for another Base) holds the engine's single shared "
                "connection; blocks on a StaticPool engine cannot interleave "
                "within one thread"
            )
        timeout = waiter.gate_timeout
        deadline = time.monotonic() + timeout
        with self._free:
            self._waiting += 1
            try:
                self._wait(scope, deadline, timeout)
            finally:
                self._waiting -= 1
        return True

    def _wait(self, scope: Holder, deadline: float, timeout: float) -> None:
        # Counted in _waiting before looking, under the condition's lock: a
        # release() that empties the gate after our look sees the count and
        # notifies; one before it left the gate free for setdefault to take.
        while self._state.setdefault("owner", scope) is not scope:
            left = deadline - time.monotonic()
            if left <= 0:
                raise sa_exc.TimeoutError(
                    f"waited {timeout:.1f} s for the connection that every thread of this "
                    "StaticPool engine shares, while another thread's block held "
                    "it; set the manager's gate_timeout to wait longer, or give "
                    "the engine a pool with more connections"
                )
            self._free.wait(left)

    def held_by(self, scope: object) -> bool:
        return self._state.get("owner") is scope

    def release(self, scope: object) -> None:
        if self._state.get("owner") is not scope:
            return
        while True:
            if self._pending:
                self._close_pending()
            self._state.pop("owner", None)
            if self._waiting:  # only then is the condition's lock worth taking
                with self._free:
                    self._free.notify()
            # A session queued by close_when_free() after our last look is not
            # lost: take the gate back to close it (or the next holder will).
            if not self._pending or self._state.setdefault("owner", self) is not self:
                return
            scope = self

    def _close_pending(self) -> None:
        with self._free:
            pending, self._pending = self._pending, []
        for session in pending:
            quiet_close(session)

    def close_when_free(self, session: Session) -> None:
        with self._free:
            self._pending.append(session)
        # Queued first, then try to become the one who closes it; if another
        # block holds the connection, its release() closes it.
        if self._state.setdefault("owner", self) is self:
            self.release(self)


class ThreadGate:
    """The same for SingletonThreadPool, whose connection is shared per thread:
    only the scopes (tasks) of one thread need to take turns, and they cannot
    wait for each other, so a second one is refused."""

    __slots__ = ("_local",)

    def __init__(self) -> None:
        self._local = threading.local()

    def acquire(self, scope: Holder, waiter: Waiter) -> bool:
        state = self._local.__dict__
        owner = state.setdefault("owner", scope)
        if owner is scope:
            return True
        raise InterleavedTransactionError(
            "another block of this thread holds its SingletonThreadPool "
            "connection; blocks on that connection cannot interleave"
        )

    def held_by(self, scope: object) -> bool:
        return self._local.__dict__.get("owner") is scope

    def release(self, scope: object) -> None:
        state = self._local.__dict__
        if state.get("owner") is not scope:
            return
        del state["owner"]
        pending = state.pop("pending", None)
        for session in pending or ():
            quiet_close(session)

    def close_when_free(self, session: Session) -> None:
        state = self._local.__dict__
        if state.get("owner") is None:
            quiet_close(session)
        else:
            state.setdefault("pending", []).append(session)


GATE_ATTR: Final = "_sparc_sa_gate"
_MISSING: Final = object()


def gate_for(pool: Pool) -> Gate | ThreadGate | None:
    """*pool*'s one gate, made on first use. Two threads that first meet a
    pool agree on its gate through ``dict.setdefault``, which is atomic; no
    lock, so an interruption (a ``KeyboardInterrupt``) at any point here
    cannot leave one held for the next block to wait on forever."""
    gate = pool.__dict__.get(GATE_ATTR, _MISSING)
    if gate is not _MISSING:
        return gate  # type: ignore[no-any-return]
    if isinstance(pool, StaticPool):
        gate = Gate()
    elif isinstance(pool, SingletonThreadPool):
        gate = ThreadGate()
    else:
        gate = None
    return pool.__dict__.setdefault(GATE_ATTR, gate)  # type: ignore[no-any-return]


def quiet_close(session: Session) -> None:
    try:
        session.close()
    except Exception:
        logger.warning("closing a session failed", exc_info=True)


def forget_gate(pool: Pool) -> None:
    """Drop *pool*'s gate: one inherited across fork in a held state would
    block the child forever."""
    pool.__dict__.pop(GATE_ATTR, None)


def gate_timeout(pool: Pool) -> float:
    """Seconds a block waits for a connection every thread shares
    (StaticPool): the pool's ``timeout`` if it has one, else 30."""
    timeout = pool_timeout(pool)
    return float(timeout) if isinstance(timeout, (int, float)) else DEFAULT_GATE_TIMEOUT


class GateCache:
    """The gate of an engine's current pool, looked up again only when the
    engine got a new pool (``dispose()``)."""

    __slots__ = ("gate", "pool")

    def __init__(self) -> None:
        self.pool: Pool | None = None
        self.gate: Gate | ThreadGate | None = None

    def refresh(self, pool: Pool) -> Gate | ThreadGate | None:
        self.gate = gate_for(pool)
        self.pool = pool
        return self.gate

    def current(self, pool: Pool) -> Gate | ThreadGate | None:
        return self.gate if pool is self.pool else self.refresh(pool)
