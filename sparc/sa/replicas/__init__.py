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

import importlib as _importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sparc.sa.replicas.config import REPLICA_KEYS
    from sparc.sa.replicas.config import attach as attach
    from sparc.sa.replicas.config import split_config as split_config
    from sparc.sa.replicas.errors import is_disconnect as is_disconnect
    from sparc.sa.replicas.health import Replica
    from sparc.sa.replicas.positions import check_readonly_arguments, parse_token
    from sparc.sa.replicas.positions import lsn_to_int as lsn_to_int
    from sparc.sa.replicas.positions import token_check as token_check
    from sparc.sa.replicas.routing import ReplicaSet, replica_set, replicas
    from sparc.sa.replicas.routing import describe_lines as describe_lines
    from sparc.sa.replicas.tokens import commit_token
    from sparc.sa.replicas.tokens import prepare as prepare

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

# The public names (__all__), and what sparc.sa's other modules and tools
# use through this module, by the module beside it that holds each. They
# are imported on first use, as sparc.sa's own names are: this module runs
# no import, so a thread importing one of its modules never waits for
# another thread's import of this one (which would wait for it in turn:
# Python then hands one of them a module half made).
_HOMES = {
    "REPLICA_KEYS": "config",
    "attach": "config",
    "split_config": "config",
    "is_disconnect": "errors",
    "Replica": "health",
    "check_readonly_arguments": "positions",
    "lsn_to_int": "positions",
    "parse_token": "positions",
    "token_check": "positions",
    "ReplicaSet": "routing",
    "describe_lines": "routing",
    "replica_set": "routing",
    "replicas": "routing",
    "commit_token": "tokens",
    "prepare": "tokens",
}


def __getattr__(name: str) -> Any:
    """A public name, or a module of this package not imported yet."""
    home = _HOMES.get(name)
    if home is not None:
        value = getattr(_importlib.import_module(f"{__name__}.{home}"), name)
        globals()[name] = value
        return value
    if not name.startswith("_"):
        try:
            return _importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
