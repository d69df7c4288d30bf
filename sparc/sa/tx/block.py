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

import logging
import sys
from types import TracebackType
from typing import Any, Final

from sqlalchemy.orm import Session, scoped_session

from sparc.sa.connections.keep import keep_shared_connection
from sparc.sa.exceptions import (
    BlockOrderError,
    DoomedTransactionError,
)
from sparc.sa.foreign.of_asyncio import running_loop
from sparc.sa.foreign.of_sqlalchemy import is_clean
from sparc.sa.foreign.of_transaction import RUNNING
from sparc.sa.tx import begun, joined
from sparc.sa.tx.gate import Gate, GateCache, ThreadGate
from sparc.sa.tx.scope import Scope, after_interruption, note_interruption
from sparc.sa.tx.sessions import (
    IN_BLOCK,
    begin_nested,
    freshen,
    rollback,
    rollback_savepoint,
)
from sparc.sa.tx.stack import (
    DONE,
    DOOMED,
    NEW,
    OPEN,
    BlockHost,
    BlockState,
    check_innermost,
    check_same_transaction,
    close_block,
    commit,
    enter_nested,
    exit_closed,
    exit_forked,
    exit_nested,
    exit_taken_off,
)
from sparc.sa.tx.suspended import GENERATOR as _GENERATOR
from sparc.sa.tx.suspended import owner_of_block

__all__ = ["Block", "BlockHost"]

logger = logging.getLogger("sparc.sa.block")  # its name before the move
_DEBUG: Final = logging.DEBUG

_ABANDONED: Final = (
    "a generator was closed while suspended inside its block, so the block "
    "rolled back, and with it %d inner block(s) that had ended normally "
    "meanwhile (blocks opened on this thread while the generator was suspended "
    "nest in its block); close such generators before opening other blocks"
)


class _Abandoned(BaseException):
    """The exit of a block whose `with` statement is gone."""


class Block(BlockState):
    """One ``with tx():`` block (its state and the stack's less common paths:
    :mod:`sparc.sa.tx.stack`)."""

    __slots__ = ()

    # __enter__ and __exit__ run on every transaction: the common case (a
    # thread outside asyncio, a pool of its own connections, no debug log) is
    # written out inline rather than through helper calls.

    def __enter__(self) -> scoped_session[Session]:
        if self._state is not NEW:
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
            enter_nested(self, scope, blocks)
            return manager.scoped_session
        if scope.interrupted:
            after_interruption(scope)
        self._scope = scope
        dm = scope.joined
        if dm is not None:
            _enter_joined_again(self, scope, dm)
            return manager.scoped_session
        join = manager.join
        if join != "never" and not self._readonly:
            txn = _transaction_to_join(self, scope, join)
            if txn is not None:
                _enter_joined(self, scope, txn)
                return manager.scoped_session
        gates = manager.gates
        pool = manager.engine.pool
        gate = gates.gate if pool is gates.pool else _new_pool(manager, gates, pool)
        # From here on, an exception (a KeyboardInterrupt, say) undoes every step.
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
            self._state = OPEN
        except BaseException:
            _abandon_entry(self, scope, gate)
            raise
        if debug:
            logger.debug("block entered: %r in %r", session, manager)
        return manager.scoped_session

    def __del__(self) -> None:
        # Runs for every block, so the common case (ended) is kept short.
        # getattr: __init__ itself may have been interrupted.
        state = getattr(self, "_state", NEW)
        if state is not OPEN:
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
        if self._state is not OPEN:
            exit_closed(self, exc_type)
            return
        scope = self._scope
        assert scope is not None
        if exc_type is not None and not issubclass(exc_type, Exception):
            note_interruption(scope, tb)
        if scope.forgotten:  # opened before os.fork() and this is the child
            exit_forked(self, scope, exc_type)
            return
        blocks = scope.blocks
        if not blocks or self._ref not in blocks:
            exit_taken_off(self, scope)
            return
        if blocks[-1] is not self._ref:
            check_innermost(self, scope, blocks)
        if len(blocks) > 1:
            exit_nested(self, scope, blocks, exc_type)
            return
        if self._dm is not None:
            _exit_joined(self, scope, exc_type, exc)
            return
        session = self._session
        try:
            if exc_type is None:
                if scope.doomed:
                    raise DoomedTransactionError(DOOMED)
                commit(session, self._manager.checks_aborted)
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
            # Each step runs even if the one before is interrupted: an interruption before
            # the stack is emptied leaves this block for __del__ to end; one before the
            # session is closed leaves it marked, and the next block discards its work.
            try:
                blocks.clear()
                self._state = DONE
                scope.doomed = False
            finally:
                close_block(self, scope, session)


# -- the less common paths of a block, kept out of its class ---------------------


def _new_pool(manager: BlockHost, gates: GateCache, pool: Any) -> Gate | ThreadGate | None:
    """The first block on *pool*: its gate, and on SQLite the guards that close
    an interrupted statement's cursor and, on one shared connection (an
    in-memory database), keep that connection through interruptions."""
    gate = gates.refresh(pool)
    keep_shared_connection(manager.engine)  # SQLite only; the connection kept if shared
    return gate


def _abandon_entry(block: BlockState, scope: Scope, gate: Gate | ThreadGate | None) -> None:
    block._state = NEW
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


def _enter_joined(block: BlockState, scope: Scope, txn: Any) -> None:
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
            if block._use_savepoint:
                if dm.fresh and is_clean(session) and not dm.others_open(scope):
                    # Nothing written yet in this transaction: rolling it
                    # back whole undoes exactly this block, so the two
                    # round trips of a SAVEPOINT and its RELEASE are saved.
                    block._sp = joined.WHOLE_TRANSACTION
                else:
                    block._sp = begin_nested(session, manager.sqlite_begin)
            block._token = manager.open_block.set(block._ref)
            scope.blocks.append(block._ref)
            block._state = OPEN
        except BaseException:
            made = session.get_nested_transaction()
            if made is not None and made is not before:
                rollback_savepoint(scope, made)
            raise
    except BaseException:
        block._state = NEW
        if scope.blocks and scope.blocks[-1] is block._ref:
            scope.blocks.pop()
        if block._token is not None:
            manager.open_block.reset(block._token)
        raise
    if block._debug:
        logger.debug("joined block entered: %r in %r", session, manager)


def _exit_joined(
    block: BlockState, scope: Scope, exc_type: type[BaseException] | None, exc: BaseException | None
) -> None:
    block._state = DONE
    scope.blocks.clear()
    doomed, scope.doomed = scope.doomed, False
    block._leave_context()
    dm = block._dm
    assert dm is not None
    joined.finish_block(dm, block._sp, exc_type, exc, doomed)


def _enter_joined_again(block: BlockState, scope: Scope, dm: joined.SessionDataManager) -> None:
    """The outermost block of a scope whose work already joined a transaction
    (:attr:`Scope.joined`)."""
    if block._tm is not None:
        check_same_transaction(block, scope)
    _enter_joined(block, scope, dm.txn)


def _transaction_to_join(block: BlockState, scope: Scope, join: str) -> Any:
    """The transaction of the ``transaction`` package running for this
    thread, or a Pyramid request's, that the outermost block joins
    (:mod:`sparc.sa.tx.joined`); None when there is none."""
    module = sys.modules.get("transaction")
    running = False
    if module is not None:
        tm = module.manager  # the thread's TransactionManager is tm.manager
        inner = getattr(tm, "manager", tm)
        if scope.watched is not inner:  # once per thread: see sparc.sa.tx.begun
            begun.watch(inner)
            scope.watched = inner
        running = inner.__dict__.get(RUNNING) is not None
    if running or join == "always" or block._tm is not None or "pyramid_tm" in sys.modules:
        return joined.transaction_to_join(join, block._tm)
    return None
