"""Every bad configuration gets a documented error: a property test.

Random option names (known ones, dialect-specific ones, typos) with random
values of every type go through the factory. Each either builds an engine or
raises TypeError, ValueError or ImportError naming an option or the dsn,
without the password; and nothing it did breaks engines built afterwards.
"""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from sparc.sa.engine import engine_from_config  # noqa: E402
from sparc.sa.options import KNOWN_OPTIONS  # noqa: E402

# server_side_cursors and a few other options are deprecated by SQLAlchemy:
# its warning is not what this test is about.
pytestmark = pytest.mark.filterwarnings("ignore::sqlalchemy.exc.SADeprecationWarning")

SECRET = "Sup3rS3cretPassw0rd"
DSNS = [
    "sqlite://",
    "sqlite:///:memory:",
    "sqlite:////tmp/sparc-sa-config-fuzz.db",
    f"postgresql+psycopg://app:{SECRET}@db.example/app",
    f"mysql+pymysql://app:{SECRET}@db.example/app",
]
NAMES = [*sorted(KNOWN_OPTIONS), "server_side_cursors", "pool_sise", "client_encoding", "bogus"]
WORDS = [
    "sqlalchemy.pool.NullPool",
    "NullPool",
    "StaticPool",
    "QueuePool",
    "AsyncAdaptedQueuePool",
    "SERIALISABLE",
    "read committed",
    "debug",
    "yes",
    "5",
    "-1",
    '{"connect_timeout": 3}',
    "os.path",
    "json.dumps",
    "x",
]
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 40),
    st.floats(-2, 50, allow_nan=False),
    st.sampled_from(WORDS),
    st.text(max_size=8),
    st.lists(st.integers(0, 3), max_size=2),
    st.dictionaries(
        st.sampled_from(["a", "password", "connect_timeout"]), st.integers(), max_size=2
    ),
    st.sampled_from([sa.pool.NullPool, sa.pool.StaticPool, object(), len]),
)


def check(dsn: str, kwargs: dict[str, Any]) -> None:
    try:
        engine = engine_from_config({"dsn": dsn, "kwargs": kwargs})
    except (TypeError, ValueError, ImportError) as error:
        message = str(error)
        assert SECRET not in message, message
        assert any(repr(name) in message for name in kwargs) or "'dsn'" in message, message
    else:
        assert isinstance(engine, sa.engine.Engine)
        engine.dispose()
    # nothing that configuration did reaches an unrelated engine built later
    later = engine_from_config({"dsn": "sqlite://"})
    with later.connect() as conn:
        assert conn.exec_driver_sql("select 1").scalar() == 1
    later.dispose()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dsn=st.sampled_from(DSNS),
    kwargs=st.dictionaries(st.sampled_from(NAMES), VALUES, max_size=3),
)
@example(dsn="sqlite://", kwargs={"pool": "sqlalchemy.pool.NullPool"})
@example(dsn="sqlite://", kwargs={"module": 5})
@example(dsn="sqlite://", kwargs={"pool": []})
@example(dsn="sqlite://", kwargs={"server_side_cursors": True})
@example(dsn="sqlite://", kwargs={"future": False})
@example(dsn="sqlite://", kwargs={"poolclass": "AsyncAdaptedQueuePool"})
@example(dsn="sqlite://", kwargs={"plugins": "x"})
@example(dsn="sqlite://", kwargs={"pool_timeout": 3})
@example(dsn=DSNS[3], kwargs={"isolation_level": "SERIALISABLE"})
@example(dsn=DSNS[3], kwargs={"pool_size": -1})
def test_every_bad_configuration_gets_a_documented_error(dsn: str, kwargs: dict[str, Any]) -> None:
    check(dsn, kwargs)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"pool": "sqlalchemy.pool.NullPool"}, ["'pool' takes a Pool instance", "'poolclass'"]),
        ({"module": 5}, ["'module' takes a DB-API module"]),
        ({"pool": []}, ["'pool' takes a Pool instance"]),
        ({"future": False}, ["'future'", "may only be set to True"]),
        ({"poolclass": "AsyncAdaptedQueuePool"}, ["'poolclass'", "needs an asyncio driver"]),
        ({"plugins": "x"}, ["'plugins'", "cannot load"]),
        ({"pool_timeout": 3}, ["'pool_timeout'", "in-memory SQLite", "StaticPool"]),
        ({"pool_size": 5}, ["'pool_size'", "empty one"]),
        ({"isolation_level": "SERIALISABLE"}, ["'isolation_level'", "did you mean 'SERIALIZABLE'"]),
        ({"pool_size": -1}, ["'pool_size' must be at least 0"]),
    ],
)
def test_what_each_bad_option_is_told(kwargs: dict[str, Any], words: list[str]) -> None:
    with pytest.raises((TypeError, ValueError)) as raised:
        engine_from_config({"dsn": "sqlite://", "kwargs": kwargs})
    for word in words:
        assert word in str(raised.value), (word, str(raised.value))
