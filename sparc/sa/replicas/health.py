"""Replicas' health: one replica and what is known of it, the changes of its
state (with their backoff and their one log line each), and the report
``sparc-sa check`` prints. :class:`ReplicaHealth` is the part of
:class:`sparc.sa.replicas.routing.ReplicaSet` that routing a block does
not run unless a replica changes state."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine

from sparc.sa.replicas import gtid

#: The replicas' logger, routing's too.
logger = logging.getLogger("sparc.sa.replicas")

_FIRST_BACKOFF: Final = 0.5
_MAX_BACKOFF: Final = 5.0


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


class Unusable(Exception):
    """This replica cannot serve this read now."""


class ReplicaHealth:
    """The replicas of a primary and their states: what a replica set does
    when one changes state, and what it reports of them."""

    primary: Engine
    mariadb: bool

    def __init__(self, replicas: tuple[Replica, ...]) -> None:
        self.replicas = replicas
        # Guards the replicas' states; held only to read or change them.
        self.lock = threading.Lock()

    if TYPE_CHECKING:  # routing's, which probe() runs on each replica

        def measure(self, replica: Replica, connection: Any, need: Any) -> bool: ...

    def __repr__(self) -> str:
        shown = ", ".join(f"{r.name} ({r.state})" for r in self.replicas)
        return f"<ReplicaSet of {self.primary.url.render_as_string(True)}: {shown}>"

    def foreign(self, replica: Replica, reason: str) -> None:
        """*replica* answers but is not a standby of this primary: skipped,
        and what it was seen to replay forgotten, until a check finds it a
        standby of this primary again. Raises :class:`Unusable`."""
        with self.lock:
            replica.replayed = 0
            replica.checked = time.monotonic()
        self.set_state(replica, "foreign", reason)
        raise Unusable

    def set_state(self, replica: Replica, state: str, reason: str) -> None:
        """Change a replica's state, logging once per change."""
        with self.lock:
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
        from sparc.sa.config.secrets import hide_secrets_in_text

        lines = str(error).splitlines() or [""]
        reason = hide_secrets_in_text(f"{type(error).__name__}: {lines[0]}")
        self.set_state(replica, "down", reason[:200])

    def describe(self) -> list[dict[str, Any]]:
        """Each replica's name, state, last measured replay lag and why it is not up."""
        with self.lock:
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
            except Unusable:
                continue
            except (sa_exc.DBAPIError, OSError) as error:
                self.failed(replica, error)
        return self.describe()
