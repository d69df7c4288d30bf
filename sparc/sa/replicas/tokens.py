"""Replicas: read-your-writes. A scope's commit token, and a token inside an
open block."""

from __future__ import annotations

from typing import Any, Final

from sqlalchemy.orm import Session

from sparc.sa.exceptions import StaleSnapshotError
from sparc.sa.replicas import gtid
from sparc.sa.replicas.gtid import Gtid
from sparc.sa.replicas.positions import (
    PRIMARY_ONLY,
    commit_positions,
    int_to_lsn,
    reached,
    token_check,
)
from sparc.sa.replicas.routing import ATTR, ReplicaSet, Unusable, replica_set


def prepare(engine: Any) -> None:
    """Give the current context its record of positions before a block of an
    asyncio manager: the block ends in a task of its own, whose context is a
    copy, and the pool notes the commit's position there."""
    if commit_positions.get() is None and getattr(engine, "sync_engine", engine).__dict__.get(ATTR):
        commit_positions.set({})


def commit_token(engine: Any) -> str | None:
    """The position of the current scope's latest commit through *engine*,
    as a string for ``tx(readonly=True, after=token)``; None if it wrote nothing."""
    rs = replica_set(engine)
    position = rs.position() if rs is not None else 0
    if not position:
        return None
    assert rs is not None
    if isinstance(position, Gtid):  # MariaDB
        return gtid.format_token(position)
    # The identity was read with the position; if that failed, the check is
    # made against nothing, and the token's reads go to the primary.
    system = rs.identity[0] if rs.identity is not None else ""
    return f"pg:{int_to_lsn(position)}.{token_check(position, system)}"


# -- a token inside an open block ------------------------------------------------------

#: ``session.info`` key of an outermost read-only block on a replica:
#: ``(replica, floor)``, *floor* a position its snapshot is known to include.
ON_REPLICA: Final = "sparc.sa on replica"


def nested_wait(
    rs: ReplicaSet | None, session: Session, need: Any, deadline: float
) -> float | None:
    """A read-only block given a token (*need*) inside an open block of its
    scope runs in that block's transaction: None once that transaction
    sees *need*, else the seconds to wait before asking again. Raises
    :class:`~sparc.sa.exceptions.StaleSnapshotError` when it never will:
    its snapshot was taken already (REPEATABLE READ, SERIALIZABLE), the
    replica does not replay that far before *deadline*, or the token failed
    its check and only the primary may serve it."""
    where = session.info.get(ON_REPLICA)
    if where is not None and reached(where[1], need):
        return None  # the outer block's snapshot includes it, whatever the isolation
    connection = session.connection()
    isolation = _isolation(connection)
    if isolation is None:
        return None  # no replicas, no position to compare on this database
    if isolation != "read committed":
        raise StaleSnapshotError(
            f"a read-only block with after=token inside an open block of this scope runs "
            f"in that block's transaction, whose snapshot ({isolation}) may predate the "
            "token's commit; open the tokened block outside the other block"
        )
    if where is None:
        return None  # the primary, READ COMMITTED: each statement sees every commit
    replica = where[0]
    assert rs is not None  # a block on a replica has a replica set
    if need == PRIMARY_ONLY:
        raise StaleSnapshotError(
            "a read-only block with a commit token that failed its check was opened "
            f"inside a read-only block on replica {replica.name}; such a read runs "
            "on the primary only: open it outside the other block"
        )
    try:
        if rs.measure(replica, connection, need):
            session.info[ON_REPLICA] = (replica, need)
            return None
        return rs.waited(deadline)
    except Unusable:
        raise StaleSnapshotError(
            f"a read-only block with after=token inside a read-only block on replica "
            f"{replica.name}: the replica did not replay the token's commit within "
            f"replica_wait ({rs.wait} s), and the outer block cannot move to the "
            "primary; open the tokened block outside the other block"
        ) from None


def _isolation(connection: Any) -> str | None:
    """The isolation level of *connection*'s transaction, as PostgreSQL
    spells it ('read committed'); None on a database without positions."""
    if connection.dialect.name in gtid.DIALECTS:
        return gtid.isolation(connection)
    if connection.dialect.name != "postgresql":
        return None
    return str(connection.exec_driver_sql("SHOW transaction_isolation").scalar())
