"""Replicas: the replica set of a primary engine, which routes reads (its
replicas' lag and turns; their health is :mod:`sparc.sa.replicas.health`'s),
and the primary's position noted after each commit that wrote."""

from __future__ import annotations

import itertools
import math
import re
import time
from collections.abc import Sequence
from typing import Any, Final

from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sparc.sa.replicas import gtid
from sparc.sa.replicas.gtid import Gtid
from sparc.sa.replicas.health import Replica as Replica
from sparc.sa.replicas.health import ReplicaHealth, logger
from sparc.sa.replicas.health import Unusable as Unusable
from sparc.sa.replicas.positions import (
    PRIMARY_ONLY,
    commit_positions,
    later,
    lsn_to_int,
    serials,
    token_check,
)

ATTR: Final = "_sparc_sa_replicas"
_WROTE: Final = "sparc.sa wrote"
_COMMITTED: Final = "sparc.sa committed"

#: Seconds between two measurements of a replica's replay lag.
CHECK_INTERVAL: Final = 1.0
# "start": START TRANSACTION [READ ONLY] begins, it does not write.
_READING = frozenset(
    {"select", "show", "values", "explain", "table", "fetch", "set", "with", "start"}
)
_FIRST_WORD = re.compile(r"\s*(?:/\*.*?\*/\s*|--[^\n]*\n\s*)*(\w+)", re.S)


def replica_set(engine: Any) -> ReplicaSet | None:
    """The :class:`ReplicaSet` of a primary engine (sync or asyncio), or None."""
    engine = getattr(engine, "sync_engine", engine)
    rs: ReplicaSet | None = engine.__dict__.get(ATTR)
    return rs


def replicas(engine: Any) -> tuple[Any, ...]:
    """The replica engines configured for *engine* (empty if none).

    *engine* is the primary as the factory returned it; replicas of an
    ``AsyncEngine`` are ``AsyncEngine`` objects too.
    """
    rs = replica_set(engine)
    return () if rs is None else tuple(replica.engine for replica in rs.replicas)


# -- the replica set ---------------------------------------------------------------


class ReplicaSet(ReplicaHealth):
    """A primary engine's replicas: their health (:class:`ReplicaHealth`),
    positions and turns."""

    def __init__(
        self,
        primary: Engine,
        engines: Sequence[Any],
        *,
        max_lag: float | None = None,
        wait: float | None = 0.2,
    ) -> None:
        from sparc.sa.config.secrets import hide_dsn

        self.primary = getattr(primary, "sync_engine", primary)
        super().__init__(
            tuple(
                Replica(engine, hide_dsn(getattr(engine, "sync_engine", engine).url))
                for engine in engines
            )
        )
        self.max_lag = max_lag
        wait = 0.0 if wait is None else wait
        if not (wait >= 0 and math.isfinite(wait)):
            raise ValueError(
                f"'replica_wait' must be a number of seconds (0 or more, and finite), got {wait!r}"
            )
        self.wait = wait
        #: MariaDB: positions are GTIDs (sparc.sa.replicas.gtid).
        self.mariadb = self.primary.dialect.name in gtid.DIALECTS
        #: This set's key in a scope's positions: never given to another set.
        self.key = next(serials)
        #: The primary's (system identifier, timeline), read with a commit's
        #: position or on demand; forgotten when the primary engine connects
        #: anew (it may be another server after a failover). On MariaDB,
        #: (``@@server_id``, ``@@log_bin``): see :mod:`sparc.sa.replicas.gtid`.
        self.identity: tuple[str, int | None] | None = None
        self._turn = itertools.count()
        #: Counters, for `sparc-sa check`, the docs and the tests.
        self.stats = {"replica": 0, "primary": 0, "checks": 0, "waits": 0, "fallbacks": 0}
        _track(self)

    # -- positions --

    def position(self) -> Any:
        """The position of the current scope's latest commit (0: none)."""
        positions = commit_positions.get()
        return 0 if positions is None else positions.get(self.key, 0)

    def note(self, position: Any) -> None:
        positions = commit_positions.get()
        if positions is None:
            positions = {}
            commit_positions.set(positions)
        positions[self.key] = later(positions.get(self.key, 0), position)

    def need(self, token: tuple[Any, str]) -> Any:
        """The position a read-only block must see: the scope's own latest
        commit and the token's position (see :meth:`token_need`). Sync, or
        inside SQLAlchemy's greenlet for an asyncio engine (it may ask the
        primary for its identity)."""
        if self.mariadb or isinstance(token[0], Gtid):
            return gtid.need(self.mariadb, self.position(), token[0])
        return max(self.position(), self.token_need(token))

    def load_identity(self) -> tuple[str, int | None]:
        """The primary's identity, asked of it if not known (sync, or inside
        SQLAlchemy's greenlet for an asyncio engine)."""
        identity = self.identity
        if identity is None:
            with self.primary.connect() as conn:
                if self.mariadb:
                    system, timeline = gtid.primary_identity(conn)
                else:
                    system, timeline = conn.exec_driver_sql(_IDENTITY).one()
            identity = self.identity = (str(system), timeline)
        return identity

    def token_need(self, token: tuple[int, str]) -> int:
        """The position a token asks for, once its check holds; PRIMARY_ONLY
        for a token that fails it (cut, altered, or from another cluster)."""
        position, check = token
        if not position:
            return 0
        if check != token_check(position, self.load_identity()[0]):
            logger.warning(
                "a commit token failed its check (cut, altered, made by another "
                "database cluster, or before tokens carried a check); this read "
                "runs on the primary"
            )
            return PRIMARY_ONLY
        return position

    # -- choosing --

    def candidates(self) -> list[Replica]:
        """The replicas to try now, in this block's turn order."""
        replicas = self.replicas
        if len(replicas) == 1 and replicas[0].state == "up":
            return list(replicas)  # one replica, in use: the common case
        now = time.monotonic()
        usable = [
            r
            for r in self.replicas
            if r.state == "up"
            or (r.state in ("down", "foreign") and now >= r.retry_at)
            or (r.state == "lagging" and now - r.checked >= CHECK_INTERVAL)
        ]
        if len(usable) > 1:
            start = next(self._turn) % len(usable)
            usable = usable[start:] + usable[:start]
        return usable

    def needs_check(self, replica: Replica, need: Any) -> bool:
        """Whether this block checks *replica* before its first read: when the
        scope needs more than the replica was seen to replay, when it was not
        up, and at most once per CHECK_INTERVAL anyway, which is how a
        promoted replica is found out although nobody wrote. On MariaDB,
        always: the block connects as it opens, and :func:`sparc.sa.replicas.gtid.measure`
        asks the server only when it must."""
        if self.mariadb:
            return True
        return (
            need > replica.replayed
            or replica.state != "up"
            or time.monotonic() - replica.checked >= CHECK_INTERVAL
        )

    def measure(self, replica: Replica, connection: Any, need: Any) -> bool:
        """One position check on *connection* (a block's own, on *replica*):
        whether it has replayed *need*; :class:`Unusable` if it lags too far
        or is not a standby of this primary."""
        if self.mariadb:
            reached = gtid.measure(self, replica, connection, need)
            if reached is None:
                raise Unusable
            return reached
        self.stats["checks"] += 1
        standby, replayed, lag, system, timeline = connection.exec_driver_sql(_CHECK).one()
        try:
            primary_system, primary_timeline = self.load_identity()
        except (sa_exc.DBAPIError, OSError) as error:
            # The primary is not answering: nothing to compare the replica
            # with, and nothing wrong with the replica itself.
            logger.warning(
                "could not read the primary's system identifier to check replica %s "
                "(%s); this read does not use it",
                replica.name,
                type(error).__name__,
            )
            raise Unusable from None
        if not standby:
            self.foreign(replica, "not in recovery: promoted, or not a standby")
        if str(system) != primary_system:
            self.foreign(
                replica,
                f"system identifier {system}, the primary's is {primary_system}: "
                "a standby of another cluster",
            )
        if timeline != primary_timeline:
            self.foreign(replica, f"timeline {timeline}, the primary's is {primary_timeline}")
        replayed = lsn_to_int(replayed) if replayed else 0
        with self.lock:
            replica.replayed = max(replica.replayed, replayed)
            replica.lag = float(lag) if lag is not None else 0.0
            replica.checked = time.monotonic()
        if self.max_lag is not None and replica.lag > self.max_lag:
            self.set_state(replica, "lagging", f"replay lag {replica.lag:.1f}s")
            raise Unusable
        self.set_state(replica, "up", "")
        return bool(replayed >= need)

    def waited(self, deadline: float) -> float:
        """Seconds to wait before the next check; :class:`Unusable` if the
        time is up."""
        left = deadline - time.monotonic()
        if left <= 0:
            self.stats["fallbacks"] += 1
            raise Unusable
        self.stats["waits"] += 1
        return min(0.02, left)

    def check(self, replica: Replica, session: Session, need: Any) -> None:
        """Check *session*'s replica, waiting up to ``wait`` for it to reach
        *need*; :class:`Unusable` if it does not, or lags too far."""
        if self.mariadb:  # one MASTER_GTID_WAIT, before the block's first read
            if not gtid.wait(self, replica, session.connection(), need):
                raise Unusable
            return
        deadline = time.monotonic() + self.wait
        while not self.measure(replica, session.connection(), need):
            pause = self.waited(deadline)
            # A new transaction, so that its snapshot (under REPEATABLE READ
            # too) is taken after the replay the next check may see.
            session.rollback()
            time.sleep(pause)


def describe_lines(engine: Any) -> list[str]:
    """``sparc-sa check``'s lines for the replicas of *engine* (none without)."""
    rs = replica_set(engine)
    if rs is None:
        return []
    lines = []
    for each in rs.probe():
        lag = "unknown" if each["lag"] is None else f"{each['lag']:.2f} s"
        why = f" ({each['reason']})" if each["reason"] else ""
        lines.append(f"  replica         {each['name']}: {each['state']}{why}, replay lag {lag}")
    return lines


# Whether the server is a standby, its replay position and lag, its system
# identifier and timeline (checked against the primary's). A standby that
# has replayed all it received is not behind, however long ago the last
# commit was. The timeline is the one of the WAL it receives, else of its
# last restartpoint.
_CHECK: Final = (
    "SELECT pg_is_in_recovery(), "
    "CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()::text END, "
    "CASE WHEN NOT pg_is_in_recovery() "
    "OR pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0 "
    "ELSE extract(epoch FROM now() - pg_last_xact_replay_timestamp()) END, "
    "s.system_identifier::text, "
    "COALESCE((SELECT received_tli FROM pg_stat_wal_receiver), "
    "(SELECT timeline_id FROM pg_control_checkpoint())) "
    "FROM pg_control_system() s"
)
# The primary's timeline: the first 8 hex digits of its current WAL file's name.
_TIMELINE: Final = (
    "CASE WHEN pg_is_in_recovery() THEN NULL "
    "ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END"
)
_IDENTITY: Final = f"SELECT system_identifier::text, {_TIMELINE} FROM pg_control_system()"
_POSITION: Final = "SELECT pg_current_wal_lsn()::text"
_POSITION_AND_IDENTITY: Final = (
    f"SELECT pg_current_wal_lsn()::text, system_identifier::text, {_TIMELINE} "
    "FROM pg_control_system()"
)

# -- what the primary wrote --------------------------------------------------------


def statement_writes(statement: str) -> bool:
    match = _FIRST_WORD.match(statement)
    return match is None or match.group(1).lower() not in _READING


def _track(rs: ReplicaSet) -> None:
    """Note the WAL position after each commit that wrote through the primary."""
    engine = rs.primary

    @event.listens_for(engine, "after_cursor_execute")
    def wrote(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement_writes(statement):
            conn.info[_WROTE] = True

    @event.listens_for(engine, "commit")
    def committing(conn: Any) -> None:
        if conn.info.pop(_WROTE, False):
            conn.info[_COMMITTED] = True

    @event.listens_for(engine, "rollback")
    def rolled_back(conn: Any) -> None:
        conn.info.pop(_WROTE, None)

    @event.listens_for(engine, "connect")
    def connected(dbapi_connection: Any, record: Any) -> None:
        rs.identity = None  # maybe another server now: read it again

    @event.listens_for(engine, "checkin")
    def checkin(dbapi_connection: Any, record: Any) -> None:
        info = record.info
        if info.pop(_COMMITTED, False) and dbapi_connection is not None:
            position: Any
            try:
                if rs.mariadb:
                    position = gtid.current_position(dbapi_connection, rs)
                else:
                    position = current_lsn(dbapi_connection, rs)
            except Exception:
                # The commit happened; without its position this scope's
                # reads go to the primary until its next commit.
                logger.warning("could not read the WAL position after a commit", exc_info=True)
                position = gtid.UNKNOWN if rs.mariadb else 1 << 62
            rs.note(position)


def current_lsn(dbapi_connection: Any, rs: ReplicaSet | None = None) -> int:
    """The primary's WAL position, asked outside any transaction (one round
    trip), and with it the primary's identity when *rs* does not know it."""
    before = dbapi_connection.autocommit
    dbapi_connection.autocommit = True
    ask = rs is not None and rs.identity is None
    try:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(_POSITION_AND_IDENTITY if ask else _POSITION)
            row = cursor.fetchone()
        finally:
            cursor.close()
    finally:
        dbapi_connection.autocommit = before
    if ask:
        assert rs is not None
        rs.identity = (str(row[1]), row[2])
    return lsn_to_int(row[0])
