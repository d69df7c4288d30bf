"""The core of the transaction manager: its engine and session factory, the
scopes and their sessions, the gates, and the open block of each context;
what blocks (:class:`~sparc.sa.tx.stack.BlockHost`) and joined mode use.

:class:`sparc.sa.orm.ScopedTransaction` is its public face,
adding blocks, :meth:`~sparc.sa.orm.ScopedTransaction.run` and
read-only blocks.
"""

from __future__ import annotations

import contextvars
import sys
import weakref
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import event as sa_event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, scoped_session, sessionmaker
from sqlalchemy.pool import StaticPool

from sparc.sa.connections import fork, resets
from sparc.sa.connections.keep import keep_shared_connection
from sparc.sa.exceptions import CrossScopeSessionError
from sparc.sa.foreign.of_asyncio import running_loop
from sparc.sa.foreign.of_transaction import RUNNING
from sparc.sa.tx import begun, joined, sessions
from sparc.sa.tx.aborted import checks_aborted
from sparc.sa.tx.cache import check_base
from sparc.sa.tx.datamanager import ENDED, guard, hand_out
from sparc.sa.tx.gate import Gate, GateCache, ThreadGate, forget_gate, gate_timeout
from sparc.sa.tx.scope import Scope, ScopeRegistry, watch_pool_interruptions
from sparc.sa.tx.stack import BlockState

if TYPE_CHECKING:
    from asyncio import Task

__all__ = ["JOIN_MODES", "ManagerCore", "SessionRegistry", "check_join", "reconfigure"]

#: The join modes of :class:`sparc.sa.orm.ScopedTransaction`.
JOIN_MODES: Final = ("auto", "always", "never")


class SessionRegistry:
    """The registry behind the yielded ``scoped_session``: the current scope's
    session, with the interface SQLAlchemy's ScopedRegistry offers."""

    __slots__ = ("_manager",)

    def __init__(self, manager: ManagerCore) -> None:
        self._manager = manager

    def __call__(self) -> Session:
        return self._manager.session

    def has(self) -> bool:
        scope = self._manager.scopes.existing()
        return scope is not None and scope.session is not None

    def set(self, session: Session) -> None:
        scope = self._manager.scopes.current()
        scope.session = session

    def clear(self) -> None:
        scope = self._manager.scopes.existing()
        if scope is not None and not scope.blocks and scope.joined is None:
            scope.session = None

    def existing(self) -> Session | None:
        """The current scope's session if it has one, as it is: not joined
        to any transaction on the way (closing a session must not begin one)."""
        scope = self._manager.scopes.existing()
        return None if scope is None else scope.session


class ScopedSession(scoped_session[Session]):
    """The yielded ``scoped_session``: SQLAlchemy's, whose ``remove()`` closes
    the scope's session as it is. SQLAlchemy's would fetch it through the
    registry, which joins the running transaction first (join="always" even
    begins one): after a commit, ``Session.remove()`` then left a transaction
    behind holding a closed session, and the next commit of the thread failed."""

    registry: SessionRegistry  # type: ignore[assignment]

    def remove(self) -> None:
        session = self.registry.existing()
        if session is not None:
            session.close()
        self.registry.clear()


class ManagerCore:
    """The part of :class:`sparc.sa.orm.ScopedTransaction` that
    its blocks and joined mode use: the engine, the sessions of scopes, the
    gates and the open block of each context."""

    def __init__(
        self,
        engine: Engine,
        base: type[Any],
        *,
        join: str = "auto",
        twophase: bool = False,
        **session_options: Any,
    ) -> None:
        check_base(base)
        self._join, self._twophase = check_join(engine, join, twophase)
        self._engine = engine
        self._base_ref = weakref.ref(base)
        self._base_name = f"{base.__module__}.{base.__qualname__}"
        session_options.setdefault("expire_on_commit", False)
        own_class = session_options.setdefault("class_", sessions.BlockSession)
        factory = self.new_session = sessionmaker(bind=engine, **session_options)
        self.scopes = ScopeRegistry(engine)
        watch_pool_interruptions(self.scopes)
        self._Session = ScopedSession(factory)
        self._Session.registry = SessionRegistry(self)
        self.gates = GateCache()
        #: The read-only blocks' session makers, by target (None: the primary),
        #: made on first use (sparc.sa.replicas.readonly).
        self.readonly_sessions: dict[Any, Any] = {}
        # The outermost open block of the current context: a thread or task
        # started from inside a block (asyncio.to_thread, create_task) sees it.
        self.open_block: contextvars.ContextVar[weakref.ref[BlockState] | None] = (
            contextvars.ContextVar("sparc.sa open block", default=None)
        )
        #: pysqlite begins only before DML: blocks send BEGIN themselves.
        self.sqlite_begin = engine.dialect.name == "sqlite" and engine.driver in (
            "pysqlite",
            "pysqlcipher",
        )
        # A Session class of the application's own cannot switch to
        # JoinedSession; it gets a listener instead.
        self.switches_class = own_class in (Session, sessions.BlockSession)
        #: PostgreSQL via psycopg: a transaction the server aborted is never
        #: COMMITted (which would silently roll it back).
        self.checks_aborted = checks_aborted(engine)
        if not self.switches_class:
            sa_event.listen(factory, "before_commit", sessions.refuse_commit_when_joined)
        if self.sqlite_begin and not isinstance(engine.pool, StaticPool):
            # On StaticPool blocks take turns on the one connection, so their
            # reads are isolated without it; nested blocks still begin first.
            sa_event.listen(factory, "after_begin", sessions.begin_on_sqlite)
        # No pool reset ROLLBACK after a COMMIT or ROLLBACK of these sessions
        # (BlockSession marks its connections; another class gets a listener).
        resets.install(engine)
        if not issubclass(own_class, sessions.BlockSession):
            sa_event.listen(factory, "after_begin", resets.note_session_transaction)
        fork.track(self)

    @property
    def Base(self) -> type[Any] | None:
        """The declarative base; None once it has been garbage-collected."""
        return self._base_ref()

    @property
    def engine(self) -> Engine:
        return self._engine

    @property
    def join(self) -> str:
        """``"auto"``, ``"always"`` or ``"never"``: see :mod:`sparc.sa.tx.joined`."""
        return self._join

    @property
    def twophase(self) -> bool:
        """Whether a joined transaction commits in two phases."""
        return self._twophase

    @property
    def gate_timeout(self) -> float:
        """Seconds a block waits for a connection every thread shares
        (StaticPool): the pool's ``timeout`` if it has one, else 30."""
        return gate_timeout(self._engine.pool)

    @property
    def session(self) -> Session:
        """The current scope's session."""
        scope: Scope
        if running_loop() is None:  # the common case, inline
            try:
                scope = self.scopes.local.scope
            except AttributeError:
                scope = self.scopes.current()
        else:
            scope = self.scopes.current()
        session = scope.session
        if session is not None:
            if scope.blocks:
                return session
            joined = scope.joined
            if joined is not None:
                joined.fresh = False  # used outside a block: it may write
                return session
        return self._idle_session(scope)

    @property
    def scoped_session(self) -> scoped_session[Session]:
        """The ISAScopedSession provider that blocks yield."""
        return self._Session

    def _scope(self) -> Scope:
        """The current task's or thread's scope, made on first use."""
        return self.scopes.current()

    def _existing_scope(self) -> Scope | None:
        return self.scopes.existing()

    @property
    def _tasks(self) -> dict[Task[Any], Scope]:
        return self.scopes.tasks

    def _idle_session(self, scope: Scope) -> Session:
        """The session of a scope with no open block."""
        ref = self.open_block.get()
        opened = None if ref is None else ref()
        if opened is not None and opened.is_open_elsewhere(scope):
            raise CrossScopeSessionError(
                "transaction.session was used outside any block in a thread or task "
                "started from inside another thread's or task's block (asyncio.to_thread, "
                "create_task...): it is not that block's session, and its work would be "
                "committed later by an unrelated block. Pass the block's session to the "
                "worker, or open a block (`with tx():`) in the worker"
            )
        if self._join != "never" and not scope.forgotten:
            txn = self._running_transaction(scope)
            if txn is not None:
                # Used outside any block while the application's transaction
                # runs (request.dbsession.add() in a view): the session goes
                # with that transaction, committed or aborted with it, as
                # zope.sqlalchemy's registered session does.
                keep_shared_connection(self._engine)  # as a joined block does
                dm = joined.join_scope(self, scope, txn)
                dm.fresh = False  # it may write outside any block
                return dm.session
        session = scope.session
        if session is None:
            session = scope.session = self.new_session()
        info = session.info
        if sessions.WATCHED not in info:
            sessions.watch(session)
        if joined.request_ended():
            # A Pyramid request whose transaction has ended (its finished
            # callbacks): the next request on this thread would commit writes
            # made now outside any block. Refuse them.
            guard(session)
        elif ENDED in info:
            hand_out(session)
        return session

    def _running_transaction(self, scope: Scope) -> Any:
        """The transaction of the ``transaction`` package that this scope's
        work joins now (see :mod:`sparc.sa.tx.joined`), or None; cheap when the
        application runs none."""
        module = sys.modules.get("transaction")
        if module is not None:
            tm = module.manager
            inner = getattr(tm, "manager", tm)
            if scope.watched is not inner:
                begun.watch(inner)
                scope.watched = inner
            if (
                inner.__dict__.get(RUNNING) is None
                and self._join != "always"
                and "pyramid_tm" not in sys.modules
            ):
                return None
        elif self._join != "always" and "pyramid_tm" not in sys.modules:
            return None
        return joined.transaction_to_join(self._join)

    def current_gate(self) -> Gate | ThreadGate | None:
        """The gate of the engine's current pool (None for most pools)."""
        return self.gates.current(self._engine.pool)

    def forget_after_fork(self) -> None:
        self.scopes.forget_after_fork()
        self.open_block = contextvars.ContextVar("sparc.sa open block", default=None)
        # A gate inherited in a held state would block the child forever.
        forget_gate(self._engine.pool)
        self.gates = GateCache()

    def transaction_to_join(self) -> Any:
        """The transaction of the ``transaction`` package that blocks of this
        scope join now, or None."""
        if self._join == "never" or (self._join == "auto" and "transaction" not in sys.modules):
            return None  # nobody imported it, so no transaction is running
        return joined.transaction_to_join(self._join)


def reconfigure(manager: ManagerCore, join: str | None, twophase: bool | None, where: str) -> None:
    """The body of :func:`sparc.sa.orm.configure_shared`: set the join mode of
    a shared manager; a second configuration that disagrees names where the
    first was made."""
    wanted_join = manager._join if join is None else join
    wanted_two = manager._twophase if twophase is None else twophase
    first = manager.__dict__.get("_configured_at")
    if first is not None and (wanted_join, wanted_two) != (manager._join, manager._twophase):
        raise ValueError(
            f"join={wanted_join!r} twophase={wanted_two} disagrees with "
            f"join={manager._join!r} twophase={manager._twophase} set for the same "
            f"engine and base at {first}"
        )
    manager._join, manager._twophase = check_join(manager._engine, wanted_join, wanted_two)
    if first is None:
        manager.__dict__["_configured_at"] = " ".join(where.split())


def check_join(engine: Engine, join: object, twophase: object) -> tuple[str, bool]:
    if join not in JOIN_MODES:
        raise ValueError(f"'join' must be one of 'auto', 'always' or 'never', got {join!r}")
    if twophase is not True and twophase is not False:
        raise TypeError(f"'twophase' must be True or False, got {twophase!r}")
    if twophase and engine.dialect.name == "sqlite":
        raise ValueError(
            "'twophase' is not supported by SQLite, which has no prepared "
            "transactions; use join without twophase on SQLite"
        )
    if twophase and join == "never":
        raise ValueError(
            "'twophase' applies to joined transactions; it needs join 'auto' or 'always'"
        )
    if join == "always":
        try:
            import transaction  # noqa: F401
        except ImportError:
            raise ImportError(
                "join='always' joins the transaction of the `transaction` package, "
                "which is not installed: pip install transaction"
            ) from None
    return str(join), bool(twophase)
