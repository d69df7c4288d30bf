"""Read replicas: read-only blocks on PostgreSQL streaming replicas, never
staler than the reader's own writes.

An engine's configuration may name replicas::

    {'dsn': 'postgresql+psycopg://app@primary/app',
     'replicas': ['postgresql+psycopg://app@replica1/app',
                  {'dsn': 'postgresql+psycopg://app@replica2/app',
                   'kwargs': {'pool_size': 2}}],
     'kwargs': {'pool_size': 10},          # shared by every replica too
     'replica_max_lag': 5,                 # seconds; a replica further behind is skipped
     'replica_wait': 0.2}                  # seconds a read waits for a replica to catch up

The factory returns the primary engine as always; :func:`replicas` gives
the replica engines, and :func:`replica_set` the object that routes reads.

Positions, not clocks
    Every commit that wrote through the primary engine is followed by one
    query for the primary's WAL position (``pg_current_wal_lsn()``), made on
    the same connection as it goes back to the pool, outside any
    transaction. The scope (thread or asyncio task) keeps the highest
    position it wrote. A later read-only block of that scope runs on a
    replica only once the replica has replayed that far
    (``pg_last_wal_replay_lsn()``), waiting up to ``replica_wait``, else on
    the primary. A scope that never wrote checks nothing: its read-only
    blocks cost no extra round trip. :func:`commit_token` turns the position
    into a string that can travel in a cookie.

Health
    A replica whose connection fails is marked down and skipped, with one
    warning per change of state, and tried again after a back-off
    (0.5 s doubling to 5 s). With ``replica_max_lag`` set, a replica's replay
    lag is measured at most once a second (as part of the first query of a
    block), and a replica further behind is skipped until it catches up.

Balance
    Read-only blocks take the healthy replicas in turn (round robin).

MariaDB
    The same, with GTID positions: ``@@last_gtid`` after a commit, and
    ``MASTER_GTID_WAIT`` on the replica before the block's first read
    (:mod:`sparc.sa.gtid`).
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sparc.sa import gtid
from sparc.sa.exceptions import ReadOnlyTransactionError
from sparc.sa.gtid import Gtid

__all__ = [
    "REPLICA_KEYS",
    "Replica",
    "ReplicaSet",
    "check_readonly_arguments",
    "commit_token",
    "parse_token",
    "replica_set",
    "replicas",
]

logger = logging.getLogger(__name__)

#: The keys of an engine configuration that describe its replicas.
REPLICA_KEYS: Final = ("replicas", "replica_max_lag", "replica_wait")

#: ``session.info`` key: the session runs a read-only block (the whole transaction).
READONLY: Final = "sparc.sa readonly"
#: ``session.info`` key: read-only blocks nested in a writing block, open now.
GUARDED: Final = "sparc.sa readonly guard"

_ATTR: Final = "_sparc_sa_replicas"
_WROTE: Final = "sparc.sa wrote"
_COMMITTED: Final = "sparc.sa committed"
_READ_ONLY_MODE: Final = "sparc.sa read only mode"
_LISTENING: Final = "sparc.sa readonly guard listening"

_FIRST_BACKOFF: Final = 0.5
_MAX_BACKOFF: Final = 5.0
#: Seconds between two measurements of a replica's replay lag.
CHECK_INTERVAL: Final = 1.0

_TOKEN = re.compile(r"^pg:([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")
# "start": START TRANSACTION [READ ONLY] begins, it does not write.
_READING = frozenset(
    {"select", "show", "values", "explain", "table", "fetch", "set", "with", "start"}
)
_FIRST_WORD = re.compile(r"\s*(?:/\*.*?\*/\s*|--[^\n]*\n\s*)*(\w+)", re.S)

# The position of a scope's latest commit, per replica set. Contexts follow
# threads and asyncio tasks (a task starts from a copy of its creator's), and
# SQLAlchemy's asyncio layer runs the pool's events in the task's context.
_positions: contextvars.ContextVar[dict[int, Any] | None] = contextvars.ContextVar(
    "sparc.sa commit positions", default=None
)


# -- positions and tokens ----------------------------------------------------------


def prepare(engine: Any) -> None:
    """Give the current context its record of positions before a block of an
    asyncio manager: the block ends in a task of its own, whose context is a
    copy, and the pool notes the commit's position there."""
    if _positions.get() is None and getattr(engine, "sync_engine", engine).__dict__.get(_ATTR):
        _positions.set({})


def lsn_to_int(text: str) -> int:
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def int_to_lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def check_readonly_arguments(readonly: object, after: object, spelling: str) -> str | None:
    """``readonly``/``after`` of ``tx(...)``, ``atx(...)`` and ``run(...)``:
    *after*, or a TypeError naming what was expected. *spelling* is the call
    to advise."""
    if readonly is not True:
        raise TypeError(
            f"'readonly' must be True or False, got {readonly!r}"
            if readonly is not False
            else f"'after' applies to read-only blocks: {spelling}(readonly=True, after=token)"
        )
    if after is not None and not isinstance(after, str):
        raise TypeError(f"'after' must be a commit token string, got {type(after).__name__}")
    return after


def parse_token(token: str | None) -> Any:
    """The WAL position in a commit token (0 for None or ''); a MariaDB
    token's :class:`~sparc.sa.gtid.Gtid`."""
    if not token:
        return 0
    if not isinstance(token, str):
        raise TypeError(f"'after' must be a commit token string, got {type(token).__name__}")
    if token.startswith("my:"):  # MariaDB
        return gtid.parse_token(token)
    match = _TOKEN.match(token)
    if match is None:
        raise ValueError(
            f"'after' must be a commit token as tx.commit_token gives it, like 'pg:0/3000148', "
            f"got {token[:40]!r}"
        )
    return (int(match.group(1), 16) << 32) | int(match.group(2), 16)


def commit_token(engine: Engine) -> str | None:
    """The position of the current scope's latest commit through *engine*,
    as a string for ``tx(readonly=True, after=token)``; None if it wrote nothing."""
    rs = replica_set(engine)
    position = rs.position() if rs is not None else 0
    if isinstance(position, Gtid):  # MariaDB
        return gtid.format_token(position)
    return f"pg:{int_to_lsn(position)}" if position else None


# -- configuration -----------------------------------------------------------------


def split_config(section: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``(primary config, replica options or None)`` from an engine config section."""
    primary = {key: value for key, value in section.items() if key not in REPLICA_KEYS}
    if not any(key in section for key in REPLICA_KEYS):
        return primary, None
    raw = section.get("replicas")
    if raw is None:
        raw = []
    if isinstance(raw, str):
        raw = raw.split()
    if not isinstance(raw, Sequence):
        raise TypeError(
            f"'replicas' must be a list of DSNs or of {{'dsn': ..., 'kwargs': {{...}}}} "
            f"mappings (or a space-separated string), got {type(raw).__name__}"
        )
    shared = section.get("kwargs") or {}
    configs = []
    for index, entry in enumerate(raw):
        if isinstance(entry, str):
            configs.append({"dsn": entry, "kwargs": dict(shared)})
        elif isinstance(entry, Mapping):
            unknown = sorted(str(key) for key in entry if key not in ("dsn", "kwargs"))
            if unknown or "dsn" not in entry:
                raise ValueError(
                    f"replicas[{index}] must be a DSN or a mapping with 'dsn' and optionally "
                    f"'kwargs', got keys {sorted(map(str, entry))}"
                )
            own = entry.get("kwargs") or {}
            if not isinstance(own, Mapping):
                raise TypeError(f"replicas[{index}]['kwargs'] must be a mapping")
            configs.append({"dsn": entry["dsn"], "kwargs": {**shared, **own}})
        else:
            raise TypeError(
                f"replicas[{index}] must be a DSN string or a mapping, got {type(entry).__name__}"
            )
    return primary, {
        "replicas": configs,
        "max_lag": _seconds(section, "replica_max_lag", None),
        "wait": _seconds(section, "replica_wait", 0.2),
    }


def _seconds(section: Mapping[str, Any], name: str, default: float | None) -> float | None:
    value = section.get(name)
    if value is None or value == "":
        return default
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = -1.0
    if not seconds >= 0:
        raise ValueError(f"{name!r} must be a number of seconds (0 or more), got {value!r}")
    return seconds


def attach(primary: Engine, options: dict[str, Any], build: Callable[[Any], Any]) -> ReplicaSet:
    """Build the replica engines with *build* and attach them to *primary*."""
    from sparc.sa.options import hide_dsn

    if primary.dialect.name in gtid.DIALECTS:  # MariaDB: GTID positions (sparc.sa.gtid)
        engines = [build(config) for config in options["replicas"]]
        for engine in engines:
            sync = getattr(engine, "sync_engine", engine)
            if sync.dialect.name not in gtid.DIALECTS:
                raise ValueError(
                    f"a replica must be a MariaDB database like its primary, got "
                    f"{hide_dsn(sync.url)}"
                )
            gtid.keep_read_only(sync)
        rs = ReplicaSet(primary, engines, max_lag=options["max_lag"], wait=options["wait"])
        primary.__dict__[_ATTR] = rs
        return rs
    if primary.dialect.name != "postgresql":
        raise ValueError(
            f"'replicas' are supported for PostgreSQL and MariaDB only (read-your-writes "
            f"rests on their WAL positions and GTIDs), got a {primary.dialect.name} engine "
            f"for {hide_dsn(primary.url)}"
        )
    engines = [build(config) for config in options["replicas"]]
    for engine in engines:
        sync = getattr(engine, "sync_engine", engine)
        if sync.dialect.name != "postgresql":
            raise ValueError(
                f"a replica must be a PostgreSQL database like its primary, got "
                f"{hide_dsn(sync.url)}"
            )
    rs = ReplicaSet(primary, engines, max_lag=options["max_lag"], wait=options["wait"])
    primary.__dict__[_ATTR] = rs
    return rs


def replica_set(engine: Any) -> ReplicaSet | None:
    """The :class:`ReplicaSet` of a primary engine (sync or asyncio), or None."""
    engine = getattr(engine, "sync_engine", engine)
    rs: ReplicaSet | None = engine.__dict__.get(_ATTR)
    return rs


def replicas(engine: Any) -> tuple[Any, ...]:
    """The replica engines configured for *engine* (empty if none).

    *engine* is the primary as the factory returned it; replicas of an
    ``AsyncEngine`` are ``AsyncEngine`` objects too.
    """
    rs = replica_set(engine)
    return () if rs is None else tuple(replica.engine for replica in rs.replicas)


# -- the replica set ---------------------------------------------------------------


@dataclass(eq=False)
class Replica:
    """One replica and what is known of it."""

    engine: Any
    name: str
    state: str = "up"  # "up", "down" or "lagging"
    replayed: Any = 0  # the latest replay position seen (a Gtid on MariaDB)
    lag: float | None = None  # seconds, as last measured
    checked: float = 0.0  # time.monotonic() of that measurement
    retry_at: float = 0.0
    failures: int = 0
    reason: str = field(default="", repr=False)

    @property
    def sync_engine(self) -> Engine:
        return getattr(self.engine, "sync_engine", self.engine)  # type: ignore[no-any-return]


class _Unusable(Exception):
    """This replica cannot serve this read now."""


class ReplicaSet:
    """A primary engine's replicas: their health, positions and turns."""

    def __init__(
        self,
        primary: Engine,
        engines: Sequence[Any],
        *,
        max_lag: float | None = None,
        wait: float | None = 0.2,
    ) -> None:
        from sparc.sa.options import hide_dsn

        self.primary = getattr(primary, "sync_engine", primary)
        self.replicas = tuple(
            Replica(engine, hide_dsn(getattr(engine, "sync_engine", engine).url))
            for engine in engines
        )
        self.max_lag = max_lag
        self.wait = 0.0 if wait is None else wait
        #: MariaDB: positions are GTIDs (sparc.sa.gtid).
        self.mariadb = self.primary.dialect.name in gtid.DIALECTS
        # Guards the replicas' states; held only to read or change them.
        self._lock = threading.Lock()
        self._turn = itertools.count()
        #: Counters, for `sparc-sa check`, the docs and the tests.
        self.stats = {"replica": 0, "primary": 0, "checks": 0, "waits": 0, "fallbacks": 0}
        _track(self)

    def __repr__(self) -> str:
        shown = ", ".join(f"{r.name} ({r.state})" for r in self.replicas)
        return f"<ReplicaSet of {self.primary.url.render_as_string(True)}: {shown}>"

    # -- positions --

    def position(self) -> Any:
        """The position of the current scope's latest commit (0: none)."""
        positions = _positions.get()
        return 0 if positions is None else positions.get(id(self), 0)

    def need(self, after: Any) -> Any:
        """The position a read-only block must see: the scope's own latest
        commit and the *after* token's position."""
        if self.mariadb or isinstance(after, Gtid):
            return gtid.need(self.mariadb, self.position(), after)
        return max(self.position(), after)

    def note(self, position: Any) -> None:
        positions = _positions.get()
        if positions is None:
            positions = {}
            _positions.set(positions)
        if isinstance(position, Gtid):  # MariaDB: merged domain by domain
            positions[id(self)] = position.merge(positions.get(id(self)))
            return
        if position > positions.get(id(self), 0):
            positions[id(self)] = position

    # -- choosing --

    def candidates(self) -> list[Replica]:
        """The replicas to try now, in this block's turn order."""
        now = time.monotonic()
        usable = [
            r
            for r in self.replicas
            if r.state == "up"
            or (r.state == "down" and now >= r.retry_at)
            or (r.state == "lagging" and now - r.checked >= CHECK_INTERVAL)
        ]
        if len(usable) > 1:
            start = next(self._turn) % len(usable)
            usable = usable[start:] + usable[:start]
        return usable

    def needs_check(self, replica: Replica, need: Any) -> bool:
        if self.mariadb:
            return True  # connect as the block opens: gtid.measure asks only when it must
        if need > replica.replayed:
            return True
        if replica.state != "up":
            return True
        return self.max_lag is not None and time.monotonic() - replica.checked >= CHECK_INTERVAL

    def measure(self, replica: Replica, connection: Any, need: Any) -> bool:
        """One position check on *connection* (a block's own, on *replica*):
        whether it has replayed *need*; :class:`_Unusable` if it lags too far."""
        if self.mariadb:
            reached = gtid.measure(self, replica, connection, need)
            if reached is None:
                raise _Unusable
            return reached
        self.stats["checks"] += 1
        replayed, lag = connection.exec_driver_sql(_CHECK).one()
        replayed = lsn_to_int(replayed) if replayed else 0
        with self._lock:
            replica.replayed = max(replica.replayed, replayed)
            replica.lag = float(lag) if lag is not None else 0.0
            replica.checked = time.monotonic()
        if self.max_lag is not None and replica.lag > self.max_lag:
            self.set_state(replica, "lagging", f"replay lag {replica.lag:.1f}s")
            raise _Unusable
        self.set_state(replica, "up", "")
        return bool(replayed >= need)

    def waited(self, deadline: float) -> float:
        """Seconds to wait before the next check; :class:`_Unusable` if the
        time is up."""
        left = deadline - time.monotonic()
        if left <= 0:
            self.stats["fallbacks"] += 1
            raise _Unusable
        self.stats["waits"] += 1
        return min(0.02, left)

    def check(self, replica: Replica, session: Session, need: Any) -> None:
        """Check *session*'s replica, waiting up to ``wait`` for it to reach
        *need*; :class:`_Unusable` if it does not, or lags too far."""
        if self.mariadb:  # one MASTER_GTID_WAIT, before the block's first read
            if not gtid.wait(self, replica, session.connection(), need):
                raise _Unusable
            return
        deadline = time.monotonic() + self.wait
        while not self.measure(replica, session.connection(), need):
            pause = self.waited(deadline)
            # A new transaction, so that its snapshot (under REPEATABLE READ
            # too) is taken after the replay the next check may see.
            session.rollback()
            time.sleep(pause)

    def set_state(self, replica: Replica, state: str, reason: str) -> None:
        """Change a replica's state, logging once per change."""
        with self._lock:
            before = replica.state
            replica.reason = reason
            if state == "down":
                replica.failures += 1
                delay = min(_FIRST_BACKOFF * 2 ** (replica.failures - 1), _MAX_BACKOFF)
                replica.retry_at = time.monotonic() + delay
            elif state == "up":
                replica.failures = 0
            if before == state:
                return
            replica.state = state
        if state == "up":
            logger.warning("replica %s is back in use (was %s)", replica.name, before)
        else:
            logger.warning(
                "replica %s is %s (%s); reads go to other replicas or the primary",
                replica.name,
                state,
                reason,
            )

    def failed(self, replica: Replica, error: BaseException) -> None:
        from sparc.sa.options import hide_secrets_in_text

        reason = hide_secrets_in_text(f"{type(error).__name__}: {str(error).splitlines()[0]}")
        self.set_state(replica, "down", reason[:200])

    def describe(self) -> list[dict[str, Any]]:
        """Each replica's name, state, last measured replay lag and why it is not up."""
        with self._lock:
            return [
                {"name": r.name, "state": r.state, "lag": r.lag, "reason": r.reason}
                for r in self.replicas
            ]

    def probe(self) -> list[dict[str, Any]]:
        """Connect to every replica now and measure it (``sparc-sa check``)."""
        for replica in self.replicas:
            try:
                with replica.sync_engine.connect() as conn:
                    if self.mariadb:
                        gtid.probe_one(self, replica, conn)
                        continue
                    replayed, lag = conn.exec_driver_sql(_CHECK).one()
            except sa_exc.DBAPIError as error:
                self.failed(replica, error)
                continue
            with self._lock:
                replica.replayed = max(replica.replayed, lsn_to_int(replayed) if replayed else 0)
                replica.lag = float(lag or 0)
                replica.checked = time.monotonic()
            if self.max_lag is not None and replica.lag > self.max_lag:
                self.set_state(replica, "lagging", f"replay lag {replica.lag:.1f}s")
            else:
                self.set_state(replica, "up", "")
        return self.describe()


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


# SELECT the replay position and the replay lag. A standby that has replayed
# all it received is not behind, however long ago the last commit was.
_CHECK: Final = (
    "SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()::text "
    "ELSE pg_current_wal_lsn()::text END, "
    "CASE WHEN NOT pg_is_in_recovery() "
    "OR pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0 "
    "ELSE extract(epoch FROM now() - pg_last_xact_replay_timestamp()) END"
)


# -- what the primary wrote --------------------------------------------------------


def _writes(statement: str) -> bool:
    match = _FIRST_WORD.match(statement)
    return match is None or match.group(1).lower() not in _READING


def _track(rs: ReplicaSet) -> None:
    """Note the WAL position after each commit that wrote through the primary."""
    engine = rs.primary

    @event.listens_for(engine, "after_cursor_execute")
    def wrote(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if _writes(statement):
            conn.info[_WROTE] = True

    @event.listens_for(engine, "commit")
    def committing(conn: Any) -> None:
        if conn.info.pop(_WROTE, False):
            conn.info[_COMMITTED] = True

    @event.listens_for(engine, "rollback")
    def rolled_back(conn: Any) -> None:
        conn.info.pop(_WROTE, None)

    @event.listens_for(engine, "checkin")
    def checkin(dbapi_connection: Any, record: Any) -> None:
        info = record.info
        if info.pop(_COMMITTED, False) and dbapi_connection is not None:
            position: Any
            try:
                if rs.mariadb:
                    position = gtid.current_position(dbapi_connection)
                else:
                    position = current_lsn(dbapi_connection)
            except Exception:
                # The commit happened; without its position this scope's
                # reads go to the primary until its next commit.
                logger.warning("could not read the WAL position after a commit", exc_info=True)
                position = gtid.UNKNOWN if rs.mariadb else 1 << 62
            rs.note(position)


def current_lsn(dbapi_connection: Any) -> int:
    """The primary's WAL position, asked outside any transaction (one round trip)."""
    before = dbapi_connection.autocommit
    dbapi_connection.autocommit = True
    try:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("SELECT pg_current_wal_lsn()::text")
            text = cursor.fetchone()[0]
        finally:
            cursor.close()
    finally:
        dbapi_connection.autocommit = before
    return lsn_to_int(text)


# -- read-only transactions on the primary and write guards --------------------------


def _read_only_mode(dbapi_connection: Any, on: bool) -> bool:
    """Switch a psycopg connection's next transactions to READ ONLY (no round
    trip: psycopg sends BEGIN READ ONLY); False if the driver cannot."""
    if hasattr(dbapi_connection, "read_only"):  # psycopg 3
        dbapi_connection.read_only = on
        return True
    if hasattr(dbapi_connection, "readonly"):  # psycopg2
        dbapi_connection.readonly = on
        return True
    return False


def after_begin(session: Session, transaction: Any, connection: Any) -> None:
    """A read-only block's transaction on the primary is READ ONLY."""
    if (
        session.info.get(READONLY)
        and not transaction.nested
        and connection.dialect.name in gtid.DIALECTS
    ):
        # MariaDB, on the primary and on replicas
        session.info[_READ_ONLY_MODE] = (gtid.begin_read_only(connection), "mariadb")
        return
    if session.info.get(READONLY) is not True or transaction.nested:
        return
    name = connection.dialect.name
    raw = connection.connection.driver_connection
    if name == "sqlite":
        connection.exec_driver_sql("PRAGMA query_only = 1")
        session.info[_READ_ONLY_MODE] = (connection.connection.dbapi_connection, "sqlite")
    elif name == "postgresql":
        if not connection.dialect.is_async and _read_only_mode(
            raw, True
        ):  # psycopg: BEGIN READ ONLY, no extra round trip
            session.info[_READ_ONLY_MODE] = (raw, "psycopg")
        else:
            connection.exec_driver_sql("SET TRANSACTION READ ONLY")


def after_end(session: Session) -> None:
    """The connection goes back to the pool writable (after_commit, after_rollback)."""
    if session.get_nested_transaction() is not None:
        return  # a SAVEPOINT ended; the transaction goes on
    mode = session.info.pop(_READ_ONLY_MODE, None)
    if mode is None:
        return
    raw, kind = mode
    if kind == "sqlite":
        cursor = raw.cursor()  # the DBAPI connection, or SQLAlchemy's adapter of aiosqlite
        try:
            cursor.execute("PRAGMA query_only = 0")
        finally:
            cursor.close()
    elif kind == "mariadb":
        gtid.end_read_only(raw)
    else:
        _read_only_mode(raw, False)


def before_flush(session: Session, flush_context: Any, instances: Any) -> None:
    if (session.info.get(READONLY) or session.info.get(GUARDED)) and (
        session.new or session.deleted or session.dirty
    ):
        raise ReadOnlyTransactionError(
            "a read-only block (tx(readonly=True)) tried to write: the session has "
            f"{len(session.new)} new, {len(session.dirty)} changed and "
            f"{len(session.deleted)} deleted object(s); write in a block without "
            "readonly=True"
        )


def do_orm_execute(state: Any) -> None:
    info = state.session.info
    if not (info.get(READONLY) or info.get(GUARDED)):
        return
    writes = state.is_insert or state.is_update or state.is_delete
    if not writes and not state.is_select:
        text = getattr(state.statement, "text", None)
        writes = isinstance(text, str) and _writes(text)
    if writes:
        raise ReadOnlyTransactionError(
            "a read-only block (tx(readonly=True)) tried to run a statement that "
            "writes; write in a block without readonly=True"
        )


def install_guards(factory: Any) -> None:
    """Listen on the sessionmaker of read-only blocks."""
    event.listen(factory, "after_begin", after_begin)
    event.listen(factory, "after_commit", after_end)
    event.listen(factory, "after_rollback", after_end)
    event.listen(factory, "before_flush", before_flush)
    event.listen(factory, "do_orm_execute", do_orm_execute)


def guard(session: Session) -> None:
    """Refuse writes in *session* until :func:`unguard` (a read-only block
    inside a writing one). The listeners go on this session only, the first
    time, and stay: removing an instance's listeners is not reliable in
    SQLAlchemy, and while unguarded they return at once."""
    info = session.info
    info[GUARDED] = info.get(GUARDED, 0) + 1
    if _LISTENING not in info:
        info[_LISTENING] = True
        event.listen(session, "before_flush", before_flush)
        event.listen(session, "do_orm_execute", do_orm_execute)


def unguard(session: Session) -> None:
    count = session.info.get(GUARDED, 1) - 1
    if count:
        session.info[GUARDED] = count
    else:
        session.info.pop(GUARDED, None)


def is_disconnect(error: BaseException | None) -> bool:
    """Whether *error* says the connection (a replica's, say) is gone."""
    return (
        isinstance(error, sa_exc.DBAPIError)
        and (error.connection_invalidated or isinstance(error, sa_exc.OperationalError))
        and not gtid.is_refusal(error)  # MariaDB: a refusal, raised as OperationalError
    )


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
    from sparc.sa.options import hide_secrets_in_text

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
