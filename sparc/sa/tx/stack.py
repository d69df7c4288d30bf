"""The stack of a scope's open blocks: what a block holds and its states,
nested blocks (SAVEPOINTs, or ``savepoint=False``), and the blocks an
interrupted or out-of-order exit leaves behind.

:class:`sparc.sa.tx.block.Block` adds entering and leaving to
:class:`BlockState`; the paths here are the less common ones, kept out of
its ``__enter__`` and ``__exit__``.
"""

from __future__ import annotations

import contextvars
import os
import sys
import weakref
from types import FrameType
from typing import Any, Final, Protocol

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, scoped_session

from sparc.sa.exceptions import (
    AbortedTransactionError,
    BlockOrderError,
    ForkedTransactionError,
    IsolationLevelError,
    JoinedTransactionError,
    ReadOnlyTransactionError,
)
from sparc.sa.tx import joined
from sparc.sa.tx.aborted import aborted
from sparc.sa.tx.gate import Gate, GateCache, ThreadGate
from sparc.sa.tx.scope import Scope, ScopeRegistry, note_interruption
from sparc.sa.tx.sessions import (
    GUARDED,
    IN_BLOCK,
    READONLY,
    begin_nested,
    check_late_options,
    close_failed,
    established_connection,
    release,
    rollback,
    rollback_savepoint,
)
from sparc.sa.tx.suspended import check_owner

__all__ = [
    "ABORTED",
    "CANCELLED",
    "DONE",
    "DOOMED",
    "NEW",
    "OPEN",
    "BlockHost",
    "BlockState",
    "check_innermost",
    "check_nested_isolation",
    "check_same_transaction",
    "check_savepoint",
    "close_block",
    "commit",
    "enter_nested",
    "exit_closed",
    "exit_forked",
    "exit_nested",
    "exit_out_of_order",
    "exit_taken_off",
    "prune",
]

# The states of a block.
NEW: Final = 0
OPEN: Final = 1
DONE: Final = 2
CANCELLED: Final = 3  # rolled back when an outer block ended before it

DOOMED: Final = "an inner block joined with savepoint=False failed; the transaction was rolled back"

ABORTED: Final = (
    "a statement failed inside this block and its error was caught; PostgreSQL "
    "aborted the transaction, so the block was rolled back, not committed (run "
    "the statement in a nested block to let it fail alone)"
)


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
    def open_block(self) -> contextvars.ContextVar[weakref.ref[BlockState] | None]: ...
    @property
    def checks_aborted(self) -> bool: ...


class BlockState:
    """What one ``with tx():`` block holds, and its state; entering and
    leaving it are :class:`sparc.sa.tx.block.Block`'s."""

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
        "_scope",
        "_session",
        "_sp",
        "_state",
        "_tm",
        "_token",
        "_use_savepoint",
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
        self._use_savepoint = savepoint
        self._tm = tm  # a transaction manager whose transaction to join
        self._state = NEW
        self._scope: Scope | None = None
        self._token: contextvars.Token[weakref.ref[BlockState] | None] | None = None
        self._sp: Any = None  # the SAVEPOINT's SessionTransaction
        self._dm: joined.SessionDataManager | None = None
        self._gate: Gate | ThreadGate | None = None
        self._debug = False
        self._inner_done = 0  # inner blocks that ended normally inside this one
        self._session: Any = None
        self._nested_ = False
        self._owner: FrameType | None = None  # see sparc.sa.tx.suspended
        self._ref = weakref.ref(self)

    @property
    def session(self) -> Session:
        """The session this block runs in (set once it is open)."""
        session: Session = self._session
        return session

    def is_open_elsewhere(self, scope: Scope) -> bool:
        """Whether this block is open in another scope than *scope*."""
        return self._scope is not scope and self._state is OPEN

    def cancel(self) -> None:
        """Rolled back by someone else while open: its end raises."""
        self._state = CANCELLED

    def _leave_context(self) -> None:
        """Forget this block as the open block of its context."""
        token = self._token
        if token is not None:
            self._token = None
            try:  # noqa: SIM105 - cheaper than contextlib.suppress()
                self._manager.open_block.reset(token)
            except ValueError:
                pass  # closed from another context than it opened in


def check_savepoint(savepoint: object) -> None:
    """A block's *savepoint* argument: True or False, else a TypeError (both
    managers, read-only blocks included)."""
    if savepoint is not True and savepoint is not False:
        raise TypeError(
            f"'savepoint' must be True or False, got {savepoint!r} ({type(savepoint).__name__})"
        )


def commit(session: Session, checks_aborted: bool) -> None:
    """COMMIT an outermost block's transaction, unless the server aborted it
    (a statement failed, and its error was caught inside the block): then
    :class:`~sparc.sa.exceptions.AbortedTransactionError`, for the caller to
    roll back. The threaded block and the asyncio front both end here."""
    if checks_aborted and aborted(session):
        raise AbortedTransactionError(ABORTED)
    session.commit()


def close_block(block: BlockState, scope: Scope, session: Session) -> None:
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


def enter_nested(
    block: BlockState,
    scope: Scope,
    blocks: list[weakref.ref[BlockState]],
    opener: FrameType | None = None,
) -> None:
    """Open *block* inside the scope's open blocks: a SAVEPOINT, or with
    ``savepoint=False`` a part of the outer transaction. *opener* is the
    frame of the code that opened it (the caller's caller by default; the
    asyncio front, whose greenlet has no caller, hands it in)."""
    if block._tm is not None:
        check_same_transaction(block, scope)
    top = blocks[-1]()
    if top is None or top._state is not OPEN:
        prune(scope, blocks)
        if not blocks:
            raise RuntimeError("stale blocks")  # pragma: no cover - see prune
    block._nested_ = True
    outer = blocks[0]()
    if outer is None:
        raise RuntimeError("the outer block was abandoned")  # pragma: no cover
    if block._isolation is not None:
        check_nested_isolation(block, outer)
    if outer._owner is not None:  # held open by a generator: is it running?
        check_owner(outer._owner, opener or sys._getframe(1))
    session = outer._session
    if not block._readonly and (READONLY in session.info or session.info.get(GUARDED)):
        raise ReadOnlyTransactionError(
            "a writing block was opened inside a read-only block (tx(readonly=True)); "
            "open the writing block outside it, or drop readonly=True from the outer block"
        )
    block._scope = scope
    block._session = session
    block._debug = outer._debug
    if not block._use_savepoint:
        block._sp = None
        blocks.append(block._ref)
        block._state = OPEN
        return
    before = session.get_nested_transaction()
    try:
        block._sp = begin_nested(session, block._manager.sqlite_begin)
        blocks.append(block._ref)
        block._state = OPEN
    except BaseException:
        if blocks[-1] is block._ref:
            blocks.pop()
        block._state = NEW
        made = session.get_nested_transaction()
        if made is not None and made is not before:
            rollback_savepoint(scope, made)
        raise


def exit_forked(block: BlockState, scope: Scope, exc_type: type[BaseException] | None) -> None:
    """The exit of a block opened before os.fork(), in the child."""
    block._state = DONE
    if exc_type is None:
        raise ForkedTransactionError(
            f"this block was opened in process {scope.pid} before "
            f"os.fork(); process {os.getpid()} cannot commit or roll "
            "it back, so nothing was committed here"
        )


def exit_taken_off(block: BlockState, scope: Scope) -> None:
    """The exit of a block still open, but no longer on the stack: an
    earlier exit was interrupted after it had taken the block off. Finish
    what it began."""
    block._state = DONE
    if block._nested_:
        if block._sp is not None and block._sp.is_active:
            rollback_savepoint(scope, block._sp)
    elif block._dm is None:
        rollback(block._session, None)
        close_block(block, scope, block._session)


def check_innermost(block: BlockState, scope: Scope, blocks: list[weakref.ref[BlockState]]) -> None:
    """*block* ends and is not on top of the stack: drop what interrupted
    exits left above it; blocks still open above it are an error."""
    prune(scope, blocks)
    if blocks[-1] is not block._ref:
        exit_out_of_order(block, scope, blocks)


def check_nested_isolation(block: BlockState, outer: BlockState) -> None:
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
        + "; give the level to the outermost block: `tx(isolation_level=...)`"
    )


def check_same_transaction(block: BlockState, scope: Scope) -> None:
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


def exit_closed(block: BlockState, exc_type: type[BaseException] | None) -> None:
    if block._state is CANCELLED:
        block._state = DONE
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
    if block._state is NEW:
        raise RuntimeError("this block was never entered")
    raise RuntimeError("this block has already ended")


def exit_nested(
    block: BlockState,
    scope: Scope,
    blocks: list[weakref.ref[BlockState]],
    exc_type: type[BaseException] | None,
) -> None:
    blocks.pop()
    block._state = DONE
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
                raise AbortedTransactionError(ABORTED)
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


def prune(scope: Scope, blocks: list[weakref.ref[BlockState]]) -> None:
    """Drop entries an interrupted exit left on top of the stack: blocks that
    ended, or whose finaliser already rolled them back."""
    while len(blocks) > 1:
        top = blocks[-1]()
        if top is not None and top._state is OPEN:
            return
        blocks.pop()
        if top is not None and top._sp is not None and top._sp.is_active:
            rollback_savepoint(scope, top._sp)


def exit_out_of_order(block: BlockState, scope: Scope, refs: list[weakref.ref[BlockState]]) -> None:
    """*block* ends while blocks opened after it are still open: roll the
    whole transaction back, cancel every open block of the scope, and say so."""
    inner = len(refs) - 1 - refs.index(block._ref)
    blocks = [ref() for ref in refs]
    outermost = blocks[0] or block
    for other in blocks:
        if other is not None:
            other._state = CANCELLED
    block._state = DONE
    refs.clear()
    scope.doomed = False
    session = outermost._session
    dm = outermost._dm
    if dm is not None:
        dm.doom("blocks of one scope ended out of order")
    else:
        rollback(session, None)
        close_block(outermost, scope, session)
    raise BlockOrderError(
        f"a block ended while {inner} block(s) opened inside it were still open; "
        "the transaction was rolled back, not committed (blocks of one thread or "
        "task must end innermost first; a generator suspended inside a block keeps "
        "that block open)"
    )
