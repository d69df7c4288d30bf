"""Replicas: which errors mean a lost replica or a refused write, and their
translation."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from sqlalchemy import exc as sa_exc

from sparc.sa.exceptions import ReadOnlyTransactionError
from sparc.sa.replicas import gtid
from sparc.sa.replicas.routing import Replica, ReplicaSet


def is_disconnect(error: BaseException | None) -> bool:
    """Whether *error* says the connection (a replica's, say) is gone."""
    return (
        isinstance(error, sa_exc.DBAPIError)
        and (error.connection_invalidated or isinstance(error, sa_exc.OperationalError))
        and not gtid.is_refusal(error)  # MariaDB: a refusal, raised as OperationalError
    )


_readonly_logger = logging.getLogger("sparc.sa.readonly")


def read_elsewhere(block: Any, error: BaseException) -> bool:
    """Whether a read-only block's replica died under it (*error*): it was
    marked down, and ``run()``'s next block reads elsewhere, once. Both
    managers' ``run(readonly=True)`` ask this."""
    replica = block.replica
    if replica is None or not is_disconnect(error):
        return False
    _readonly_logger.info("replica %s failed during a read; reading again", replica.name)
    return True


def is_read_only_violation(error: BaseException) -> bool:
    """Whether *error* is the database refusing a write in a read-only transaction."""
    if not isinstance(error, sa_exc.DBAPIError):
        return False
    orig = error.orig
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if code == "25006":
        return True
    args = getattr(orig, "args", ())
    if args and args[0] in gtid.READ_ONLY_CODES:  # MariaDB: READ ONLY transaction, --read-only
        return True
    return "readonly database" in str(orig) or "read-only transaction" in str(orig)


def translate(error: BaseException) -> ReadOnlyTransactionError:
    from sparc.sa.config.secrets import hide_secrets_in_text

    first = hide_secrets_in_text(str(getattr(error, "orig", error)).splitlines()[0])
    return ReadOnlyTransactionError(
        f"a read-only block (tx(readonly=True)) tried to write, and the database "
        f"refused: {first}; nothing was written. Write in a block without readonly=True"
    )


@contextlib.contextmanager
def read_only_end(
    rs: ReplicaSet | None, replica: Replica | None, in_flight: BaseException | None
) -> Iterator[None]:
    """Around a read-only block's end (sync or asyncio): a write the database
    refused, raised by the end itself or already propagating (*in_flight*),
    reaches the caller as :class:`ReadOnlyTransactionError` with the original
    attached; a replica whose connection was lost, under the block's
    statements or under its COMMIT, is marked down, so that a read run again
    goes elsewhere."""
    ended = in_flight
    try:
        yield
    except BaseException as error:
        ended = error
        if isinstance(error, Exception) and is_read_only_violation(error):
            raise translate(error) from error
        raise
    finally:
        if replica is not None and rs is not None and is_disconnect(ended):
            rs.failed(replica, ended)  # type: ignore[arg-type]
    if in_flight is not None and is_read_only_violation(in_flight):
        raise translate(in_flight) from in_flight
