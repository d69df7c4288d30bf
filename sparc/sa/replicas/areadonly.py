"""The asyncio read-only block: ``async with atx(readonly=True):``.

The asyncio twin of :mod:`sparc.sa.replicas.readonly`, with the same rules: on a
replica that has replayed the task's own commits (and the *after* token),
else on the primary in a READ ONLY transaction; inside an open block of the
task, in that block's transaction, refusing writes. Waiting for a replica to
catch up sleeps with ``asyncio.sleep``, never blocking the event loop.
"""

from __future__ import annotations

import asyncio
import threading
import time
from types import TracebackType
from typing import Any

from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session
from sqlalchemy.util import greenlet_spawn

from sparc.sa.replicas.errors import read_only_end
from sparc.sa.replicas.guards import (
    after_begin,
    after_end,
    before_flush,
    do_orm_execute,
    guard,
    unguard,
)
from sparc.sa.replicas.positions import PRIMARY_ONLY, check_readonly_arguments, later, read_token
from sparc.sa.replicas.routing import Replica, ReplicaSet, Unusable, replica_set
from sparc.sa.replicas.tokens import ON_REPLICA, nested_wait
from sparc.sa.tx.asyncblock import AsyncBlock, AsyncBlockHost
from sparc.sa.tx.sessions import READONLY

__all__ = ["AsyncReadOnlyBlock", "async_readonly_block"]


def async_readonly_block(
    manager: AsyncBlockHost, readonly: object, after: object
) -> AsyncReadOnlyBlock:
    return AsyncReadOnlyBlock(manager, check_readonly_arguments(readonly, after, "atx"))


class AsyncReadOnlyBlock:
    """One ``async with atx(readonly=True):`` block."""

    __slots__ = ("_after", "_block", "_guarded", "_manager", "_replica", "_rs")

    def __init__(self, manager: AsyncBlockHost, after: str | None = None) -> None:
        self._manager = manager
        self._after = read_token(after)
        self._block: AsyncBlock | None = None
        self._guarded: Session | None = None
        self._replica: Replica | None = None
        self._rs: ReplicaSet | None = None

    @property
    def replica(self) -> Replica | None:
        """The replica this block runs on; None on the primary."""
        return self._replica

    async def __aenter__(self) -> AsyncSession:
        manager = self._manager
        task = asyncio.current_task()
        scope = manager.scopes.get(task) if task is not None else None
        if scope is not None and scope.blocks:
            # In the writing transaction around it, to see its uncommitted work.
            block = self._block = AsyncBlock(manager, True, readonly=True)
            session = await block.__aenter__()
            guarded = self._guarded = session.sync_session
            guard(guarded)
            if self._after[0]:
                try:
                    await self._honour(session)
                except BaseException as error:
                    self._guarded = None
                    unguard(guarded)
                    await block.__aexit__(type(error), error, error.__traceback__)
                    raise
            return session
        rs = self._rs = replica_set(manager.engine)
        if rs is not None:
            need = await greenlet_spawn(rs.need, self._after)
            if need != PRIMARY_ONLY:
                for replica in rs.candidates():
                    on_replica = await self._on_replica(manager, rs, replica, need)
                    if on_replica is not None:
                        rs.stats["replica"] += 1
                        return on_replica
            rs.stats["primary"] += 1
        block = self._block = AsyncBlock(manager, True, readonly=True, factory=_factory(manager))
        return await block.__aenter__()

    async def _honour(self, session: AsyncSession) -> None:
        """A token inside an open block (see :func:`sparc.sa.replicas.tokens.nested_wait`)."""
        rs = replica_set(self._manager.engine)
        if rs is None:
            need = self._after[0]
        else:
            need = await greenlet_spawn(rs.need, self._after)
        deadline = time.monotonic() + (rs.wait if rs is not None else 0.0)
        while (
            pause := await session.run_sync(lambda s: nested_wait(rs, s, need, deadline))
        ) is not None:
            await asyncio.sleep(pause)

    async def _on_replica(
        self, manager: AsyncBlockHost, rs: ReplicaSet, replica: Replica, need: Any
    ) -> AsyncSession | None:
        """The block on *replica* once it has replayed *need*; None if it
        cannot serve it now. A cancellation (a timeout around the block, say)
        while it connects or waits ends the block first: the task keeps no
        block open and no replica connection."""
        block = AsyncBlock(manager, True, readonly=True, factory=_factory(manager, replica))
        try:
            session = await block.__aenter__()  # connects
        except (sa_exc.DBAPIError, OSError) as error:
            rs.failed(replica, error)
            return None
        try:
            floor = replica.replayed
            if rs.mariadb:  # one MASTER_GTID_WAIT on the server (sparc.sa.replicas.gtid)
                await session.run_sync(lambda s: rs.check(replica, s, need))
                floor = later(floor, need)
            elif rs.needs_check(replica, need):
                deadline = time.monotonic() + rs.wait
                while not await session.run_sync(
                    lambda s: rs.measure(replica, s.connection(), need)
                ):
                    pause = rs.waited(deadline)
                    await session.rollback()  # the next check's snapshot is newer
                    await asyncio.sleep(pause)
                floor = later(floor, need)
            session.sync_session.info[ON_REPLICA] = (replica, floor)
        except BaseException as error:
            unusable = isinstance(error, (Unusable, sa_exc.DBAPIError, OSError))
            if unusable and not isinstance(error, Unusable):
                rs.failed(replica, error)
            await block.__aexit__(type(error), error, error.__traceback__)
            if unusable:
                return None
            raise
        self._block = block
        self._replica = replica
        return session

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        block = self._block
        if block is None:
            raise RuntimeError("this block was never entered")
        try:
            with read_only_end(self._rs, self._replica, exc):
                await block.__aexit__(exc_type, exc, tb)
        finally:
            if self._guarded is not None:
                unguard(self._guarded)
                self._guarded = None
        return False


# The read-only session makers of a manager, one per target, made on first
# use under a lock; their Session class carries the guards from the start.
_lock = threading.Lock()


def _factory(manager: AsyncBlockHost, replica: Replica | None = None) -> Any:
    factories: dict[Replica | None, Any] = manager.readonly_sessions
    key = replica
    factory = factories.get(key)
    if factory is None:
        with _lock:
            factory = factories.get(key)
            if factory is None:
                own = manager.session_factory
                base = own.kw.get("sync_session_class", Session)
                guarded = type("ReadOnlySession", (base,), {})
                event.listen(guarded, "after_begin", after_begin)
                event.listen(guarded, "after_commit", after_end)
                event.listen(guarded, "after_rollback", after_end)
                event.listen(guarded, "before_flush", before_flush)
                event.listen(guarded, "do_orm_execute", do_orm_execute)
                kw = {**own.kw, "sync_session_class": guarded}
                kw["info"] = {**(kw.get("info") or {}), READONLY: (replica and "replica") or True}
                if replica is not None:
                    kw["bind"] = replica.engine
                factory = factories[key] = async_sessionmaker(**kw)
    return factory
