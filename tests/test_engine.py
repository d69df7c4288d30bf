"""The engine factory: config shapes, conversions, defaults, errors, secrets."""

from __future__ import annotations

import logging
import pathlib
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool, QueuePool, StaticPool
from zope import component
from zope.component.interfaces import IFactory

from sparc.sa.engine import (
    FACTORY_NAME,
    ISAEngine,
    SAEngineFromConfig,
    SAEngineFromConfigFactory,
    engine_from_config,
)

from .conftest import SERVERS, server_dsn

SECRET = "pa55-w0rd-s3cret"
SERVER_URL = f"postgresql+psycopg://app:{SECRET}@db.invalid:5432/app"


_built: list[Engine] = []


def build(kwargs: dict[str, Any], dsn: str = "sqlite://") -> Engine:
    engine = engine_from_config({"dsn": dsn, "kwargs": kwargs})
    _built.append(engine)
    return engine


@pytest.fixture(autouse=True)
def dispose_built_engines() -> Iterator[None]:
    yield
    while _built:
        _built.pop().dispose()


@pytest.mark.usefixtures("zcml")
def test_factory_is_registered_by_configure_zcml() -> None:
    factory = component.getUtility(IFactory, FACTORY_NAME)
    assert factory is SAEngineFromConfigFactory
    assert ISAEngine in factory.getInterfaces()
    engine = component.createObject(FACTORY_NAME, {"dsn": "sqlite://"})
    assert ISAEngine.providedBy(engine)


@pytest.mark.parametrize(
    "call",
    [
        lambda cfg: engine_from_config(cfg),
        lambda cfg: engine_from_config({"SQLAlchemyEngine": cfg}),
        lambda cfg: engine_from_config(SQLAlchemyEngine=cfg),
        lambda cfg: SAEngineFromConfig(cfg),
        lambda cfg: SAEngineFromConfigFactory(cfg),
    ],
    ids=["flat", "wrapped", "keyword", "1.x-name", "factory"],
)
def test_config_shapes(call: Any, tmp_path: pathlib.Path) -> None:
    engine = call({"dsn": f"sqlite:///{tmp_path / 'x.db'}", "kwargs": {"echo": "no"}})
    _built.append(engine)
    assert isinstance(engine, Engine) and engine.url.database.endswith("x.db")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("select 1").scalar() == 1
    engine.dispose()


def test_dsn_may_be_a_url_object() -> None:
    engine = build({}, sa.engine.make_url("sqlite://"))  # type: ignore[arg-type]
    assert engine.url.drivername == "sqlite"


def test_kwargs_are_optional() -> None:
    assert isinstance(build({}), Engine)
    _built.append(engine_from_config({"dsn": "sqlite://", "kwargs": None}))


@pytest.mark.parametrize(
    ("kwargs", "attr", "expected"),
    [
        ({"pool_size": "7"}, lambda e: e.pool.size(), 7),
        ({"max_overflow": " 3 "}, lambda e: e.pool._max_overflow, 3),
        ({"pool_recycle": "-1"}, lambda e: e.pool._recycle, -1),
        ({"pool_timeout": "2.5"}, lambda e: e.pool._timeout, 2.5),
        ({"pool_pre_ping": "false"}, lambda e: e.pool._pre_ping, False),
        ({"pool_pre_ping": "ON"}, lambda e: e.pool._pre_ping, True),
        (
            {"pool_use_lifo": "yes"},
            lambda e: e.pool._timeout is not None and e.pool._pool.use_lifo,
            True,
        ),
        ({"echo": "1"}, lambda e: e.echo, True),
        ({"echo": "off"}, lambda e: e.echo, False),
        ({"echo": "debug"}, lambda e: e.echo, "debug"),
        ({"hide_parameters": "true"}, lambda e: e.hide_parameters, True),
        ({"poolclass": "NullPool"}, lambda e: type(e.pool), NullPool),
        ({"poolclass": "sqlalchemy.pool.NullPool"}, lambda e: type(e.pool), NullPool),
        ({"poolclass": "sqlalchemy.pool:NullPool"}, lambda e: type(e.pool), NullPool),
        ({"poolclass": NullPool}, lambda e: type(e.pool), NullPool),
        ({"query_cache_size": "0"}, lambda e: e._compiled_cache, None),
        (
            {"isolation_level": "read_committed"},
            lambda e: e.dialect._on_connect_isolation_level,
            "READ COMMITTED",
        ),
        (
            {"execution_options": '{"stream_results": true}'},
            lambda e: e.get_execution_options()["stream_results"],
            True,
        ),
        ({"use_native_hstore": "false"}, lambda e: e.dialect.use_native_hstore, False),
        ({"client_encoding": "utf8"}, lambda e: e.dialect.client_encoding, "utf8"),
    ],
)
def test_string_values_are_converted(kwargs: dict[str, Any], attr: Any, expected: Any) -> None:
    assert attr(build(kwargs, SERVER_URL)) == expected


def test_connect_args_json_string_and_sqlite_default_merge() -> None:
    engine = build({"connect_args": '{"timeout": 7}'})
    # the in-memory default still adds check_same_thread, without losing timeout
    seen: dict[str, Any] = {}
    sa.event.listen(engine, "do_connect", lambda d, r, a, kw: seen.update(kw))
    with engine.connect():
        pass
    assert seen == {"timeout": 7, "check_same_thread": False}


def test_memory_sqlite_is_shared_by_all_threads_by_default() -> None:
    engine = build({})
    assert isinstance(engine.pool, StaticPool)
    with engine.begin() as conn:
        conn.exec_driver_sql("create table t (x int)")
        conn.exec_driver_sql("insert into t values (1)")
    seen: list[int] = []

    def read() -> None:
        with engine.connect() as conn:
            seen.append(conn.exec_driver_sql("select x from t").scalar())

    t = threading.Thread(target=read)
    t.start()
    t.join()
    assert seen == [1]


@pytest.mark.parametrize(
    "dsn", ["sqlite:///:memory:", "sqlite+pysqlite://", "sqlite:///file:m?mode=memory&uri=true"]
)
def test_every_memory_sqlite_form_gets_the_default(dsn: str) -> None:
    assert isinstance(build({}, dsn).pool, StaticPool)


def test_defaults_yield_to_the_users_choice() -> None:
    assert type(build({"poolclass": "NullPool"}).pool) is NullPool
    # a pool size with an explicit pool class is the user's choice
    assert type(build({"poolclass": "QueuePool", "pool_size": 2}).pool).__name__ == "QueuePool"
    # without one, each thread would get an empty database of its own: refused
    with pytest.raises(ValueError, match="in-memory SQLite"):
        build({"pool_size": 2})
    assert build({"pool_pre_ping": False}, SERVER_URL).pool._pre_ping is False


def test_sqlite_file_keeps_sqlalchemys_defaults(tmp_path: pathlib.Path) -> None:
    engine = build({}, f"sqlite:///{tmp_path / 'f.db'}")
    assert type(engine.pool) is QueuePool and engine.pool._pre_ping is False


def test_server_database_gets_a_liveness_check(monkeypatch: pytest.MonkeyPatch) -> None:
    from sparc.sa.tx.liveness import (
        begins_on_checkout,
        is_checked,
        trusting_recent_connections,
    )

    engine = build({}, SERVER_URL)
    # SQLAlchemy's pre-ping, with sparc.sa.tx.liveness's additions on this
    # engine's own dialect, and no pool event listener
    assert is_checked(engine) and engine.pool._pre_ping is True
    assert "do_ping" in vars(engine.dialect) and begins_on_checkout(engine)
    assert not engine.pool.dispatch.checkout and not engine.pool.dispatch.checkin
    # a configuration that asks for pool_pre_ping: the same, but a Zope
    # request never skips the ping of a connection returned a moment ago
    own = build({"pool_pre_ping": True}, SERVER_URL)
    assert own.pool._pre_ping is True and begins_on_checkout(own)
    pings: list[object] = []
    monkeypatch.setattr(type(own.dialect), "do_ping", lambda self, conn: pings.append(conn))

    class Connection:  # what the wrapper sees of a DBAPI connection: weak references
        pass

    conn = Connection()
    with trusting_recent_connections():
        for checked in (engine, engine, own, own):
            checked.dialect.do_ping(conn)
    assert len(pings) == 3  # the factory's default trusted its second checkout


# -- bad input --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "error", "words"),
    [
        ("sqlite://", TypeError, ["mapping", "str"]),
        (["sqlite://"], TypeError, ["mapping", "list"]),
        ({"SQLAlchemyEngine": "sqlite://"}, TypeError, ["'SQLAlchemyEngine'", "mapping"]),
        ({"SQLAlchemyEngine": {"dsn": "sqlite://"}, "other": 1}, ValueError, ["'other'"]),
        ({}, ValueError, ["'dsn'"]),
        ({"kwargs": {}}, ValueError, ["'dsn'"]),
        ({"dsn": ""}, ValueError, ["'dsn'"]),
        ({"dsn": 42}, TypeError, ["'dsn'", "int"]),
        ({"dns": "sqlite://"}, ValueError, ["'dns'", "'dsn'"]),
        ({"dsn": "sqlite://", "kwargs": ["echo"]}, TypeError, ["'kwargs'", "list"]),
        (
            {"dsn": "sqlite://", "kwargs": {"pool_size": "five"}},
            ValueError,
            ["'pool_size'", "'five'", "integer"],
        ),
        (
            {"dsn": "sqlite://", "kwargs": {"pool_timeout": "soon"}},
            ValueError,
            ["'pool_timeout'", "number"],
        ),
        (
            {"dsn": "sqlite://", "kwargs": {"pool_pre_ping": "maybe"}},
            ValueError,
            ["'pool_pre_ping'", "'maybe'", "boolean"],
        ),
        ({"dsn": "sqlite://", "kwargs": {"echo": "loud"}}, ValueError, ["'echo'", "'debug'"]),
        (
            {"dsn": "sqlite://", "kwargs": {"poolclass": "NoSuchPool"}},
            ValueError,
            ["'poolclass'", "StaticPool"],
        ),
        (
            {"dsn": "sqlite://", "kwargs": {"poolclass": "builtins.dict"}},
            ValueError,
            ["'poolclass'", "Pool subclass"],
        ),
        (
            {"dsn": "sqlite://", "kwargs": {"connect_args": "[1]"}},
            ValueError,
            ["'connect_args'", "mapping"],
        ),
        (
            {"dsn": "sqlite://", "kwargs": {"isolation_level": "1; drop"}},
            ValueError,
            ["'isolation_level'"],
        ),
        (
            {"dsn": "sqlite://", "kwargs": {"pool_reset_on_return": "sometimes"}},
            ValueError,
            ["'pool_reset_on_return'"],
        ),
        (
            {"dsn": "sqlite://", "kwargs": {"pool_sise": 5}},
            TypeError,
            ["'pool_sise'", "'pool_size'"],
        ),
        (
            {"dsn": "sqlite://", "kwargs": {"poolclass": "StaticPool", "pool_size": 5}},
            TypeError,
            ["'pool_size'", "StaticPool"],
        ),
        ({"dsn": "nosuchdb://u@h/d"}, ValueError, ["'dsn'", "nosuchdb"]),
        ({"dsn": "not a url"}, ValueError, ["'dsn'", "not a valid"]),
    ],
)
def test_bad_config_is_refused_with_a_clear_error(
    config: Any, error: type[Exception], words: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_connection(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a connection was attempted for a bad config")

    monkeypatch.setattr(sa.pool.Pool, "connect", no_connection)
    with pytest.raises(error) as raised:
        engine_from_config(config)
    assert type(raised.value) is error
    for word in words:
        assert word in str(raised.value), (word, str(raised.value))


def test_missing_driver_is_reported_without_the_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "pymysql", None)
    with pytest.raises(ImportError) as raised:
        engine_from_config({"dsn": f"mysql+pymysql://app:{SECRET}@h/db"})
    assert "pymysql" in str(raised.value) and SECRET not in str(raised.value)


@pytest.mark.parametrize(
    "config",
    [
        {"dsn": f"postgresql+psycopg://app:{SECRET}@h:notaport/db"},
        {"dsn": f"postgresql+psycopg://app:{SECRET}@h/db", "kwargs": {"pool_sise": 1}},
        {"dsn": f"postgresql+psycopg://app:{SECRET}@h/db", "kwargs": {"pool_size": "x"}},
        {"dsn": f"nosuch://app:{SECRET}@h/db"},
        {
            "dsn": f"postgresql+psycopg://app:{SECRET}@h/db",
            "kwargs": {"connect_args": ["password", SECRET]},
        },
        {"dsn": f"postgresql+psycopg://app@h/db?password={SECRET}", "kwargs": {"pool_sise": 1}},
    ],
)
def test_no_password_in_errors(config: dict[str, Any]) -> None:
    with pytest.raises((TypeError, ValueError)) as raised:
        engine_from_config(config)
    text = "".join(__import__("traceback").format_exception(raised.value))
    assert SECRET not in text


def test_creation_is_logged_at_info_without_secrets(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        engine_from_config(
            {
                "dsn": f"postgresql+psycopg://app:{SECRET}@db.invalid/app?sslpassword={SECRET}",
                "kwargs": {"connect_args": {"password": SECRET}},
            }
        )
    records = [r for r in caplog.records if r.name == "sparc.sa.engine"]
    assert [r.levelno for r in records] == [logging.INFO]
    assert "postgresql+psycopg://app:***@db.invalid/app" in records[0].getMessage()
    assert SECRET not in caplog.text


@pytest.mark.parametrize("backend", SERVERS)
def test_servers_get_pre_ping_and_work(backend: str) -> None:
    engine = engine_from_config(
        {"dsn": server_dsn(backend), "kwargs": {"pool_size": "2", "max_overflow": "0"}}
    )
    try:
        from sparc.sa.tx.liveness import is_checked

        assert is_checked(engine) and engine.pool.size() == 2
        with engine.connect() as conn:
            assert conn.exec_driver_sql("select 1").scalar() == 1
    finally:
        engine.dispose()


def test_a_missing_driver_names_the_extra_that_installs_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(__import__("sys").modules, "psycopg", None)
    with pytest.raises(ImportError, match=r"pip install 'sparc\.sa\[postgresql\]'"):
        engine_from_config({"dsn": "postgresql+psycopg://app@db.example/app"})
    monkeypatch.setitem(__import__("sys").modules, "pymysql", None)
    with pytest.raises(ImportError, match=r"pip install 'sparc\.sa\[mysql\]'"):
        engine_from_config({"dsn": "mysql+pymysql://app@db.example/app"})
