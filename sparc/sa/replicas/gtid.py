"""MariaDB replicas: GTID positions, the wait for a replica, and the
read-only session mode of a read-only block's connection.

The MariaDB half of :mod:`sparc.sa.replicas`, which calls in here at the
points where the PostgreSQL code reads a WAL position, waits for replay or
decides a server is a replica.

Positions
    A MariaDB position is a GTID set: ``domain-server-seq`` for each
    replication domain, comma-separated (``0-1-25,1-2-7``). Within a domain,
    sequence numbers only grow (``gtid_strict_mode``), so a replica has
    applied a position when, in every domain of it, its ``@@gtid_slave_pos``
    has a sequence number at least as high; a domain the replica does not
    have is not reached. Two positions are merged domain by domain.

    After a commit that wrote, the primary's position is this session's
    ``@@last_gtid``, read on the same connection as it goes back to the pool
    (one round trip, as on PostgreSQL).

The wait
    A read-only block whose scope must see a position opens on the replica,
    and before its first read sends ``SELECT MASTER_GTID_WAIT(position,
    replica_wait)``: one round trip that returns when the replica has applied
    the position (0) or when ``replica_wait`` is over (-1: the block runs on
    the primary). Before the first read, because InnoDB takes a REPEATABLE
    READ snapshot at the first read of a table: a wait after it would not
    make the block see the replayed rows. The timeout is always finite.

A server that is not a replica of this primary
    The position check also reads ``@@read_only``: a server that accepts
    writes is not a replica (or was promoted). When a replica is first
    used, when it was not up, and at most once a second after that, its
    ``SHOW SLAVE STATUS`` is read too: a server that replicates nothing, or
    replicates a server whose ``@@server_id`` (``Master_Server_Id``) is not
    the primary's, or one that has not reached its primary since it started
    (``Master_Server_Id`` 0), is not a replica of this primary; nor is any
    server when the primary writes no binary log (``@@log_bin`` 0: nothing
    can replicate it). Such a server is "foreign": logged once and skipped
    until a check finds it a replica of this primary again. The primary's
    server id is read with a commit's position (no extra round trip), or on
    demand. Without the SLAVE MONITOR privilege the status cannot be read:
    one warning, and the replica is judged by ``read_only`` alone.

Read-only mode
    A read-only block's connection runs ``SET SESSION TRANSACTION READ ONLY``,
    where ``START TRANSACTION READ ONLY`` would let DDL through (DDL commits
    implicitly, which ends that transaction first, and then runs outside
    it). In the READ ONLY session mode every transaction is read-only, so
    MariaDB refuses DDL and TRUNCATE before they run (error 1792), after a
    COMMIT sent by hand too, and for users with SUPER too. MariaDB still
    ends the block's transaction as it refuses DDL: a read after a caught
    refusal takes a new snapshot. At the block's end a primary's connection
    is set back to READ WRITE; a replica's connections stay read-only.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import exc as sa_exc

# Its read-only mode lives beside it; its callers reach it here.
from sparc.sa.replicas.gtidmode import begin_read_only as begin_read_only
from sparc.sa.replicas.gtidmode import end_read_only as end_read_only
from sparc.sa.replicas.gtidmode import keep_read_only

__all__ = [
    "Gtid",
    "current_position",
    "format_token",
    "is_refusal",
    "keep_read_only",
    "measure",
    "parse_token",
    "probe_one",
    "wait",
]

logger = logging.getLogger("sparc.sa.gtid")  # its name before the move

#: Dialect names of MariaDB (and MySQL) engines.
DIALECTS: Final = frozenset({"mysql", "mariadb"})

#: Seconds between two checks of a caught-up replica that it is still one.
CHECK_INTERVAL: Final = 1.0


_ONE: Final = re.compile(r"^\s*(\d{1,10})-(\d{1,10})-(\d{1,20})\s*$")
_TOKEN: Final = re.compile(r"^my:([0-9,-]{5,2000})\.([0-9a-f]{8})$")
# Error codes the server answers with when it refuses a statement, on a
# connection that is fine: not a sign of a lost replica. PyMySQL raises them
# as OperationalError, like a disconnect. 1290: --read-only; 1792: READ ONLY
# transaction; 1941: read-only (MariaDB); 1205, 1213: lock wait, deadlock.
REFUSALS: Final = frozenset({1205, 1213, 1290, 1792, 1941})
#: The codes of a write refused because the transaction or the server is read-only.
READ_ONLY_CODES: Final = frozenset({1290, 1792})


# -- positions ---------------------------------------------------------------------


@dataclass(frozen=True)
class Gtid:
    """A MariaDB position: ``(domain, server, seq)`` for each domain, sorted.
    ``unknown`` is a position no replica is known to have reached (the
    primary's could not be read)."""

    domains: tuple[tuple[int, int, int], ...] = ()
    unknown: bool = False

    @classmethod
    def parse(cls, text: str | None) -> Gtid:
        """A position from ``@@gtid_slave_pos``-style text ('' or None: none)."""
        if not text or not text.strip():
            return cls()
        best: dict[int, tuple[int, int, int]] = {}
        for part in text.split(","):
            match = _ONE.match(part)
            if match is None:
                raise ValueError(
                    f"a MariaDB GTID position is 'domain-server-seq' items separated by "
                    f"commas, like '0-1-25,1-2-7', got {text[:80]!r}"
                )
            domain, server, seq = (int(group) for group in match.groups())
            if domain not in best or seq > best[domain][2]:
                best[domain] = (domain, server, seq)
        return cls(tuple(sorted(best.values())))

    def __str__(self) -> str:
        return ",".join(f"{d}-{s}-{q}" for d, s, q in self.domains)

    def __bool__(self) -> bool:
        return self.unknown or bool(self.domains)

    def merge(self, other: object) -> Gtid:
        """The later of the two positions in every domain."""
        if not isinstance(other, Gtid) or not other:
            return self  # frozen: the same position
        if not self:
            return other
        best = {d: (d, s, q) for d, s, q in self.domains}
        for d, s, q in other.domains:
            if d not in best or q > best[d][2]:
                best[d] = (d, s, q)
        return Gtid(tuple(sorted(best.values())), self.unknown or other.unknown)

    def covers(self, need: object) -> bool:
        """Whether a server at this position has applied *need* (a domain it
        lacks is not reached; an unknown *need* never is)."""
        if not isinstance(need, Gtid) or not need:
            return True
        if need.unknown:
            return False
        have = {d: q for d, _, q in self.domains}
        return all(d in have and have[d] >= q for d, _, q in need.domains)


UNKNOWN: Final = Gtid(unknown=True)
_NONE: Final = Gtid()  # no position; Gtid is frozen, so one object serves


def _check(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=4, person=b"sparc.sa token").hexdigest()


def format_token(position: Gtid) -> str | None:
    """A commit token for *position*: ``my:<GTIDs>.<check>``; None if it is
    unknown or empty (nothing to wait for that a token could say)."""
    if position.unknown or not position.domains:
        return None
    text = str(position)
    return f"my:{text}.{_check(text)}"


def parse_token(token: str) -> Gtid:
    """The position in a ``my:`` commit token, or a ValueError naming the
    expected form. The check catches a token cut or altered on its way: a
    shorter position would read stale data."""
    match = _TOKEN.match(token)
    if match is None:
        raise ValueError(
            "'after' must be a commit token as tx.commit_token gives it, like "
            f"'my:0-1-25.1f2e3d4c', got {token[:40]!r}"
        )
    text, check = match.groups()
    if _check(text) != check:
        raise ValueError(
            f"'after' is a MariaDB commit token whose check does not match its position "
            f"(cut or altered on its way?): {token[:40]!r}"
        )
    return Gtid.parse(text)


def need(mariadb: bool, position: object, after: object) -> Gtid:
    """The position a read-only block waits for: the scope's own *position*
    merged with the *after* token's; a ValueError if the token is of the
    other database."""
    if not mariadb:
        raise ValueError(
            "'after' is a MariaDB commit token ('my:...'), and this engine is not MariaDB: "
            "pass a token that tx.commit_token gave for this engine"
        )
    if after and not isinstance(after, Gtid):
        raise ValueError(
            "'after' is a PostgreSQL commit token ('pg:...'), and this engine is MariaDB: "
            "pass a token that tx.commit_token gave for this engine"
        )
    mine = position if isinstance(position, Gtid) else _NONE
    return mine.merge(after)


# -- the primary ---------------------------------------------------------------------


_IDENTITY: Final = "SELECT @@global.server_id, @@log_bin"
_POSITION_AND_IDENTITY: Final = "SELECT @@last_gtid, @@global.server_id, @@log_bin"


def current_position(dbapi_connection: Any, rs: Any = None) -> Gtid:
    """This session's latest GTID on the primary (after its COMMIT), one
    round trip; its connection is outside any transaction. With it, the
    primary's identity when *rs* does not know it."""
    ask = rs is not None and rs.identity is None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(_POSITION_AND_IDENTITY if ask else "SELECT @@last_gtid")
        row = cursor.fetchone()
    finally:
        cursor.close()
    if ask and row:
        rs.identity = (str(row[1]), int(row[2]))
    return Gtid.parse(row[0] if row else "")


def primary_identity(connection: Any) -> tuple[str, int]:
    """The primary's ``(@@server_id, @@log_bin)``, asked on *connection*."""
    server_id, log_bin = connection.exec_driver_sql(_IDENTITY).one()
    return str(server_id), int(log_bin)


# -- replicas ------------------------------------------------------------------------


def _status(connection: Any) -> dict[str, Any] | str:
    """The replica's ``SHOW SLAVE STATUS`` row ({} when it replicates
    nothing), or why it cannot be read (no SLAVE MONITOR privilege)."""
    try:
        row = connection.exec_driver_sql("SHOW SLAVE STATUS").mappings().first()
    except sa_exc.DBAPIError as error:
        if is_refusal(error) or _code(error) == 1227:  # no SLAVE MONITOR privilege
            return f"{_code(error)}: {error.orig}"[:200]
        raise
    return {} if row is None else dict(row)


def _not_ours(rs: Any, status: dict[str, Any]) -> str | None:
    """Why a server with this ``SHOW SLAVE STATUS`` is not a replica of
    *rs*'s primary, or None if it is one."""
    server_id, log_bin = rs.load_identity()
    if not log_bin:
        return "the primary writes no binary log (log_bin is off): nothing replicates it"
    if not status:
        return "it replicates nothing (SHOW SLAVE STATUS is empty)"
    source = f"{status.get('Master_Host')}:{status.get('Master_Port')}"
    master = str(status.get("Master_Server_Id") or 0)
    if master == "0":
        return (
            f"it has not reached its primary ({source}) since it started: "
            "whose replica it is is unknown"
        )
    if master != server_id:
        return (
            f"it replicates server id {master} ({source}), the primary's server id is {server_id}"
        )
    return None


def _sample(rs: Any, replica: Any, connection: Any, lag_wanted: bool) -> tuple[str, str] | None:
    """Read *replica*'s applied position (and, when due, its replication
    status and lag): ``(state, reason)`` if it cannot serve reads now, or
    None. Raises :class:`_PrimaryUnknown` if the primary's identity, needed
    to judge the replica, cannot be read."""
    rs.stats["checks"] += 1
    slave_pos, read_only = connection.exec_driver_sql("SELECT @@gtid_slave_pos, @@read_only").one()
    replayed = Gtid.parse(slave_pos)
    if not read_only:
        return "foreign", "read_only is off: not a replica, or promoted"
    now = time.monotonic()
    lag: float | None = None
    reason = None
    if lag_wanted or replica.state != "up" or now - replica.confirmed >= CHECK_INTERVAL:
        status = _status(connection)
        if isinstance(status, str):
            _warn_unjudged(rs, replica, status)
            if lag_wanted:
                reason = f"its lag cannot be read ({status})"
        else:
            try:
                foreign = _not_ours(rs, status)
            except (sa_exc.DBAPIError, OSError) as error:
                raise _PrimaryUnknown(type(error).__name__) from None
            if foreign is not None:
                return "foreign", foreign
            replica.confirmed = now
            behind = status.get("Seconds_Behind_Master")
            lag = None if behind is None else float(behind)
            if not lag_wanted or rs.max_lag is None:
                pass  # measured for `sparc-sa check` only
            elif lag is None:
                reason = "replication is stopped"
            elif lag > rs.max_lag:
                reason = f"replay lag {lag:.1f}s"
    with rs.lock:
        replica.replayed = replayed.merge(replica.replayed)
        replica.lag = lag if lag is not None else replica.lag
        replica.checked = now
    return None if reason is None else ("lagging", reason)


class _PrimaryUnknown(Exception):
    """The primary's identity cannot be read: nothing to judge a replica by."""


def _warn_unjudged(rs: Any, replica: Any, why: str) -> None:
    with rs.lock:
        if replica.unjudged:
            return
        replica.unjudged = True
    logger.warning(
        "cannot read SHOW SLAVE STATUS on replica %s (%s): it is judged a replica of the "
        "primary by read_only alone; grant its user SLAVE MONITOR",
        replica.name,
        why,
    )


def _judge(rs: Any, replica: Any, verdict: tuple[str, str] | None) -> bool:
    """Set *replica*'s state from :func:`_sample`'s verdict: whether it may
    serve reads. A foreign server forgets what it was seen to apply."""
    if verdict is None:
        rs.set_state(replica, "up", "")
        return True
    state, reason = verdict
    if state == "foreign":
        with rs.lock:
            replica.replayed = Gtid()
        # The primary's identity may be the stale one (a failover since it
        # was read): the next check asks the primary again.
        rs.identity = None
    rs.set_state(replica, state, reason)
    return False


def _due(rs: Any, replica: Any) -> bool:
    interval = min(CHECK_INTERVAL, rs.max_lag or CHECK_INTERVAL)
    return bool(time.monotonic() - replica.checked >= interval)


def measure(rs: Any, replica: Any, connection: Any, need: object) -> bool | None:
    """Whether *replica* has applied *need*, asking it only when that is not
    known already, the replica is not known up, or its last check is a
    second old; None if it cannot serve reads now (its state says why)."""
    replayed = replica.replayed if isinstance(replica.replayed, Gtid) else _NONE
    if replica.state == "up" and replayed.covers(need) and not _due(rs, replica):
        return True
    try:
        verdict = _sample(rs, replica, connection, rs.max_lag is not None)
    except _PrimaryUnknown as error:
        # The primary is not answering: nothing to compare the replica
        # with, and nothing wrong with the replica itself.
        logger.warning(
            "could not read the primary's server id to check replica %s (%s); this read "
            "does not use it",
            replica.name,
            error,
        )
        return None
    if not _judge(rs, replica, verdict):
        return None
    return bool(replica.replayed.covers(need))


def wait(rs: Any, replica: Any, connection: Any, need: object) -> bool | None:
    """Wait up to ``replica_wait`` for *replica* to apply *need*, with one
    ``MASTER_GTID_WAIT`` before the block's first read: True when it has,
    False when the wait is over, None if it cannot serve reads now."""
    reached = measure(rs, replica, connection, need)
    if reached is not False:
        return reached
    assert isinstance(need, Gtid)
    if need.unknown or rs.wait <= 0:
        rs.stats["fallbacks"] += 1
        return False
    rs.stats["waits"] += 1
    answer = connection.exec_driver_sql(
        "SELECT MASTER_GTID_WAIT(%s, %s)", (str(need), float(rs.wait))
    ).scalar()
    if answer == 0:
        with rs.lock:
            replica.replayed = need.merge(replica.replayed)
        return True
    rs.stats["fallbacks"] += 1
    return False


def probe_one(rs: Any, replica: Any, connection: Any) -> None:
    """``sparc-sa check``: measure *replica* now and set its state."""
    try:
        verdict = _sample(rs, replica, connection, True)
    except _PrimaryUnknown as error:
        rs.set_state(replica, replica.state, f"the primary's server id cannot be read ({error})")
        return
    _judge(rs, replica, verdict)


def _code(error: BaseException) -> int | None:
    args = getattr(getattr(error, "orig", None), "args", ())
    return args[0] if args and isinstance(args[0], int) else None


def is_refusal(error: BaseException) -> bool:
    """Whether *error* is MariaDB refusing a statement on a sound connection
    (read-only, lock wait, deadlock), not a lost connection."""
    return isinstance(error, sa_exc.DBAPIError) and _code(error) in REFUSALS


def isolation(connection: Any) -> str:
    """The isolation level of *connection*'s session, as PostgreSQL spells
    it ('repeatable read', MariaDB's default): a read-only block given a
    token inside an open block takes it to know whether the open block's
    snapshot may predate the token's commit."""
    return str(connection.get_isolation_level()).lower().replace("-", " ")
