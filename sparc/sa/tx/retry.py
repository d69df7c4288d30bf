"""The retry policy: which database errors a fresh transaction may not meet
again, and how long to wait before trying.

Used by ``tx.run()`` on both managers, and by joined mode, which hands such
errors to the transaction's owner (Zope's publisher, pyramid_tm) as a
``TransientError`` so that it retries the whole request.
"""

from __future__ import annotations

import inspect
import logging
import random
import time
from collections.abc import Callable
from typing import Any, Final, TypeVar

from sqlalchemy import exc as sa_exc
from sqlalchemy.orm.exc import StaleDataError

from sparc.sa.exceptions import RetryableDatabaseError

__all__ = [
    "RETRY_MYSQL_ERRORS",
    "RETRY_SQLITE_CODES",
    "RETRY_SQLSTATES",
    "backoff",
    "check_attempts",
    "delay_before_next",
    "is_retryable",
    "no_coroutine",
    "retryable_in_request",
    "run_in_blocks",
]

_T = TypeVar("_T")

#: SQLSTATEs of a transaction the server aborted so that it can be retried.
RETRY_SQLSTATES: Final = frozenset({"40001", "40P01"})
#: MySQL/MariaDB error numbers of the same: deadlock, lock wait timeout,
#: and "record has changed since last read" (MariaDB snapshot isolation).
RETRY_MYSQL_ERRORS: Final = frozenset({1213, 1205, 1020})
#: SQLite's result codes for a lock another connection holds: SQLITE_BUSY
#: and its extended forms (SQLITE_BUSY_RECOVERY, _SNAPSHOT, _TIMEOUT).
RETRY_SQLITE_CODES: Final = frozenset({5, 261, 517, 773})

logger = logging.getLogger("sparc.sa.retry")  # its name before the move

# How far down the chain of causes and contexts to look: an error raised
# while handling another carries it, but the chain is not walked unbounded.
_CHAIN_DEPTH: Final = 8


def is_retryable(error: BaseException) -> bool:
    """True if *error* is a serialization failure, deadlock or lock conflict
    that a fresh transaction may not meet again, or was caused by one.

    A server that aborts the whole transaction for a deadlock (MySQL/MariaDB)
    also drops its savepoints, so rolling back to one then fails: that
    failure, whose context is the deadlock, is retryable too.
    """
    seen: BaseException | None = error
    for _ in range(_CHAIN_DEPTH):
        if seen is None:
            return False
        if _retryable_itself(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _retryable_itself(error: BaseException) -> bool:
    if isinstance(error, RetryableDatabaseError):
        return True
    if not isinstance(error, sa_exc.DBAPIError) or error.connection_invalidated:
        return False
    orig = error.orig
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if code in RETRY_SQLSTATES:
        return True
    sqlite_code = getattr(orig, "sqlite_errorcode", None)
    if sqlite_code is not None:
        return sqlite_code in RETRY_SQLITE_CODES
    if type(orig).__module__ == "sqlite3" and str(orig) == "database is locked":
        return True  # Python 3.10's sqlite3 has no error codes
    args: tuple[Any, ...] = getattr(orig, "args", ())
    return bool(args) and type(args[0]) is int and args[0] in RETRY_MYSQL_ERRORS


def retryable_in_request(error: BaseException) -> bool:
    """Whether the owner of a joined transaction may run the request again:
    a serialization failure or deadlock, a lost connection, or an ORM
    ``StaleDataError`` (a versioned row changed under the request, as
    zope.sqlalchemy retries too). A lost connection before the COMMIT leaves
    nothing committed (the COMMIT itself is never judged here: its outcome
    would be unknown)."""
    if is_retryable(error):
        return True
    seen: BaseException | None = error
    for _ in range(_CHAIN_DEPTH):
        if seen is None:
            return False
        if isinstance(seen, sa_exc.DBAPIError) and seen.connection_invalidated:
            return True
        if isinstance(seen, StaleDataError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def backoff(attempt: int, first: float, most: float) -> float:
    """Seconds to wait after failed *attempt* (1, 2, ...): exponential from
    *first*, capped at *most*, with jitter in the upper half so that
    transactions that collided do not collide again in step."""
    cap = min(most, first * 2.0 ** (attempt - 1))
    return cap / 2 + random.uniform(0, cap / 2)


def delay_before_next(
    error: BaseException, attempt: int, attempts: int, first: float, most: float
) -> float:
    """The backoff before running a block again after *error* ended its
    *attempt* (of *attempts*); re-raises *error* when it is not retryable or
    no attempt is left. Every ``run()`` loop, sync, async and read-only,
    decides here."""
    if attempt >= attempts or not is_retryable(error):
        raise error
    delay = backoff(attempt, first, most)
    orig = getattr(error, "orig", error)
    logger.info(
        "transaction aborted by the database (%s); retrying in %.3fs, attempt %d of %d",
        type(orig).__name__,
        delay,
        attempt + 1,
        attempts,
    )
    return delay


def check_attempts(attempts: object) -> int:
    """*attempts* of ``run()``, or a ValueError naming what was expected."""
    if type(attempts) is not int or attempts < 1:
        raise ValueError(f"'attempts' must be a positive integer, got {attempts!r}")
    return attempts


def run_in_blocks(
    open_block: Callable[[], Any],
    fn: Callable[..., _T],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    attempts: int,
    first: float,
    most: float,
    elsewhere: Callable[[Any, BaseException], bool] | None = None,
) -> _T:
    """The loop of every synchronous ``run()``: *fn* in a block from
    *open_block*, run again after a backoff when the database aborted it
    (:func:`delay_before_next` decides), up to *attempts* in all; and, once,
    at once, when *elsewhere* says the block's server failed and the next
    block goes to another (a replica marked down). The asyncio manager's
    ``run()`` is the same loop with ``await``."""
    attempt = 1
    while True:
        block = open_block()
        try:
            with block:
                return no_coroutine(fn(block.session, *args, **kwargs), fn)
        except Exception as error:
            if elsewhere is not None and elsewhere(block, error):
                elsewhere = None  # once
                continue
            time.sleep(delay_before_next(error, attempt, attempts, first, most))
            attempt += 1


def no_coroutine(result: _T, fn: Any) -> _T:
    """*fn*'s result, or a TypeError when it is an awaitable that a
    synchronous ``run()`` cannot await (closed, so that it is never left
    unawaited)."""
    if inspect.isawaitable(result):
        close = getattr(result, "close", None)
        if close is not None:
            close()
        raise TypeError(
            f"run() got an awaitable from {fn!r}; the block was rolled back. For "
            "asynchronous work use the asyncio manager: `await tx.run(fn)`"
        )
    return result
