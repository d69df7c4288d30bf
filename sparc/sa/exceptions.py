"""Errors raised by sparc.sa's transaction blocks."""

from __future__ import annotations

__all__ = [
    "DoomedTransactionError",
    "ForkedTransactionError",
    "InterleavedTransactionError",
]


class DoomedTransactionError(RuntimeError):
    """A block joined with ``savepoint=False`` failed, so the outer block cannot commit.

    Its work could not be undone on its own; the whole transaction was rolled
    back instead of committing half of it.
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
