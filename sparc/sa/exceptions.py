"""Errors raised by sparc.sa's transaction blocks."""

from __future__ import annotations

try:  # the `transaction` package is optional: only joined mode needs it
    from transaction.interfaces import TransientError as _TransientBase
except ImportError:  # pragma: no cover - exercised in environments without it

    class _TransientBase(Exception):  # type: ignore[no-redef]
        """Stands in for transaction.interfaces.TransientError."""


__all__ = [
    "AbortedTransactionError",
    "BlockOrderError",
    "CrossScopeSessionError",
    "DoomedTransactionError",
    "ForeignEventLoopError",
    "ForkedTransactionError",
    "InterleavedTransactionError",
    "InvalidFilterError",
    "IsolationLevelError",
    "JoinedTransactionError",
    "ReadOnlyTransactionError",
    "RetryableDatabaseError",
    "StaleSnapshotError",
    "SuspendedBlockError",
]


class DoomedTransactionError(RuntimeError):
    """A block joined with ``savepoint=False`` failed, so the outer block cannot commit.

    Its work could not be undone on its own; the whole transaction was rolled
    back instead of committing half of it.
    """


class AbortedTransactionError(RuntimeError):
    """A statement failed inside a block, its error was caught, and the
    database aborted the transaction (PostgreSQL does, until it is rolled
    back).

    A COMMIT would silently roll everything back, so the block is rolled back
    instead and this error says so: nothing of the block was committed. To
    let a statement fail and carry on, run it in a nested block (a SAVEPOINT)
    and catch the error outside that block.

    .. versionadded:: 2.0
    """


class InterleavedTransactionError(RuntimeError):
    """Two scopes of one thread tried to run blocks on one shared connection.

    With a pool that hands the same connection to every caller (StaticPool,
    or SingletonThreadPool within a thread), blocks run one after another.
    Another thread waits its turn, but another asyncio task, or another
    transaction manager, of the *same* thread cannot wait without blocking the
    block it waits for, so it gets this error instead.
    """


class ForkedTransactionError(RuntimeError):
    """A block opened before ``os.fork()`` was closed in the child process.

    Its session and connection belong to the parent; the child neither
    commits nor rolls them back.
    """


class BlockOrderError(RuntimeError):
    """Blocks of one scope were closed out of order.

    The blocks of a thread or task form a stack: only the innermost open
    block may end. Two generators suspended inside blocks and closed in the
    order they were opened break that rule. The scope's whole transaction is
    then rolled back, never committed, and every block still open in it raises
    this error when it ends. The next block of the scope starts afresh.

    .. versionadded:: 2.0
    """


class SuspendedBlockError(BlockOrderError):
    """A block was opened while a generator of the same thread or task is
    suspended inside its own block.

    It would have nested in that block and been rolled back when the
    generator is closed early, after it had ended normally; it is refused at
    its entry instead, and nothing of it ran. Finish or close the generator
    first, or open the generator's block in a ``contextlib`` context manager
    whose ``with`` statement encloses the new block (see
    :mod:`sparc.sa.tx.suspended`).
    """


class CrossScopeSessionError(RuntimeError):
    """``transaction.session`` was used outside any block in a thread or task
    started from inside another scope's block (``asyncio.to_thread``, a
    child task).

    That session is not the block's session: work done there would not be part
    of the block, and would be committed later by whatever block that thread
    or task ran next. Pass the block's session to the worker, or open a block
    in the worker.

    .. versionadded:: 2.0
    """


class JoinedTransactionError(RuntimeError):
    """The session belongs to a transaction of the ``transaction`` package
    (a Zope request, say), which alone commits it.

    Raised by ``session.commit()`` inside such a transaction: end the block
    instead, and the work commits when the request does.

    .. versionadded:: 2.0
    """


class RetryableDatabaseError(_TransientBase):  # type: ignore[misc]
    """A serialization failure or deadlock inside a joined transaction.

    A subclass of ``transaction.interfaces.TransientError``, so Zope's
    publisher, ``transaction.manager.attempts()`` and pyramid_tm retry the
    whole request. The database's error is the ``__cause__``.

    .. versionadded:: 2.0
    """


class InvalidFilterError(ValueError):
    """A filter container (see :mod:`sparc.sa.query`) is malformed.

    Raised before any SQL is sent. ``path`` names the offending place in the
    container, such as ``expressions[2].attribute`` (empty for the container
    itself), and the message says what was expected there; a value refused
    for its column also names the column's ``Class.attribute`` (``attribute``).
    Containers usually come from a request, so a value found there is
    described by its type only, never echoed; a class, attribute or condition
    name is quoted, cut short.

    .. versionadded:: 2.0
    """

    def __init__(self, path: str, expected: str, attribute: str | None = None) -> None:
        self.path = path
        self.expected = expected
        #: ``'Class.attribute'`` for a value refused for its column, else None.
        self.attribute = attribute
        where = path or "filter"
        if attribute:
            where = f"{where} ({attribute})"
        super().__init__(f"{where}: {expected}")


class ForeignEventLoopError(RuntimeError):
    """An ``AsyncEngine`` was used from an event loop other than its own.

    Its pooled connections belong to the loop that opened them; using them
    from a second loop would hang or fail deep in the driver. Build one engine
    per event loop. Once the first loop is closed, the next one may take the
    engine over.

    .. versionadded:: 2.0
    """


class ReadOnlyTransactionError(RuntimeError):
    """A read-only block (``tx(readonly=True)``) tried to write.

    Raised for an ORM flush with changes, a Core or text statement that
    writes, and a writing block opened inside a read-only one, whether the
    block runs on a replica or on the primary (in a READ ONLY transaction).
    Nothing the block did is written; the original database error, if any,
    is its ``__cause__``.
    """


class StaleSnapshotError(RuntimeError):
    """A read-only block given a commit token (``after=token``) was opened
    inside an open block whose transaction cannot be shown to see the
    token's commit: its snapshot was taken already (REPEATABLE READ or
    SERIALIZABLE), or it runs on a replica that did not replay that far in
    time. Raised rather than reading without the token's write; open the
    tokened block outside the other one.

    .. versionadded:: 2.0
    """


class IsolationLevelError(RuntimeError):
    """An isolation level or other execution options arrived where they
    cannot apply: after a block's transaction had begun
    (``session.connection(execution_options=...)`` inside a block, which
    SQLAlchemy would only warn about and ignore), in a nested block asking
    for another level than its outer block's, or in a joined block whose
    transaction already runs at another level. Nothing was run at the wrong
    level. Give the level to the outermost block: ``tx(isolation_level=...)``.

    .. versionadded:: 2.0
    """
