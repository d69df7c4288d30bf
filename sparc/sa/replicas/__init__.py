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

Standbys of this primary only
    The same check, made when a replica is first used, at most once a
    second after that, and whenever a block needs more than it was seen to
    replay, also asks whether it is in recovery, and its system identifier
    and timeline: a server that is not a standby of this primary (promoted,
    another cluster, another timeline) is "foreign", logged once and
    skipped until it is one again. Tokens carry a digest of their position
    and the primary's system identifier; one that fails it reads on the
    primary.

Balance
    Read-only blocks take the healthy replicas in turn (round robin).

MariaDB
    The same, with GTID positions: ``@@last_gtid`` after a commit, and
    ``MASTER_GTID_WAIT`` on the replica before the block's first read. The
    dialect's half lives in :mod:`sparc.sa.replicas.gtid`; this module calls into it
    where it reads a position, waits for replay, tells a replica from
    another server, or puts a connection in read-only mode.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import itertools
import logging
import math
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

from sparc.sa.exceptions import ReadOnlyTransactionError, StaleSnapshotError
from sparc.sa.replicas import gtid
from sparc.sa.replicas.gtid import Gtid

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

# The check is optional in the form: a token made before tokens carried one
# (or cut right before it) is well formed, and read on the primary.
_TOKEN = re.compile(r"^pg:([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})(?:\.([0-9a-f]{8}))?$")
#: A position no replica reaches: the read goes to the primary.
PRIMARY_ONLY: Final = 1 << 63
# "start": START TRANSACTION [READ ONLY] begins, it does not write.
_READING = frozenset(
    {"select", "show", "values", "explain", "table", "fetch", "set", "with", "start"}
)
_FIRST_WORD = re.compile(r"\s*(?:/\*.*?\*/\s*|--[^\n]*\n\s*)*(\w+)", re.S)

# The position of a scope's latest commit, per replica set. Contexts follow
# threads and asyncio tasks (a task starts from a copy of its creator's), and
# SQLAlchemy's asyncio layer runs the pool's events in the task's context.
# Keyed by ReplicaSet.key, a serial number never given twice (an id() is
# reused once its object is gone, and would hand a disposed engine's
# positions to a new one).
# A position is an int (a PostgreSQL WAL position) or a Gtid (MariaDB).
_positions: contextvars.ContextVar[dict[int, Any] | None] = contextvars.ContextVar(
    "sparc.sa commit positions", default=None
)
_serials = itertools.count(1)  # next() is atomic under the GIL


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


def read_token(token: str | None) -> tuple[Any, str]:
    """``(WAL position, check)`` of a commit token; ``(0, "")`` for None or ''.
    A ValueError names the expected form when it is not one. A MariaDB
    token (``my:...``) gives ``(Gtid, "my")``: its check, which depends on
    its position alone, is verified here (:func:`sparc.sa.replicas.gtid.parse_token`)."""
    if not token:
        return 0, ""
    if not isinstance(token, str):
        raise TypeError(f"'after' must be a commit token string, got {type(token).__name__}")
    if token.startswith("my:"):  # MariaDB
        return gtid.parse_token(token), "my"
    match = _TOKEN.match(token)
    if match is None:
        raise ValueError(
            "'after' must be a commit token as tx.commit_token gives it, like "
            f"'pg:0/3000148.1f2e3d4c', got {token[:40]!r}"
        )
    position = (int(match.group(1), 16) << 32) | int(match.group(2), 16)
    return position, match.group(3) or ""


def parse_token(token: str | None) -> Any:
    """The WAL position in a commit token (0 for None or ''); its check is
    not verified here (see :meth:`ReplicaSet.token_need`). A MariaDB token's
    :class:`~sparc.sa.replicas.gtid.Gtid`, its check verified."""
    return read_token(token)[0]


def token_check(position: int, system: str) -> str:
    """The check a token carries: a digest of its position and the primary's
    system identifier. Not a secret: it catches a token cut or altered on
    its way (a cookie, a URL) and one from another database cluster, not a
    forger, who can at most send reads to the primary."""
    text = f"{position:x}:{system}".encode()
    return hashlib.blake2b(text, digest_size=4, person=b"sparc.sa token").hexdigest()


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
    if not seconds >= 0 or not math.isfinite(seconds):
        raise ValueError(
            f"{name!r} must be a number of seconds (0 or more, and finite), got {value!r}"
        )
    return seconds


def attach(primary: Engine, options: dict[str, Any], build: Callable[[Any], Any]) -> ReplicaSet:
    """Build the replica engines with *build* and attach them to *primary*."""
    from sparc.sa.options import hide_dsn

    mariadb = primary.dialect.name in gtid.DIALECTS  # GTID positions (sparc.sa.replicas.gtid)
    if primary.dialect.name != "postgresql" and not mariadb:
        raise ValueError(
            f"'replicas' are supported for PostgreSQL and MariaDB only (read-your-writes "
            f"rests on their WAL positions and GTIDs), got a {primary.dialect.name} engine "
            f"for {hide_dsn(primary.url)}"
        )
    engines = [build(config) for config in options["replicas"]]
    for engine in engines:
        sync = getattr(engine, "sync_engine", engine)
        if sync.dialect.is_async != primary.dialect.is_async:
            raise ValueError(_mismatch(primary, sync))
        if mariadb:
            if sync.dialect.name not in gtid.DIALECTS:
                raise ValueError(
                    f"a replica must be a MariaDB database like its primary, got "
                    f"{hide_dsn(sync.url)}"
                )
            gtid.keep_read_only(sync)
        elif sync.dialect.name != "postgresql":
            raise ValueError(
                f"a replica must be a PostgreSQL database like its primary, got "
                f"{hide_dsn(sync.url)}"
            )
    rs = ReplicaSet(primary, engines, max_lag=options["max_lag"], wait=options["wait"])
    primary.__dict__[_ATTR] = rs
    return rs


def _mismatch(primary: Engine, replica: Engine) -> str:
    from sparc.sa.options import hide_dsn

    def kind(engine: Engine) -> str:
        mode = "an asyncio" if engine.dialect.is_async else "a synchronous"
        return f"{mode} driver ({engine.dialect.driver})"

    example = (
        "mysql+asyncmy:// for both or mysql+pymysql:// for both"
        if primary.dialect.name in gtid.DIALECTS
        else "postgresql+asyncpg:// for both or postgresql+psycopg:// for both"
    )
    return (
        f"replica {hide_dsn(replica.url)} has {kind(replica)} and its primary "
        f"{hide_dsn(primary.url)} has {kind(primary)}: a replica serves the "
        f"primary's manager, so both need the same kind, e.g. {example}"
    )


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
    # "up", "down", "lagging", or "foreign": answering, but not a standby of
    # this primary (promoted, another cluster, another timeline).
    state: str = "up"
    # The latest replay position seen while it was a standby of ours (a Gtid on MariaDB).
    replayed: Any = 0
    lag: float | None = None  # seconds, as last measured
    checked: float = 0.0  # time.monotonic() of that measurement
    confirmed: float = 0.0  # MariaDB: time.monotonic() it was last seen replicating ours
    unjudged: bool = False  # MariaDB: its replication status cannot be read (warned once)
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
        wait = 0.0 if wait is None else wait
        if not (wait >= 0 and math.isfinite(wait)):
            raise ValueError(
                f"'replica_wait' must be a number of seconds (0 or more, and finite), got {wait!r}"
            )
        self.wait = wait
        #: MariaDB: positions are GTIDs (sparc.sa.replicas.gtid).
        self.mariadb = self.primary.dialect.name in gtid.DIALECTS
        #: This set's key in a scope's positions: never given to another set.
        self.key = next(_serials)
        #: The primary's (system identifier, timeline), read with a commit's
        #: position or on demand; forgotten when the primary engine connects
        #: anew (it may be another server after a failover). On MariaDB,
        #: (``@@server_id``, ``@@log_bin``): see :mod:`sparc.sa.replicas.gtid`.
        self.identity: tuple[str, int | None] | None = None
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
        return 0 if positions is None else positions.get(self.key, 0)

    def note(self, position: Any) -> None:
        positions = _positions.get()
        if positions is None:
            positions = {}
            _positions.set(positions)
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
        whether it has replayed *need*; :class:`_Unusable` if it lags too far
        or is not a standby of this primary."""
        if self.mariadb:
            reached = gtid.measure(self, replica, connection, need)
            if reached is None:
                raise _Unusable
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
            raise _Unusable from None
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
        with self._lock:
            replica.replayed = max(replica.replayed, replayed)
            replica.lag = float(lag) if lag is not None else 0.0
            replica.checked = time.monotonic()
        if self.max_lag is not None and replica.lag > self.max_lag:
            self.set_state(replica, "lagging", f"replay lag {replica.lag:.1f}s")
            raise _Unusable
        self.set_state(replica, "up", "")
        return bool(replayed >= need)

    def foreign(self, replica: Replica, reason: str) -> None:
        """*replica* answers but is not a standby of this primary: skipped,
        and what it was seen to replay forgotten, until a check finds it a
        standby of this primary again. Raises :class:`_Unusable`."""
        with self._lock:
            replica.replayed = 0
            replica.checked = time.monotonic()
        self.set_state(replica, "foreign", reason)
        raise _Unusable

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
            if state in ("down", "foreign"):
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
        elif state == "foreign":
            logger.warning(
                "replica %s is not a standby of this primary (%s); it serves no read "
                "until it is one again",
                replica.name,
                reason,
            )
        else:
            logger.warning(
                "replica %s is %s (%s); reads go to other replicas or the primary",
                replica.name,
                state,
                reason,
            )

    def failed(self, replica: Replica, error: BaseException) -> None:
        from sparc.sa.options import hide_secrets_in_text

        lines = str(error).splitlines() or [""]
        reason = hide_secrets_in_text(f"{type(error).__name__}: {lines[0]}")
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
                    self.measure(replica, conn, 0)
            except _Unusable:
                continue
            except (sa_exc.DBAPIError, OSError) as error:
                self.failed(replica, error)
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
    except _Unusable:
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


def later(position: Any, other: Any) -> Any:
    """The later of two positions of one replica set (merged domain by
    domain for MariaDB's GTIDs)."""
    if isinstance(position, Gtid) or isinstance(other, Gtid):
        mine = position if isinstance(position, Gtid) else Gtid()
        return mine.merge(other)
    return max(position, other)


def reached(have: Any, need: Any) -> bool:
    """Whether a server at position *have* has applied *need*."""
    if isinstance(have, Gtid) or isinstance(need, Gtid):
        return (have if isinstance(have, Gtid) else Gtid()).covers(need)
    return bool(have >= need)


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
        # MariaDB, on the primary and on replicas: the READ ONLY session
        # mode, which refuses DDL too (sparc.sa.replicas.gtid)
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
