"""The block: one ``with tx():``, a small state machine, and the blocks of a
scope as a stack.

A block commits on normal exit and rolls back on any exception, re-raising
it unchanged. The open blocks of a scope form a stack (:attr:`Scope.blocks`):
a block opened inside another runs in a SAVEPOINT (or, with
``savepoint=False``, joins the outer transaction and dooms it if it fails),
and only the innermost open block may end. Entering is atomic: a block is
fully open or nothing changed. The outermost block starts from a fresh view
of the database. Inside a transaction of the ``transaction`` package the
outermost block joins it (:mod:`sparc.sa.tx.joined`) instead of committing.

States: NEW -> OPEN -> DONE, or CANCELLED when the scope's transaction was
rolled back by someone else (an outer block ending first, or the joined
transaction ending) while the block was open; its end then raises.
"""

from __future__ import annotations

import contextvars
import logging
import os
import sys
import weakref
from types import FrameType, TracebackType
from typing import Any, Final, Protocol

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, scoped_session

from sparc.sa.connections.keep import keep_shared_connection
from sparc.sa.exceptions import (
    AbortedTransactionError,
    BlockOrderError,
    DoomedTransactionError,
    ForkedTransactionError,
    IsolationLevelError,
    JoinedTransactionError,
    ReadOnlyTransactionError,
)
from sparc.sa.foreign.of_asyncio import running_loop
from sparc.sa.foreign.of_sqlalchemy import is_clean
from sparc.sa.foreign.of_transaction import RUNNING
from sparc.sa.tx import begun, joined
from sparc.sa.tx.gate import Gate, GateCache, ThreadGate
from sparc.sa.tx.scope import Scope, ScopeRegistry, after_interruption, note_interruption
from sparc.sa.tx.sessions import (
    GUARDED,
    IN_BLOCK,
    READONLY,
    aborted,
    begin_nested,
    check_late_options,
    close_failed,
    established_connection,
    freshen,
    release,
    rollback,
    rollback_savepoint,
)
from sparc.sa.tx.suspended import GENERATOR as _GENERATOR
from sparc.sa.tx.suspended import check_owner, owner_of_block

__all__ = ["Block", "BlockHost"]

logger = logging.getLogger("sparc.sa.block")  # its name before the move
_DEBUG: Final = logging.DEBUG


class BlockHost(joined.Joiner, Protocol):
    """The parts of a transaction manager that its blocks use."""

    @property
    def engine(self) -> Engine: ...
    @property
    def join(self) -> str: ...
    @property
    def scoped_session(self) -> scoped_session[Session]: ...
    @property
    def scopes(self) -> ScopeRegistry: ...
    @property
    def gates(self) -> GateCache: ...
    @property
    def open_block(self) -> contextvars.ContextVar[weakref.ref[Block] | None]: ...
    @property
    def checks_aborted(self) -> bool: ...


_ABANDONED: Final = (
    "a generator was closed while suspended inside its block, so the block "
    "rolled back, and with it %d inner block(s) that had ended normally "
    "meanwhile (blocks opened on this thread while the generator was suspended "
    "nest in its block); close such generators before opening other blocks"
)


class _Abandoned(BaseException):
    """The exit of a block whose `with` statement is gone."""


_ABORTED: Final = (
    "a statement failed inside this block and its error was caught; PostgreSQL "
    "aborted the transaction, so the block was rolled back, not committed (run "
    "the statement in a nested block to let it fail alone)"
)

# The states of a block.
_NEW: Final = 0
_OPEN: Final = 1
_DONE: Final = 2
_CANCELLED: Final = 3  # rolled back when an outer block ended before it


class Block:
    """One ``with tx():`` block."""

    __slots__ = (
        "__weakref__",
        "_debug",
        "_dm",
        "_gate",
        "_inner_done",
        "_isolation",
        "_manager",
        "_nested_",
        "_owner",
        "_readonly",
        "_ref",
        "_savepoint",
        "_scope",
        "_session",
        "_sp",
        "_state",
        "_tm",
        "_token",
    )

    def __init__(
        self,
        manager: BlockHost,
        savepoint: bool,
        tm: Any = None,
        readonly: bool = False,
        isolation: str | None = None,
    ) -> None:
        self._manager = manager
        self._isolation = isolation  # normalised by sessions.check_isolation
        self._readonly = readonly  # never joins; see sparc.sa.replicas.readonly
        self._savepoint = savepoint
        self._tm = tm  # a transaction manager whose transaction to join
        self._state = _NEW
        self._scope: Scope | None = None
        self._token: contextvars.Token[weakref.ref[Block] | None] | None = None
        self._sp: Any = None  # the SAVEPOINT's SessionTransaction
        self._dm: joined.SessionDataManager | None = None
        self._gate: Gate | ThreadGate | None = None
        self._debug = False
        self._inner_done = 0  # inner blocks that ended normally inside this one
        self._session: Any = None
        self._nested_ = False
        self._owner: FrameType | None = None  # see sparc.sa.tx.suspended
        self._ref = weakref.ref(self)

    # __enter__ and __exit__ run on every transaction: the common case (a
    # thread outside asyncio, a pool of its own connections, no debug log) is
    # written out inline rather than through helper calls.

    def __enter__(self) -> scoped_session[Session]:
        if self._state is not _NEW:
            raise RuntimeError("a block can be entered once; call tx() for each block")
        manager = self._manager
        scope: Scope
        if running_loop() is None:
            try:
                scope = manager.scopes.local.scope
            except AttributeError:
                scope = manager.scopes.current()
        else:
            scope = manager.scopes.current()
        blocks = scope.blocks
        if blocks:
            if self._tm is not None:
                _check_same_transaction(self, scope)
            _enter_nested(self, scope, blocks)
            return manager.scoped_session
        if scope.interrupted:
            after_interruption(scope)
        self._scope = scope
        dm = scope.joined
        if dm is not None:
            if self._tm is not None:
                _check_same_transaction(self, scope)
            _enter_joined(self, scope, dm.txn)
            return manager.scoped_session
        join = manager.join
        if join != "never" and not self._readonly:
            # Inline, as it runs for every block: is a transaction of the
            # `transaction` package running for this thread, or a Pyramid
            # request's? (sparc.sa.tx.joined)
            module = sys.modules.get("transaction")
            running = False
            if module is not None:
                tm = module.manager  # the thread's TransactionManager is tm.manager
                inner = getattr(tm, "manager", tm)
                if scope.watched is not inner:  # once per thread: see sparc.sa.tx.begun
                    begun.watch(inner)
                    scope.watched = inner
                running = inner.__dict__.get(RUNNING) is not None
            if running or join == "always" or self._tm is not None or "pyramid_tm" in sys.modules:
                txn = joined.transaction_to_join(join, self._tm)
                if txn is not None:
                    _enter_joined(self, scope, txn)
                    return manager.scoped_session
        gates = manager.gates
        pool = manager.engine.pool
        gate = gates.gate if pool is gates.pool else _new_pool(manager, gates, pool)
        # From here on every step is undone if an exception (a KeyboardInterrupt
        # from a signal, say) lands before the block is fully open.
        try:
            if gate is not None:
                gate.acquire(scope, manager)
            self._gate = gate
            session = scope.session
            if session is None:
                session = scope.session = manager.new_session()
            elif session.in_transaction() or IN_BLOCK in session.info:
                freshen(session)
            self._session = session
            session.info[IN_BLOCK] = True
            if self._isolation is not None:
                # Before the transaction begins: the level applies to its BEGIN.
                session.connection(execution_options={"isolation_level": self._isolation})
            self._token = manager.open_block.set(self._ref)
            debug = self._debug = logger.isEnabledFor(_DEBUG)
            frame = sys._getframe(1)
            if frame.f_code.co_flags & _GENERATOR:  # opened in a generator
                self._owner = owner_of_block(frame)
            blocks.append(self._ref)  # the block is open
            self._state = _OPEN
        except BaseException:
            _abandon_entry(self, scope, gate)
            raise
        if debug:
            logger.debug("block entered: %r in %r", session, manager)
        return manager.scoped_session

    def __del__(self) -> None:
        # Runs for every block, so the common case (ended) is kept short.
        # getattr: __init__ itself may have been interrupted.
        state = getattr(self, "_state", _NEW)
        if state is not _OPEN:
            gate = getattr(self, "_gate", None)
            if gate is not None:
                scope = self._scope
                if scope is not None and not scope.blocks and gate.held_by(scope):
                    gate.release(scope)  # left held by an interrupted exit
            return
        # Still open, yet nobody holds it: its `with` statement was left
        # without __exit__ running (an interruption before its first line).
        # End it as if it had raised, so that the scope is not wedged.
        # Exceptions cannot leave __del__; an interruption here is logged.
        try:
            self.__exit__(_Abandoned, None, None)
        except BlockOrderError:
            pass
        except BaseException:
            logger.error("ending an abandoned block failed", exc_info=True)

    async def __aenter__(self) -> Any:
        raise TypeError(
            "`async with tx()` needs an asyncio manager: look up "
            "ISAAsyncScopedTransaction for an AsyncEngine. This manager's blocks "
            "are synchronous: use `with tx():`, which works inside a coroutine "
            "too, scoped to its task"
        )

    async def __aexit__(self, *exc_info: Any) -> None:  # pragma: no cover - never entered
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._state is not _OPEN:
            _exit_closed(self, exc_type)
            return
        scope = self._scope
        assert scope is not None
        if exc_type is not None and not issubclass(exc_type, Exception):
            note_interruption(scope, tb)
        if scope.forgotten:
            # The block was opened before os.fork() and this is the child.
            self._state = _DONE
            if exc_type is None:
                raise ForkedTransactionError(
                    f"this block was opened in process {scope.pid} before "
                    f"os.fork(); process {os.getpid()} cannot commit or roll "
                    "it back, so nothing was committed here"
                )
            return
        blocks = scope.blocks
        if not blocks or self._ref not in blocks:
            # Open, but no longer on the stack: an earlier exit was interrupted
            # after it had taken the block off. Finish what it began.
            self._state = _DONE
            if self._nested_:
                if self._sp is not None and self._sp.is_active:
                    rollback_savepoint(scope, self._sp)
            elif self._dm is None:
                rollback(self._session, None)
                _close(self, scope, self._session)
            return
        if blocks[-1] is not self._ref:
            _prune(scope, blocks)
        if blocks[-1] is not self._ref:
            _exit_out_of_order(self, scope, blocks)
        if len(blocks) > 1:
            _exit_nested(self, scope, blocks, exc_type)
            return
        if self._dm is not None:
            _exit_joined(self, scope, exc_type, exc)
            return
        session = self._session
        try:
            if exc_type is None:
                if scope.doomed:
                    raise DoomedTransactionError(
                        "an inner block joined with savepoint=False failed; "
                        "the transaction was rolled back"
                    )
                if self._manager.checks_aborted and aborted(session):
                    raise AbortedTransactionError(_ABORTED)
                session.commit()
                if self._debug:
                    logger.debug("block committed: %r", session)
            else:
                rollback(session, exc)
                if exc_type is GeneratorExit and self._inner_done:
                    raise BlockOrderError(_ABANDONED % self._inner_done)
        except BaseException as error:
            if not isinstance(error, Exception):
                note_interruption(scope, error.__traceback__)
            rollback(session, error)
            raise
        finally:
            in_flight = sys.exc_info()[1]  # what is propagating, if anything
            if in_flight is not None and not isinstance(in_flight, Exception):
                note_interruption(scope, in_flight.__traceback__)
            # Each step runs even if the one before it is interrupted. An
            # interruption before the stack is emptied leaves this block open
            # and unreachable: __del__ ends it. One before the session is
            # closed leaves the session marked, and the next block discards
            # what it holds instead of carrying it on.
            try:
                blocks.clear()
                self._state = _DONE
                scope.doomed = False
            finally:
                _close(self, scope, session)

    @property
    def session(self) -> Session:
        """The session this block runs in (set once it is open)."""
        session: Session = self._session
        return session

    def is_open_elsewhere(self, scope: Scope) -> bool:
        """Whether this block is open in another scope than *scope*."""
        return self._scope is not scope and self._state is _OPEN

    def cancel(self) -> None:
        """Rolled back by someone else while open: its end raises."""
        self._state = _CANCELLED

    def _leave_context(self) -> None:
        """Forget this block as the open block of its context."""
        token = self._token
        if token is not None:
            self._token = None
            try:  # noqa: SIM105 - cheaper than contextlib.suppress()
                self._manager.open_block.reset(token)
            except ValueError:
                pass  # closed from another context than it opened in


def _close(block: Block, scope: Scope, session: Session) -> None:
    """Reset the session and give the gate and context back."""
    try:
        try:
            session.close()
        except BaseException as error:
            # Interrupted half-way (a KeyboardInterrupt, say): closing
            # again finishes the job, so the connection goes back to the
            # pool; then the interruption propagates.
            if not isinstance(error, Exception):
                note_interruption(scope, error.__traceback__)
            session.close()
            raise
        session.info.pop(IN_BLOCK, None)  # finished: nothing left to discard
    except Exception:
        close_failed(scope, session)
    finally:
        try:
            block._leave_context()
        finally:
            gate = block._gate
            if gate is not None:
                gate.release(scope)


# -- the less common paths of a block, kept out of its class ---------------------


def _new_pool(manager: BlockHost, gates: GateCache, pool: Any) -> Gate | ThreadGate | None:
    """The first block on *pool*: its gate, and on SQLite the guards that close
    an interrupted statement's cursor and, on one shared connection (an
    in-memory database), keep that connection through interruptions."""
    gate = gates.refresh(pool)
    keep_shared_connection(manager.engine)  # SQLite only; the connection kept if shared
    return gate


def _abandon_entry(block: Block, scope: Scope, gate: Gate | ThreadGate | None) -> None:
    block._state = _NEW
    error = sys.exc_info()[1]
    if error is not None and not isinstance(error, Exception):
        note_interruption(scope, error.__traceback__)
    if block._session is not None:
        block._session.info.pop(IN_BLOCK, None)
    if scope.blocks and scope.blocks[-1] is block._ref:
        scope.blocks.pop()
    token = block._token
    if token is not None:
        block._manager.open_block.reset(token)
        block._token = None
    if gate is not None:
        gate.release(scope)


def _enter_nested(block: Block, scope: Scope, blocks: list[weakref.ref[Block]]) -> None:
    top = blocks[-1]()
    if top is None or top._state is not _OPEN:
        _prune(scope, blocks)
        if not blocks:
            raise RuntimeError("stale blocks")  # pragma: no cover - see _prune
    block._nested_ = True
    outer = blocks[0]()
    if outer is None:
        raise RuntimeError("the outer block was abandoned")  # pragma: no cover
    if block._isolation is not None:
        _check_nested_isolation(block, outer)
    if outer._owner is not None:  # held open by a generator: is it running?
        check_owner(outer._owner, sys._getframe(1))
    session = outer._session
    if not block._readonly and (READONLY in session.info or session.info.get(GUARDED)):
        raise ReadOnlyTransactionError(
            "a writing block was opened inside a read-only block (tx(readonly=True)); "
            "open the writing block outside it, or drop readonly=True from the outer block"
        )
    block._scope = scope
    block._session = session
    block._debug = outer._debug
    if not block._savepoint:
        block._sp = None
        blocks.append(block._ref)
        block._state = _OPEN
        return
    before = session.get_nested_transaction()
    try:
        block._sp = begin_nested(session, block._manager.sqlite_begin)
        blocks.append(block._ref)
        block._state = _OPEN
    except BaseException:
        if blocks[-1] is block._ref:
            blocks.pop()
        block._state = _NEW
        made = session.get_nested_transaction()
        if made is not None and made is not before:
            rollback_savepoint(scope, made)
        raise


def _enter_joined(block: Block, scope: Scope, txn: Any) -> None:
    """The outermost block of a scope inside a transaction of the
    ``transaction`` package: it runs in a SAVEPOINT of that transaction,
    or, while nothing has been written in it yet, in the whole of it."""
    manager = block._manager
    dm = scope.joined
    try:
        if dm is None:
            # a joined block never reaches _new_pool(): its SQLite guards here
            keep_shared_connection(manager.engine)
            dm = joined.join_scope(manager, scope, txn, block._isolation, block._tm)
        else:
            if block._isolation is not None:
                joined.check_isolation(dm, block._isolation)
            dm.check_whole()
            if dm.root is None:  # after our own rollback of the whole transaction
                dm.note_root()
        block._dm = dm
        session = block._session = dm.session
        session.info[IN_BLOCK] = True
        block._debug = logger.isEnabledFor(_DEBUG)
        before = session.get_nested_transaction()
        try:
            if block._savepoint:
                if dm.fresh and is_clean(session) and not dm.others_open(scope):
                    # Nothing written yet in this transaction: rolling it
                    # back whole undoes exactly this block, so the two
                    # round trips of a SAVEPOINT and its RELEASE are saved.
                    block._sp = joined.WHOLE_TRANSACTION
                else:
                    block._sp = begin_nested(session, manager.sqlite_begin)
            block._token = manager.open_block.set(block._ref)
            scope.blocks.append(block._ref)
            block._state = _OPEN
        except BaseException:
            made = session.get_nested_transaction()
            if made is not None and made is not before:
                rollback_savepoint(scope, made)
            raise
    except BaseException:
        block._state = _NEW
        if scope.blocks and scope.blocks[-1] is block._ref:
            scope.blocks.pop()
        if block._token is not None:
            manager.open_block.reset(block._token)
        raise
    if block._debug:
        logger.debug("joined block entered: %r in %r", session, manager)


def _check_nested_isolation(block: Block, outer: Block) -> None:
    """A nested block asking for an isolation level: it runs in its outer
    block's transaction, so only that transaction's own level will do."""
    dm = outer._dm
    if dm is not None:
        joined.check_isolation(dm, block._isolation)
        return
    level = outer._isolation
    if level == block._isolation:
        return
    connection = established_connection(outer._session)
    if level is None and connection is not None:
        check_late_options(connection, {"isolation_level": block._isolation})
        return
    raise IsolationLevelError(
        f"a nested block asked for isolation_level={block._isolation!r}, but it runs "
        "in its outer block's transaction, "
        + (f"at {level!r}" if level else "at the engine's level")
        + "; give the level to the outermost block: `with tx(isolation_level=...):`"
    )


def _check_same_transaction(block: Block, scope: Scope) -> None:
    """A block given a transaction manager, in a scope already inside another
    transaction (joined, or an open block of its own)."""
    dm = scope.joined
    wanted = joined.transaction_to_join("always", block._tm)
    if dm is None or dm.txn is not wanted:
        raise JoinedTransactionError(
            "this block was given a transaction_manager, but its thread or task is "
            "already inside another transaction (an open block, or another manager's "
            "transaction); end that first"
        )


def _exit_closed(block: Block, exc_type: type[BaseException] | None) -> None:
    if block._state is _CANCELLED:
        block._state = _DONE
        scope = block._scope
        if scope is not None and not scope.blocks and scope.joined is None:
            # Whatever this block's code did after the scope was reset
            # belongs to no block: do not leave it for the next one.
            session = scope.session
            if session is not None and session.in_transaction():
                rollback(session, None)
        raise BlockOrderError(
            "this block was rolled back, not committed: a block around it "
            "ended while it was still open (blocks of one thread or task "
            "must end innermost first; a generator suspended inside a block "
            "keeps that block open)"
        )
    if block._state is _NEW:
        raise RuntimeError("this block was never entered")
    raise RuntimeError("this block has already ended")


def _exit_nested(
    block: Block,
    scope: Scope,
    blocks: list[weakref.ref[Block]],
    exc_type: type[BaseException] | None,
) -> None:
    blocks.pop()
    block._state = _DONE
    outer = blocks[0]() if blocks else None
    savepoint = block._sp
    if savepoint is None:  # joined: the outer block must not commit half of it
        if exc_type is not None:
            scope.doomed = True
        elif outer is not None:
            outer._inner_done += 1
        return
    session = block._session
    if not savepoint.is_active:
        # Rolled back by transaction.savepoint()'s rollback of a savepoint
        # taken before this block: what it did since lives in the outer
        # transaction; its earlier work cannot be told apart to undo it.
        if exc_type is not None:
            scope.doomed = True
        return
    if exc_type is None:
        try:
            if block._manager.checks_aborted and aborted(session):
                raise AbortedTransactionError(_ABORTED)
            if session.get_nested_transaction() is savepoint:
                release(savepoint, session)
            else:
                # A savepoint taken inside this block (transaction.savepoint())
                # is still open: keep ours open too, so that it stays valid.
                session.flush()
        except BaseException as error:
            # The flush or RELEASE failed, or the server aborted the
            # transaction: undo the inner work and let the error reach the
            # outer block's code.
            if not isinstance(error, Exception):
                # Interrupted mid-RELEASE, the server may have released the
                # savepoint already: the outer block must not commit its work.
                scope.doomed = True
            rollback_savepoint(scope, savepoint)
            raise
        if outer is not None:
            outer._inner_done += 1
        return
    rollback_savepoint(scope, savepoint)


def _exit_joined(
    block: Block, scope: Scope, exc_type: type[BaseException] | None, exc: BaseException | None
) -> None:
    block._state = _DONE
    scope.blocks.clear()
    doomed, scope.doomed = scope.doomed, False
    block._leave_context()
    dm = block._dm
    assert dm is not None
    joined.finish_block(dm, block._sp, exc_type, exc, doomed)


def _prune(scope: Scope, blocks: list[weakref.ref[Block]]) -> None:
    """Drop entries an interrupted exit left on top of the stack: blocks that
    ended, or whose finaliser already rolled them back."""
    while len(blocks) > 1:
        top = blocks[-1]()
        if top is not None and top._state is _OPEN:
            return
        blocks.pop()
        if top is not None and top._sp is not None and top._sp.is_active:
            rollback_savepoint(scope, top._sp)


def _exit_out_of_order(block: Block, scope: Scope, refs: list[weakref.ref[Block]]) -> None:
    """*block* ends while blocks opened after it are still open: roll the
    whole transaction back, cancel every open block of the scope, and say so."""
    inner = len(refs) - 1 - refs.index(block._ref)
    blocks = [ref() for ref in refs]
    outermost = blocks[0] or block
    for other in blocks:
        if other is not None:
            other._state = _CANCELLED
    block._state = _DONE
    refs.clear()
    scope.doomed = False
    session = outermost._session
    dm = outermost._dm
    if dm is not None:
        dm.doom("blocks of one scope ended out of order")
    else:
        rollback(session, None)
        _close(outermost, scope, session)
    raise BlockOrderError(
        f"a block ended while {inner} block(s) opened inside it were still open; "
        "the transaction was rolled back, not committed (blocks of one thread or "
        "task must end innermost first; a generator suspended inside a block keeps "
        "that block open)"
    )
