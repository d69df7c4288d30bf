"""The read-only block: ``with tx(readonly=True):`` and ``tx.run(fn, readonly=True)``.

Where it runs
    * Outermost, on an engine with replicas: on a healthy replica that has
      replayed the scope's own latest commit (and the ``after`` token's
      position), in turn with the other replicas; else on the primary.
    * Outermost, without replicas or when none will do: on the primary, in a
      READ ONLY transaction.
    * Inside a writing block, or after the scope joined the request's
      transaction (a joined write): in that transaction, on the primary, in
      a SAVEPOINT, so it sees the uncommitted work.

A read-only block never joins a transaction of the ``transaction`` package
by itself: it ends on its own and never takes part in two-phase commit.

A write fails with :class:`~sparc.sa.exceptions.ReadOnlyTransactionError`:
an ORM flush with changes and statements that write are refused before they
are sent; anything else the database refuses (READ ONLY transaction, or a
standby) is reported as the same error. A writing block inside a read-only
block is the same error.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session, scoped_session, sessionmaker
from sqlalchemy.pool import StaticPool

from sparc.sa.replicas.errors import read_elsewhere, read_only_end
from sparc.sa.replicas.guards import guard, install_guards, unguard
from sparc.sa.replicas.positions import PRIMARY_ONLY, later, read_token
from sparc.sa.replicas.routing import Replica, ReplicaSet, Unusable, replica_set
from sparc.sa.replicas.tokens import ON_REPLICA, nested_wait
from sparc.sa.tx.block import Block
from sparc.sa.tx.retry import check_attempts, run_in_blocks
from sparc.sa.tx.sessions import READONLY, begin_on_sqlite

if TYPE_CHECKING:
    from sparc.sa.tx.scope import Scope

__all__ = ["ReadOnlyBlock", "run_readonly"]

logger = logging.getLogger("sparc.sa.readonly")  # its name before the move
_T = TypeVar("_T")


class ReadOnlyBlock:
    """One ``with tx(readonly=True):`` block."""

    __slots__ = (
        "_after",
        "_block",
        "_guarded",
        "_manager",
        "_replica",
        "_rs",
        "_saved",
        "_scope",
        "_tm",
    )

    def __init__(self, manager: Any, after: str | None = None, tm: Any = None) -> None:
        self._manager = manager
        # A transaction manager given to the block: a read-only block never
        # joins a transaction, but inside one it reads in it, and then it must
        # be this manager's (sparc.sa.tx.stack.check_same_transaction).
        self._tm = tm
        self._after = read_token(after)
        self._block: Block | None = None
        self._guarded: Session | None = None
        self._replica: Replica | None = None
        self._rs: ReplicaSet | None = None
        self._scope: Scope | None = None
        self._saved: Session | None = None

    @property
    def session(self) -> Session:
        """The session this block runs in (set once it is open)."""
        assert self._block is not None
        return self._block.session

    @property
    def replica(self) -> Replica | None:
        """The replica this block runs on; None on the primary."""
        return self._replica

    def __enter__(self) -> scoped_session[Session]:
        manager = self._manager
        scope = self._scope = manager.scopes.current()
        if scope.blocks or scope.joined is not None:
            # In the writing transaction around it, to see its uncommitted work.
            block = self._block = Block(manager, True, self._tm, readonly=True)
            entered = block.__enter__()
            guarded = self._guarded = block.session
            guard(guarded)
            if self._after[0]:
                try:
                    self._honour(guarded)
                except BaseException as error:
                    self._guarded = None
                    unguard(guarded)
                    block.__exit__(type(error), error, error.__traceback__)
                    raise
            return entered
        factory = _factory(manager)
        rs = self._rs = replica_set(manager.engine)
        if rs is not None:
            after = self._after
            # Without a token on PostgreSQL, what rs.need() gives: the
            # scope's own latest commit, without a call through the token.
            need = rs.need(after) if after[0] or rs.mariadb else rs.position()
            if need != PRIMARY_ONLY:
                for replica in rs.candidates():
                    on_replica = self._open(manager, scope, factory, replica, need)
                    if on_replica is not None:
                        rs.stats["replica"] += 1
                        return on_replica
            rs.stats["primary"] += 1
        on_primary = self._open(manager, scope, factory, None, 0)
        assert on_primary is not None
        return on_primary

    def _honour(self, session: Session) -> None:
        """A token inside an open block: seen by that block's transaction, or
        StaleSnapshotError (see :func:`sparc.sa.replicas.tokens.nested_wait`)."""
        rs = replica_set(self._manager.engine)
        need = self._after[0] if rs is None else rs.need(self._after)
        deadline = time.monotonic() + (rs.wait if rs is not None else 0.0)
        while (pause := nested_wait(rs, session, need, deadline)) is not None:
            time.sleep(pause)

    def _open(
        self, manager: Any, scope: Scope, factory: Any, replica: Replica | None, need: Any
    ) -> scoped_session[Session] | None:
        """Open the block in a session of its own, on *replica* or on the
        primary; None if the replica cannot serve it now. Whatever stops it
        (the replica, an interruption while it waits) leaves the scope as it
        was: its own session back, the block's connection returned."""
        if replica is None:
            session: Session = factory()
            session.info[READONLY] = True  # a READ ONLY transaction (replicas.after_begin)
        else:
            session = factory(bind=replica.sync_engine)
            session.info[READONLY] = "replica"
        rs = self._rs
        interrupted = scope.interrupted
        saved = self._saved = scope.set_aside = scope.session
        if saved is not None:
            manager.scopes.watch_set_aside(scope)
        block = self._block = Block(manager, True, readonly=True)
        opened = False
        try:
            scope.session = session
            entered = block.__enter__()
            opened = True
            if replica is None:
                return entered
            assert rs is not None
            # Connected as the block opens (a pooled connection: no round
            # trip), so that a replica refusing connections is skipped here
            # rather than failing the caller's first statement.
            session.connection()
            floor = replica.replayed
            if rs.needs_check(replica, need):
                rs.check(replica, session, need)
                floor = later(floor, need)
            session.info[ON_REPLICA] = (replica, floor)
        except BaseException as error:
            if _undo_open(self, scope, session, block, replica, error, opened, saved, interrupted):
                return None
            raise
        self._replica = replica
        return entered

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        block = self._block
        if block is None:
            raise RuntimeError("this block was never entered")
        try:
            if exc_type is None:
                # The common end: read_only_end() only acts on an error.
                try:
                    block.__exit__(None, None, None)
                except BaseException:
                    with read_only_end(self._rs, self._replica, None):
                        raise
                return
            with read_only_end(self._rs, self._replica, exc):
                block.__exit__(exc_type, exc, tb)
        finally:
            self._finish()

    def _finish(self) -> None:
        guarded = self._guarded
        if guarded is not None:
            self._guarded = None
            unguard(guarded)
            return
        scope = self._scope
        assert scope is not None and self._block is not None
        if scope.session is self._block.session:
            scope.session = self._saved
        if scope.set_aside is self._saved:
            scope.set_aside = None
        self._saved = None


# One read-only sessionmaker per manager, made on first use. The lock keeps
# two threads from making two; the listeners are in place before any session
# of it exists, so no thread ever sees them change.
_factory_lock = threading.Lock()


def _undo_open(
    ro: ReadOnlyBlock,
    scope: Scope,
    session: Session,
    block: Block,
    replica: Replica | None,
    error: BaseException,
    opened: bool,
    saved: Session | None,
    interrupted: int,
) -> bool:
    """:meth:`ReadOnlyBlock._open` stopped by *error*: end what it began and
    give the scope its own session back. True if the replica cannot serve
    the block now (try another); False if *error* is the caller's."""
    rs = ro._rs
    unusable = replica is not None and isinstance(error, (Unusable, sa_exc.DBAPIError, OSError))
    if unusable and not isinstance(error, Unusable):
        assert rs is not None and replica is not None
        rs.failed(replica, error)
    try:
        if opened:
            block.__exit__(type(error), error, error.__traceback__)
        else:
            session.close()
    except Exception:
        if not unusable:
            raise
        logger.debug("ending an unusable replica's block failed", exc_info=True)
    finally:
        scope.session = saved
        scope.set_aside = ro._saved = None
        ro._block = None
        if replica is not None and scope.interrupted > interrupted:
            # Interrupted on the replica's connection, not the
            # primary's: if inside its pool, the replica's pool is
            # the one to replace.
            if scope.interrupted == 2:
                replica.sync_engine.dispose()
            scope.interrupted = interrupted
    return unusable


def _factory(manager: Any) -> Any:
    factory = manager.readonly_sessions.get(None)
    if factory is None:
        with _factory_lock:
            factory = manager.readonly_sessions.get(None)
            if factory is None:
                own = manager.new_session
                factory = sessionmaker(class_=own.class_.__mro__[1], **own.kw)
                if manager.sqlite_begin and not isinstance(manager.engine.pool, StaticPool):
                    event.listen(factory, "after_begin", begin_on_sqlite)
                install_guards(factory)
                manager.readonly_sessions[None] = factory
    return factory


def run_readonly(
    manager: Any,
    fn: Callable[..., _T],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    attempts: int,
    after: str | None,
    tm: Any = None,
) -> _T:
    """``tx.run(fn, readonly=True)``: *fn* in a read-only block, run again if
    the database aborts it (as :meth:`run` does), and once more on another
    server if the replica it ran on died."""
    check_attempts(attempts)
    if inspect.iscoroutinefunction(fn):
        raise TypeError(f"run() calls {fn!r} without awaiting it; use the asyncio manager")
    scope = manager.scopes.current()
    if scope.blocks or scope.joined is not None:
        attempts = 1  # only the owner of the outer transaction can restart it
    return run_in_blocks(
        lambda: ReadOnlyBlock(manager, after, tm),
        fn,
        args,
        kwargs,
        attempts,
        manager.retry_delay,
        manager.retry_max_delay,
        read_elsewhere,
    )
