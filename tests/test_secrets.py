"""No password reaches a message, a repr or a log record, wherever it sits.

A property test: random passwords in every position a URL or a configuration
can hold one, through the factory, the manager and their logs.
"""

from __future__ import annotations

import logging
import urllib.parse
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import URL

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from sparc.sa.aio import AsyncScopedTransaction  # noqa: E402
from sparc.sa.engine import engine_from_config  # noqa: E402
from sparc.sa.options import hide_dsn  # noqa: E402
from sparc.sa.orm import ThreadLocalSASessionTransaction  # noqa: E402

# Passwords long enough not to occur in a message by chance, from every
# printable character a user might type, the URL's own delimiters included.
PASSWORDS = (
    st.text(
        alphabet=st.characters(min_codepoint=32, max_codepoint=126),
        min_size=8,
        max_size=24,
    )
    .filter(lambda p: len(set(p)) > 3 and p.strip() == p)
    .map(lambda p: f"Zq9!{p}")
)
# (the prefix keeps a password from being a word that messages contain anyway)


def positions(password: str) -> list[Any]:
    quoted = urllib.parse.quote(password, safe="")
    return [
        f"postgresql+psycopg://app:{quoted}@db.example/app",
        f"postgresql+psycopg://app:{password}@db.example/app",  # not encoded
        f"postgresql+psycopg://app@db.example/app?password={quoted}",
        f"postgresql+psycopg://app@db.example/app?sslpassword={quoted}",
        f"mysql+pymysql://app@db.example/app?pwd={quoted}",
        f"mysql+pymysql://app@db.example/app?password={quoted}&charset=utf8mb4",
        f"postgresql+psycopg://app@db.example/app?application_name=x&sslpassword={quoted}"
        f"&password={quoted}",
        f"postgresql+asyncpg://app@db.example/app?password={quoted}",
        f"postgresql+psycopg://app@db.example/app?api_key={quoted}&auth_token={quoted}",
        f"mysql+pymysql://app:{password}@db.example:3306/app?charset=utf8mb4",
        URL.create("postgresql+psycopg", "app", password, "db.example", None, "app"),
        URL.create(
            "postgresql+psycopg", "app", None, "db.example", None, "app", {"password": password}
        ),
        {
            "dsn": "postgresql+psycopg://app@db.example/app",
            "kwargs": {"connect_args": {"password": password}},
        },
        {"dsn": "postgresql+psycopg://app@db.example/app", "kwargs": {"pool_sise": password}},
        {"dsn": f"postgresql+psycopg://app:{quoted}@db.example/app", "kwargs": {"pool_sise": 5}},
        {
            "dsn": f"postgresql+psycopg://app:{quoted}@db.example/app",
            "junk": f"postgresql://u:{quoted}@h/d",
        },
    ]


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.texts.append(record.getMessage())


def leaks(password: str, text: str) -> bool:
    quoted = urllib.parse.quote(password, safe="")
    return password in text or quoted in text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(password=PASSWORDS)
@example(password="s3cr'et pass")
@example(password='s3"cr@t#pa/ss')
@example(password="p@ssw0rd@@")
@example(password="hunter2?x=1&password=y")
def test_no_password_in_any_error_repr_or_log(password: str) -> None:
    handler = Records()
    root = logging.getLogger("sparc.sa")
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.DEBUG)
    alchemy = logging.getLogger("sqlalchemy")
    alchemy.addHandler(handler)
    alchemy_level = alchemy.level
    alchemy.setLevel(logging.DEBUG)
    try:
        for position in positions(password):
            config = position if isinstance(position, dict) else {"dsn": position}
            shown: list[str] = []
            try:
                engine = engine_from_config(config)
            except (TypeError, ValueError, ImportError) as error:
                shown.append(str(error))
                shown.append(repr(error))
            else:
                base = sa.orm.declarative_base()
                sync = getattr(engine, "sync_engine", engine)
                shown += [repr(engine), repr(sync), str(sync.url), repr(sync.url)]
                shown += [repr(sync.pool), repr(sync.dialect), hide_dsn(sync.url)]
                if sync is engine:
                    manager: Any = ThreadLocalSASessionTransaction(engine, base)
                else:
                    manager = AsyncScopedTransaction(engine, base)
                shown.append(repr(manager))
                shown.append(str(manager))
                sync.dispose()
            for text in shown + handler.texts:
                assert not leaks(password, text), (position, text)
            handler.texts.clear()
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        alchemy.removeHandler(handler)
        alchemy.setLevel(alchemy_level)


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql+psycopg://app@db.example/app?password=Zq9!s3cret&sslpassword=Zq9!k3y",
        "postgresql+asyncpg://app@db.example/app?password=Zq9!s3cret",
        "mysql+pymysql://app@db.example/app?password=Zq9!s3cret&charset=utf8mb4",
    ],
)
def test_a_query_secret_is_hidden_yet_reaches_the_driver(dsn: str) -> None:
    engine: Any = engine_from_config({"dsn": dsn})
    sync = getattr(engine, "sync_engine", engine)
    try:
        assert "Zq9!" not in repr(sync) and "Zq9!" not in str(sync.url)
        _args, kwargs = sync.dialect.create_connect_args(sync.url)
        assert kwargs["password"] == "Zq9!s3cret"  # what the driver's connect() gets
        shown = sync.url.render_as_string(hide_password=False)  # asked for: everything
        assert "Zq9%21s3cret" in shown
    finally:
        sync.dispose()


@pytest.mark.parametrize("backend", ["postgresql", "mysql"])
def test_a_query_password_still_connects(backend: str) -> None:
    """A user with a password, given as ``?password=``: the server lets it in."""
    import uuid

    from .conftest import server_dsn

    admin_url = sa.make_url(server_dsn(backend))
    user, password = f"sparc_pw_{uuid.uuid4().hex[:8]}", f"Zq9-{uuid.uuid4().hex}"
    admin = sa.create_engine(admin_url)
    if backend == "postgresql":
        create = [f"CREATE ROLE {user} LOGIN PASSWORD '{password}'"]
        drop = [f"DROP ROLE {user}"]
    else:
        create = [
            f"CREATE USER '{user}'@'%%' IDENTIFIED BY '{password}'",
            f"GRANT SELECT ON `{admin_url.database}`.* TO '{user}'@'%%'",
        ]
        drop = [f"DROP USER '{user}'@'%%'"]
    with admin.begin() as conn:
        for statement in create:
            conn.exec_driver_sql(statement)
    url = admin_url.set(username=user, password=None).update_query_dict({"password": password})
    engine = engine_from_config({"dsn": url.render_as_string(hide_password=False)})
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT 1").scalar() == 1
        assert password not in repr(engine) and password not in str(engine.url)
        if backend == "mysql":  # and a wrong one is refused: the password is what let it in
            wrong = url.update_query_dict({"password": "wrong"})
            refused = engine_from_config({"dsn": wrong.render_as_string(hide_password=False)})
            with pytest.raises(sa.exc.OperationalError):
                refused.connect().close()
            refused.dispose()
    finally:
        engine.dispose()
        with admin.begin() as conn:
            for statement in drop:
                conn.exec_driver_sql(statement)
        admin.dispose()
