"""Replicas: positions (PostgreSQL WAL positions, MariaDB GTIDs) and the
commit tokens that carry them."""

from __future__ import annotations

import contextvars
import hashlib
import itertools
import re
from typing import Any, Final

from sparc.sa.replicas import gtid
from sparc.sa.replicas.gtid import Gtid

# The check is optional in the form: a token made before tokens carried one
# (or cut right before it) is well formed, and read on the primary.
_TOKEN = re.compile(r"^pg:([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})(?:\.([0-9a-f]{8}))?$")
#: A position no replica reaches: the read goes to the primary.
PRIMARY_ONLY: Final = 1 << 63

# The position of a scope's latest commit, per replica set. Contexts follow
# threads and asyncio tasks (a task starts from a copy of its creator's), and
# SQLAlchemy's asyncio layer runs the pool's events in the task's context.
# Keyed by ReplicaSet.key, a serial number never given twice (an id() is
# reused once its object is gone, and would hand a disposed engine's
# positions to a new one).
# A position is an int (a PostgreSQL WAL position) or a Gtid (MariaDB).
commit_positions: contextvars.ContextVar[dict[int, Any] | None] = contextvars.ContextVar(
    "sparc.sa commit positions", default=None
)
serials = itertools.count(1)  # next() is atomic under the GIL

# -- positions and tokens ----------------------------------------------------------


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
