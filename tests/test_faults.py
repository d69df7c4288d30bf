"""Server-side faults: connections killed in the middle of a block, or while idle in the pool."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from sparc.sa.orm import scoped_transaction

from .conftest import SERVERS, build_models, count_rows, make_engine, names, server_dsn


@pytest.fixture(params=SERVERS)
def server(request: pytest.FixtureRequest) -> Iterator[tuple[Engine, Engine, Any, Any]]:
    """(engine under test, admin engine for the kills, models, manager)."""
    dsn = server_dsn(request.param)
    engine = make_engine(dsn, pool_size=2, max_overflow=0)
    admin = sa.create_engine(dsn, poolclass=sa.pool.NullPool)
    ns = build_models()
    ns.Base.metadata.create_all(engine)
    yield engine, admin, ns, scoped_transaction(engine, ns.Base)
    ns.Base.metadata.drop_all(engine)
    assert engine.pool.checkedout() == 0
    engine.dispose()


def backend_id(engine: Engine, conn: Any) -> int:
    sql = (
        "select pg_backend_pid()"
        if engine.dialect.name == "postgresql"
        else "select connection_id()"
    )
    return int(conn.execute(sa.text(sql)).scalar())


def kill(admin: Engine, target: int) -> None:
    with admin.connect() as conn:
        if admin.dialect.name == "postgresql":
            assert conn.execute(sa.text("select pg_terminate_backend(:p)"), {"p": target}).scalar()
        else:
            conn.exec_driver_sql(f"KILL CONNECTION {int(target)}")


def test_connection_killed_in_the_middle_of_a_block(
    server: tuple[Engine, Engine, Any, Any],
) -> None:
    engine, admin, ns, transaction = server
    with pytest.raises(sa.exc.DBAPIError) as raised, transaction():
        transaction.session.add(ns.Item(name="lost"))
        transaction.session.flush()
        kill(admin, backend_id(engine, transaction.session))
        transaction.session.add(ns.Item(name="lost-too"))
        transaction.session.flush()  # the first statement after the kill
    assert isinstance(raised.value, (sa.exc.OperationalError, sa.exc.InterfaceError))
    assert raised.value.connection_invalidated
    assert engine.pool.checkedout() == 0
    assert count_rows(engine, ns.Item) == 0  # nothing of the block was saved
    with transaction():  # the pool recovered: the next block works
        transaction.session.add(ns.Item(name="next"))
    assert names(engine, ns.Item) == ["next"]


def test_connections_killed_while_idle_are_never_seen(
    server: tuple[Engine, Engine, Any, Any],
) -> None:
    engine, admin, ns, transaction = server
    # fill the pool with two idle connections, then kill both from outside
    with engine.connect() as c1, engine.connect() as c2:
        victims = [backend_id(engine, c1), backend_id(engine, c2)]
    assert engine.pool.checkedin() == 2
    for victim in victims:
        kill(admin, victim)
    for i in range(3):  # every block works, on a replacement connection
        with transaction():
            transaction.session.add(ns.Item(name=f"after-{i}"))
            assert backend_id(engine, transaction.session) not in victims
    assert names(engine, ns.Item) == ["after-0", "after-1", "after-2"]


def test_without_pre_ping_the_idle_kill_would_surface(
    server: tuple[Engine, Engine, Any, Any],
) -> None:
    """The control for the test above: the same kill, with pre-ping off,
    breaks the next block. Pre-ping, the factory's default, is what saves it."""
    engine, admin, ns, _ = server
    bare = make_engine(
        str(engine.url.render_as_string(hide_password=False)),
        pool_size=1,
        max_overflow=0,
        pool_pre_ping=False,
    )
    try:
        transaction = scoped_transaction(bare, ns.Base)
        with bare.connect() as conn:
            victim = backend_id(bare, conn)
        kill(admin, victim)
        with pytest.raises(sa.exc.DBAPIError), transaction():
            transaction.session.add(ns.Item(name="x"))
        assert bare.pool.checkedout() == 0
    finally:
        bare.dispose()


def test_the_blocks_own_error_wins_when_the_connection_is_gone(
    server: tuple[Engine, Engine, Any, Any],
) -> None:
    """The rollback fails on the dead connection; the block's error propagates."""
    engine, admin, ns, transaction = server

    class Stop(Exception):
        pass

    with pytest.raises(Stop), transaction():
        transaction.session.add(ns.Item(name="lost"))
        transaction.session.flush()
        kill(admin, backend_id(engine, transaction.session))
        raise Stop
    assert engine.pool.checkedout() == 0
    assert count_rows(engine, ns.Item) == 0
    with transaction():
        transaction.session.add(ns.Item(name="next"))
    assert names(engine, ns.Item) == ["next"]


def test_a_zope_request_trusts_only_a_connection_a_request_took_moments_ago(
    server: tuple[Engine, Engine, Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The liveness shortcut of joined transactions, on the engine alone: a
    connection a joined checkout took under a second ago is handed over
    unpinged (a kill in between surfaces, and Zope's publisher retries);
    after the window, or outside a joined transaction, it is pinged."""
    from sparc.sa.tx import liveness

    engine, admin, _, _ = server
    one = make_engine(
        str(engine.url.render_as_string(hide_password=False)), pool_size=1, max_overflow=0
    )
    try:

        def take_and_kill() -> int:
            # twice: a connection fresh from connect() is never pinged, so
            # the first take of a new one notes nothing
            for _ in range(2):
                with liveness.trusting_recent_connections(), one.connect() as conn:
                    victim = backend_id(one, conn)
            kill(admin, victim)
            return victim

        take_and_kill()
        with (  # taken again at once: trusted, and met dead
            pytest.raises(sa.exc.DBAPIError) as raised,
            liveness.trusting_recent_connections(),
            one.connect() as conn,
        ):
            conn.exec_driver_sql("select 1")
        assert raised.value.connection_invalidated

        victim = take_and_kill()
        with one.connect() as conn:  # outside a joined transaction: pinged
            assert backend_id(one, conn) != victim

        monkeypatch.setattr(liveness, "RECENT", 0.0)  # the window has passed
        victim = take_and_kill()
        with liveness.trusting_recent_connections(), one.connect() as conn:
            assert backend_id(one, conn) != victim
        assert one.pool.checkedout() == 0
    finally:
        one.dispose()
