"""MariaDB replicas: GTID positions, read-your-writes with replication
stopped, lagging or down, the read-only mode of a read-only block, and
faults tried for real. The server cases run against the MariaDB primary and
replica that ``.ci/mariadb-replica.sh`` starts (``TEST_MYSQL_PRIMARY_DSN``,
``TEST_MYSQL_REPLICA_DSN``, and ``TEST_MYSQL_REPLICA_ADMIN_DSN`` for the
faults); the DDL cases also on ``TEST_MYSQL_DSN``'s server, without replicas."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url

from sparc.sa.engine import engine_from_config
from sparc.sa.exceptions import ReadOnlyTransactionError
from sparc.sa.orm import ThreadLocalSASessionTransaction
from sparc.sa.replicas import commit_token, parse_token, replica_set, replicas
from tests.conftest import build_models

SCRIPT = Path(__file__).resolve().parent.parent / ".ci" / "mariadb-replica.sh"


# -- positions and tokens (no server needed) -------------------------------------------


def test_gtid_positions_compare_per_domain() -> None:
    from sparc.sa.replicas.gtid import Gtid

    need = Gtid.parse("0-1-10,1-1-5")
    assert str(need) == "0-1-10,1-1-5"
    assert Gtid.parse("0-1-10,1-2-5").covers(need)  # the server id does not order
    assert Gtid.parse("1-1-7, 0-1-12").covers(need)
    assert not Gtid.parse("0-1-99").covers(need)  # domain 1 missing: not reached
    assert not Gtid.parse("0-1-9,1-1-5").covers(need)
    assert Gtid.parse("").covers(Gtid())  # nothing to wait for
    assert not Gtid.parse("0-1-99").covers(Gtid(unknown=True))
    assert str(Gtid.parse("0-1-3,1-1-9").merge(Gtid.parse("0-2-4,2-1-1"))) == "0-2-4,1-1-9,2-1-1"
    with pytest.raises(ValueError, match=r"'domain-server-seq'.*got '0-1'"):
        Gtid.parse("0-1")


def test_mariadb_tokens_carry_a_check() -> None:
    from sparc.sa.replicas.gtid import Gtid, format_token
    from sparc.sa.replicas.gtid import parse_token as parse_my_token

    token = format_token(Gtid.parse("0-1-5425458,1-1-7"))
    assert token is not None and token.startswith("my:0-1-5425458,1-1-7.")
    assert parse_token(token) == Gtid.parse("0-1-5425458,1-1-7")
    cut = token.replace("5425458", "542545")
    with pytest.raises(ValueError, match="check does not match"):
        parse_token(cut)
    with pytest.raises(ValueError, match=r"like 'my:0-1-25\.1f2e3d4c'"):
        parse_my_token("my:0-1-5")
    assert format_token(Gtid()) is None and format_token(Gtid(unknown=True)) is None
    from sparc.sa.replicas.gtid import need

    mine = Gtid.parse("0-1-3")
    assert need(True, mine, Gtid.parse("0-1-2,1-1-1")) == Gtid.parse("0-1-3,1-1-1")
    assert need(True, 0, 0) == Gtid()
    with pytest.raises(ValueError, match=r"PostgreSQL commit token.*this engine is MariaDB"):
        need(True, mine, parse_token("pg:0/3000148"))
    with pytest.raises(ValueError, match=r"MariaDB commit token.*this engine is not MariaDB"):
        need(False, 0, mine)


# -- DDL in a read-only block, on a MariaDB primary without replicas -------------------


def mysql_dsns() -> list[str]:
    found = [
        os.environ[name]
        for name in ("TEST_MYSQL_DSN", "TEST_MYSQL_PRIMARY_DSN")
        if os.environ.get(name)
    ]
    return found


@pytest.mark.parametrize("which", ["TEST_MYSQL_DSN", "pair"])
def test_ddl_in_readonly_block_is_refused_before_it_runs(which: str) -> None:
    """DROP, TRUNCATE, CREATE, ALTER and RENAME through the connection of a
    read-only block raise ReadOnlyTransactionError, and the table and its
    rows are still there; the block's snapshot is intact (a second read in
    it runs), and the connections go back to the pool writable."""
    if which == "pair":
        primary, replica = pair_dsns()
        config: dict[str, Any] = {"dsn": primary, "replicas": [replica], "replica_wait": "2"}
    else:
        dsn = os.environ.get("TEST_MYSQL_DSN")
        if not dsn:
            pytest.skip("TEST_MYSQL_DSN is not set, so there is no mysql server to test against")
        config = {"dsn": dsn}
    engine = engine_from_config(config)
    models = build_models()
    models.Base.metadata.create_all(engine)
    tx = ThreadLocalSASessionTransaction(engine, models.Base)
    Item = models.Item
    table = Item.__table__.name
    try:
        with tx() as session:
            session.add(Item(name="kept"))
        for statement in (
            f"DROP TABLE {table}",
            f"TRUNCATE TABLE {table}",
            f"/* a comment first */ truncate {table}",
            f"CREATE TABLE {table}_x (id INT)",
            f"ALTER TABLE {table} ADD COLUMN extra INT",
            f"RENAME TABLE {table} TO {table}_y",
        ):
            with (
                pytest.raises(ReadOnlyTransactionError, match="refused"),
                tx(readonly=True) as session,
            ):
                assert session.scalars(sa.select(Item.name)).all() == ["kept"]
                session.connection().exec_driver_sql(statement)
            with tx(readonly=True) as session:
                assert session.scalars(sa.select(Item.name)).all() == ["kept"]
        # What the guard does not know, the READ ONLY session mode refuses,
        # even after a COMMIT sent by hand.
        with pytest.raises(ReadOnlyTransactionError), tx(readonly=True) as session:
            conn = session.connection()
            conn.exec_driver_sql("COMMIT")
            conn.exec_driver_sql(f"DELETE FROM {table}")
        with tx() as session:  # writable again, on the same pool
            session.add(Item(name="after"))
        with engine.connect() as conn:
            names = conn.exec_driver_sql(f"SELECT name FROM {table} ORDER BY id").scalars().all()
            assert names == ["kept", "after"]
            assert conn.exec_driver_sql("SELECT @@session.tx_read_only").scalar() == 0
            assert conn.exec_driver_sql(f"SHOW TABLES LIKE '{table}_x'").first() is None
    finally:
        models.Base.metadata.drop_all(engine)
        for each in (engine, *replicas(engine)):
            assert each.pool.checkedout() == 0
            each.dispose()


# -- the pair --------------------------------------------------------------------------


def pair_dsns() -> tuple[str, str]:
    primary = os.environ.get("TEST_MYSQL_PRIMARY_DSN")
    replica = os.environ.get("TEST_MYSQL_REPLICA_DSN")
    if not primary or not replica:
        pytest.skip(
            "TEST_MYSQL_PRIMARY_DSN and TEST_MYSQL_REPLICA_DSN are not both set, so there "
            "is no MariaDB replica to test against (.ci/mariadb-replica.sh makes one)"
        )
    return primary, replica


def admin_dsn() -> str:
    dsn = os.environ.get("TEST_MYSQL_REPLICA_ADMIN_DSN")
    if not dsn:
        pytest.skip(
            "TEST_MYSQL_REPLICA_ADMIN_DSN is not set, so the replica's replication cannot "
            "be stopped (.ci/mariadb-replica.sh prints it)"
        )
    return dsn


def admin(*statements: str) -> list[Any]:
    """Run *statements* on the replica as its administrator."""
    engine = sa.create_engine(admin_dsn(), isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            results = (conn.exec_driver_sql(statement) for statement in statements)
            return [result.scalar() if result.returns_rows else None for result in results]
    finally:
        engine.dispose()


def primary_position(engine: Engine) -> str:
    with engine.connect() as conn:
        return str(conn.exec_driver_sql("SELECT @@gtid_binlog_pos").scalar())


def wait_caught_up(engine: Engine, timeout: float = 30) -> None:
    (reached,) = admin(f"SELECT MASTER_GTID_WAIT('{primary_position(engine)}', {timeout})")
    assert reached == 0, "the replica did not catch up"


def replication(on: bool, thread: str = "SQL_THREAD") -> None:
    admin(f"{'START' if on else 'STOP'} SLAVE {thread}")


@pytest.fixture
def pair() -> Iterator[SimpleNamespace]:
    primary_dsn, replica_dsn = pair_dsns()
    admin_dsn()
    replication(True, "")
    engine = engine_from_config(
        {"dsn": primary_dsn, "replicas": [replica_dsn], "replica_wait": "0.3"}
    )
    assert isinstance(engine, Engine)
    models = build_models()
    models.Base.metadata.create_all(engine)
    wait_caught_up(engine)
    tx = ThreadLocalSASessionTransaction(engine, models.Base)
    yield SimpleNamespace(
        engine=engine, replica=replicas(engine)[0], replica_dsn=replica_dsn, models=models, tx=tx
    )
    replication(True, "")
    models.Base.metadata.drop_all(engine)
    for each in (engine, *replicas(engine)):
        assert each.pool.checkedout() == 0
        each.dispose()


def server_id(session: Any) -> int:
    return int(session.execute(sa.text("SELECT @@server_id")).scalar())


def in_thread(fn: Any) -> Any:
    """*fn*'s result in a new thread: a scope that wrote nothing."""
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join()
    return out[0]


def test_reads_see_own_writes_with_replication_stopped(pair: SimpleNamespace) -> None:
    tx, Item = pair.tx, pair.models.Item
    rs = replica_set(pair.engine)
    assert rs is not None

    def read() -> tuple[int, list[str]]:
        with tx(readonly=True) as session:
            return server_id(session), session.scalars(sa.select(Item.name)).all()

    replication(False)
    try:
        with tx() as session:
            session.add(Item(name="mine"))
        token = tx.commit_token
        assert token is not None and token.startswith("my:0-1-")
        assert read() == (1, ["mine"])  # on the primary, after replica_wait
        assert in_thread(read) == (2, [])  # a scope that did not write: the replica
        assert in_thread(lambda: ReadAfter(tx, token, Item)()) == (1, ["mine"])
        assert rs.stats["fallbacks"] >= 2
    finally:
        replication(True)
    wait_caught_up(pair.engine)
    assert read() == (2, ["mine"])
    assert in_thread(lambda: ReadAfter(tx, token, Item)()) == (2, ["mine"])


class ReadAfter:
    def __init__(self, tx: Any, token: str, Item: Any) -> None:
        self.tx, self.token, self.Item = tx, token, Item

    def __call__(self) -> tuple[int, list[str]]:
        with self.tx(readonly=True, after=self.token) as session:
            return server_id(session), session.scalars(sa.select(self.Item.name)).all()


def test_block_waits_for_the_replica_before_its_first_read(pair: SimpleNamespace) -> None:
    """Replication resumes while the block waits (MASTER_GTID_WAIT): the block
    runs on the replica and sees the write, so the wait came before the
    block's snapshot."""
    tx, Item = pair.tx, pair.models.Item
    rs = replica_set(pair.engine)
    assert rs is not None
    rs.wait = 10.0
    replication(False)
    with tx() as session:
        session.add(Item(name="late"))
    timer = threading.Timer(0.5, replication, (True,))
    timer.start()
    started = time.monotonic()
    try:
        with tx(readonly=True) as session:
            assert server_id(session) == 2
            assert session.scalars(sa.select(Item.name)).all() == ["late"]
    finally:
        timer.join()
    assert 0.4 < time.monotonic() - started < 9
    assert rs.stats["waits"] >= 1 and rs.stats["fallbacks"] == 0


def test_write_refused_on_the_replica_is_not_a_lost_replica(pair: SimpleNamespace) -> None:
    tx, Item = pair.tx, pair.models.Item
    table = Item.__table__.name
    with pytest.raises(ReadOnlyTransactionError, match="refused"), tx(readonly=True) as session:
        assert server_id(session) == 2
        session.connection().exec_driver_sql(f"INSERT INTO {table} (name) VALUES ('x')")
    rs = replica_set(pair.engine)
    assert rs is not None and rs.describe()[0]["state"] == "up"
    with tx(readonly=True) as session:
        assert server_id(session) == 2


def test_a_writable_server_is_not_taken_for_a_replica(caplog: pytest.LogCaptureFixture) -> None:
    """The primary named as its own replica (read_only=0, as a promoted
    replica would be): no read-only block runs there, with a warning."""
    primary, _ = pair_dsns()
    engine = engine_from_config({"dsn": primary, "replicas": [primary]})
    tx = ThreadLocalSASessionTransaction(engine, build_models().Base)
    try:
        with caplog.at_level(logging.WARNING, logger="sparc.sa.replicas"):
            for _ in range(3):
                with tx(readonly=True) as session:
                    session.execute(sa.text("SELECT 1"))
        rs = replica_set(engine)
        assert rs is not None
        assert rs.stats["replica"] == 0 and rs.stats["primary"] == 3
        assert "read_only is off" in rs.describe()[0]["reason"]
        assert sum("read_only is off" in r.getMessage() for r in caplog.records) == 1
    finally:
        for each in (engine, *replicas(engine)):
            assert each.pool.checkedout() == 0
            each.dispose()


def test_refusing_replica_is_skipped_without_an_error() -> None:
    """A replica that refuses connections: every read-only block runs, on the
    primary, from the first one on."""
    primary, replica = pair_dsns()
    dead = make_url(replica).set(port=1).render_as_string(False)
    engine = engine_from_config({"dsn": primary, "replicas": [dead]})
    models = build_models()
    tx = ThreadLocalSASessionTransaction(engine, models.Base)
    try:
        for _ in range(3):
            assert in_thread(lambda: _read_server(tx)) == 1
        rs = replica_set(engine)
        assert rs is not None and rs.describe()[0]["state"] == "down"
    finally:
        for each in (engine, *replicas(engine)):
            assert each.pool.checkedout() == 0
            each.dispose()


def _read_server(tx: Any) -> int:
    with tx(readonly=True) as session:
        return server_id(session)


def test_max_lag_skips_a_replica_whose_replication_stopped(pair: SimpleNamespace) -> None:
    rs = replica_set(pair.engine)
    assert rs is not None
    rs.max_lag = 5.0
    assert in_thread(lambda: _read_server(pair.tx)) == 2
    assert rs.describe()[0]["lag"] == 0
    replication(False)
    try:
        time.sleep(1.1)  # the next block measures again
        assert in_thread(lambda: _read_server(pair.tx)) == 1
        assert rs.describe()[0] | {"name": ""} == {
            "name": "",
            "state": "lagging",
            "lag": 0.0,
            "reason": "replication is stopped",
        }
    finally:
        replication(True)
    time.sleep(1.1)
    assert in_thread(lambda: _read_server(pair.tx)) == 2


def test_check_lists_mariadb_replicas(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sparc.sa.check import main

    primary, replica = pair_dsns()
    dead = make_url(replica).set(port=1).render_as_string(False)
    config = tmp_path / "site.yaml"
    config.write_text(f"dsn: {primary}\nreplicas:\n  - {replica}\n  - {dead}\n")
    assert main(["check", str(config)]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.lstrip().startswith("replica ")]
    assert len(lines) == 2, out
    assert ":3317/" in lines[0] and ": up, replay lag 0.00 s" in lines[0]
    assert ":1/" in lines[1] and ": down (" in lines[1]


def test_zcml_engine_with_mariadb_replicas() -> None:
    from zope import component
    from zope.configuration import xmlconfig

    import sparc.sa
    from sparc.sa.interfaces import ISAEngine
    from sparc.sa.zcml import NAMESPACE

    context = xmlconfig.file("configure.zcml", package=sparc.sa)
    xmlconfig.string(
        f"""<configure xmlns="http://namespaces.zope.org/zope" xmlns:sa="{NAMESPACE}">
           <sa:engine name="mshop" dsn="mysql+pymysql://app@primary/app"
                      replicas="mysql+pymysql://app@r1/app" replica_wait="0.1" />
           </configure>""",
        context=context,
    )
    engine = component.getUtility(ISAEngine, "mshop")
    rs = replica_set(engine)
    assert rs is not None and rs.mariadb and rs.wait == 0.1
    assert [r.url.host for r in replicas(engine)] == ["r1"]
    with pytest.raises(ValueError, match="MariaDB database like its primary"):
        engine_from_config(
            {"dsn": "mysql+pymysql://app@p/app", "replicas": ["postgresql+psycopg://app@r/app"]}
        )


def test_asyncmy_reads_own_writes_with_replication_stopped(pair: SimpleNamespace) -> None:
    pytest.importorskip("asyncmy")
    from sparc.sa.aio import AsyncScopedTransaction

    def to_async(dsn: str) -> str:
        return make_url(dsn).set(drivername="mysql+asyncmy").render_as_string(False)

    primary, replica = pair_dsns()
    dead = make_url(replica).set(port=1).render_as_string(False)
    Item = pair.models.Item

    async def main() -> None:
        engine: Any = engine_from_config(
            {"dsn": to_async(primary), "replicas": [to_async(replica)], "replica_wait": "0.3"}
        )
        refusing: Any = engine_from_config({"dsn": to_async(primary), "replicas": [to_async(dead)]})
        atx = AsyncScopedTransaction(engine, pair.models.Base)
        try:

            async def read(after: str | None = None) -> tuple[int, list[str]]:
                async with atx(readonly=True, after=after) as session:
                    sid = (await session.execute(sa.text("SELECT @@server_id"))).scalar()
                    return int(sid), list((await session.scalars(sa.select(Item.name))).all())

            await asyncio.to_thread(replication, False)
            async with atx() as session:
                session.add(Item(name="async"))
            token = commit_token(engine)
            assert token is not None and token.startswith("my:")
            assert await read() == (1, ["async"])
            assert await asyncio.create_task(_fresh(read)) == (2, [])
            assert await asyncio.create_task(_fresh(read, token)) == (1, ["async"])
            with pytest.raises(ReadOnlyTransactionError, match="refused"):
                async with atx(readonly=True) as session:
                    conn = await session.connection()
                    await conn.exec_driver_sql(f"TRUNCATE TABLE {Item.__table__.name}")
            await asyncio.to_thread(replication, True)
            await asyncio.to_thread(wait_caught_up, pair.engine)
            assert await read() == (2, ["async"])
            ratx = AsyncScopedTransaction(refusing, pair.models.Base)
            async with ratx(readonly=True) as session:
                assert (await session.execute(sa.text("SELECT @@server_id"))).scalar() == 1
        finally:
            await asyncio.to_thread(replication, True)
            for each in (engine, *replicas(engine), refusing, *replicas(refusing)):
                assert each.sync_engine.pool.checkedout() == 0
                await each.dispose()

    asyncio.run(main())


async def _fresh(read: Any, after: str | None = None) -> Any:
    """*read* in a task with a context of its own: a scope that wrote nothing."""
    import contextvars

    return await asyncio.create_task(read(after), context=contextvars.Context())


# -- faults tried for real -------------------------------------------------------------


def load(pair: SimpleNamespace, fault: Any, threads: int = 6) -> dict[str, int]:
    """*threads* writers that each write a row, then read their rows in a
    read-only block (``run(readonly=True)``), while *fault* runs: every read
    counted, none may fail or miss one of its own rows."""
    tx, Item = pair.tx, pair.models.Item
    stop = threading.Event()
    counts = {"reads": 0, "stale": 0, "on_replica": 0}
    failures: list[BaseException] = []
    lock = threading.Lock()

    def worker(me: int) -> None:
        written = 0
        while not stop.is_set():
            try:
                with tx() as session:
                    session.add(Item(name=f"w{me}"))
                written += 1

                def mine(session: Any) -> tuple[int, int]:
                    seen = session.scalar(
                        sa.select(sa.func.count()).select_from(Item).where(Item.name == f"w{me}")
                    )
                    return int(seen), server_id(session)

                seen, where = tx.run(mine, readonly=True)
            except BaseException as error:
                failures.append(error)
                return
            with lock:
                counts["reads"] += 1
                counts["stale"] += seen < written
                counts["on_replica"] += where == 2

    workers = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for each in workers:
        each.start()
    try:
        fault()
    finally:
        stop.set()
        for each in workers:
            each.join()
    assert failures == [], failures[:3]
    assert counts["stale"] == 0 and counts["reads"] > 50, counts
    for each in (pair.engine, *replicas(pair.engine)):
        assert each.pool.checkedout() == 0
    return counts


def test_replication_stopped_mid_load(pair: SimpleNamespace) -> None:
    def fault() -> None:
        time.sleep(0.5)
        replication(False)
        time.sleep(1.5)
        replication(True)
        time.sleep(1.0)

    counts = load(pair, fault)
    rs = replica_set(pair.engine)
    assert rs is not None and rs.stats["fallbacks"] > 0 and counts["on_replica"] > 0
    print(f"\n{counts} {rs.stats}")


def test_replica_server_stopped_mid_load(pair: SimpleNamespace) -> None:
    if os.geteuid() != 0 or not SCRIPT.exists():
        pytest.skip("starting the replica again needs root and .ci/mariadb-replica.sh")
    rs = replica_set(pair.engine)
    assert rs is not None

    def fault() -> None:
        time.sleep(0.5)
        with contextlib.suppress(sa.exc.DBAPIError):  # the server went before its answer
            admin("SHUTDOWN WAIT FOR ALL SLAVES")
        time.sleep(1.5)
        assert rs.describe()[0]["state"] == "down"
        subprocess.run([str(SCRIPT)], check=True, capture_output=True)
        back = time.monotonic()
        while rs.describe()[0]["state"] != "up":
            assert time.monotonic() - back < 15, "the replica was not used again"
            time.sleep(0.1)
        served = rs.stats["replica"]
        time.sleep(0.5)
        assert rs.stats["replica"] > served

    try:
        counts = load(pair, fault)
    finally:
        subprocess.run([str(SCRIPT)], check=False, capture_output=True)
    print(f"\n{counts} {rs.stats}")


def test_connection_killed_mid_block(pair: SimpleNamespace) -> None:
    """The replica connection of a read-only block is killed (KILL of its own
    id) between two reads: run(readonly=True) reads again elsewhere, every
    read counted, no connection left out."""
    tx, Item = pair.tx, pair.models.Item
    with tx() as session:
        session.add(Item(name="k"))
    wait_caught_up(pair.engine)
    rs = replica_set(pair.engine)
    assert rs is not None
    attempts: list[int] = []

    def read(session: Any) -> tuple[int, list[str]]:
        where = server_id(session)
        attempts.append(where)
        if len(attempts) == 1:
            own = session.execute(sa.text("SELECT CONNECTION_ID()")).scalar()
            admin(f"KILL {own}")
        return where, session.scalars(sa.select(Item.name)).all()

    assert tx.run(read, readonly=True) == (1, ["k"])
    assert attempts == [2, 1]
    assert rs.describe()[0]["state"] == "down"
    time.sleep(0.6)  # the replica is tried again after its back-off
    assert _read_server(tx) == 2 and rs.describe()[0]["state"] == "up"
    for each in (pair.engine, *replicas(pair.engine)):
        assert each.pool.checkedout() == 0


def test_start_transaction_read_only_is_not_a_write(pair: SimpleNamespace) -> None:
    """A transaction that only began READ ONLY and read wrote nothing: its
    scope has no position to wait for."""

    def begin_read_only_then_write(write: bool) -> str | None:
        with pair.engine.connect() as conn:
            conn.exec_driver_sql("START TRANSACTION READ ONLY")
            conn.exec_driver_sql("SELECT 1")
            conn.commit()
            if write:
                conn.execute(sa.insert(pair.models.Item.__table__), {"name": "w"})
                conn.commit()
        return commit_token(pair.engine)

    assert in_thread(lambda: begin_read_only_then_write(False)) is None
    assert in_thread(lambda: begin_read_only_then_write(True)) is not None


# -- interruptions ---------------------------------------------------------------------


def _interrupt(how: str) -> None:
    """A KeyboardInterrupt in the main thread: flagged (``interrupt_main``,
    raised once the blocked call returns) or a real SIGINT, which breaks
    the driver's blocking read at once."""
    import _thread
    import signal

    if how == "signal":
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)
    else:
        _thread.interrupt_main()


@pytest.mark.parametrize("how", ["signal", "interrupt_main"])
@pytest.mark.parametrize("after", [0.05, 0.3])
def test_keyboard_interrupt_during_master_gtid_wait_leaves_the_scope_as_before(
    pair: SimpleNamespace, how: str, after: float
) -> None:
    """A KeyboardInterrupt while the block waits in MASTER_GTID_WAIT: no
    connection stays checked out, the thread's later writing blocks work and
    its read-only blocks see its own writes."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("KeyboardInterrupt reaches the main thread only")
    tx, Item = pair.tx, pair.models.Item
    rs = replica_set(pair.engine)
    assert rs is not None
    rs.wait = 1.5
    replication(False)
    try:
        with tx() as session:
            session.add(Item(name="first"))
        # The interrupt fires *after* seconds into the wait itself, whatever
        # the machine's load: a timer from the block's start could land
        # before the wait began.
        waiting, done = threading.Event(), threading.Event()

        def note_wait(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            if "MASTER_GTID_WAIT" in statement.upper():
                waiting.set()

        def fire() -> None:
            if waiting.wait(10) and not done.is_set():
                time.sleep(after)
                _interrupt(how)

        sa.event.listen(pair.replica, "before_cursor_execute", note_wait)
        timer = threading.Thread(target=fire)
        try:
            timer.start()
            with pytest.raises(KeyboardInterrupt), tx(readonly=True) as session:
                session.scalars(sa.select(Item.name)).all()
                time.sleep(5)  # the wait ended before the interrupt: it lands here
        finally:
            done.set()
            waiting.set()
            timer.join()
            sa.event.remove(pair.replica, "before_cursor_execute", note_wait)
        assert rs.stats["waits"] == 1  # it was waiting on the replica
        assert pair.replica.pool.checkedout() == 0
        assert pair.engine.pool.checkedout() == 0
        with tx() as session:  # writes work
            session.add(Item(name="second"))
        rs.wait = 0.0
        with tx(readonly=True) as session:  # and reads see them (on the primary)
            assert server_id(session) == 1
            assert session.scalars(sa.select(Item.name).order_by(Item.id)).all() == [
                "first",
                "second",
            ]
    finally:
        replication(True)
    assert pair.replica.pool.checkedout() == 0 and pair.engine.pool.checkedout() == 0


@pytest.mark.parametrize("after", [0.05, 0.3])
def test_asyncmy_cancellation_during_master_gtid_wait_leaves_the_task_as_before(
    pair: SimpleNamespace, after: float
) -> None:
    """A timeout around a read-only block that waits in MASTER_GTID_WAIT
    (asyncmy): the task's later writes work, its reads see them, and no
    replica connection stays checked out."""
    pytest.importorskip("asyncmy")
    from sparc.sa.aio import AsyncScopedTransaction

    def to_async(dsn: str) -> str:
        return make_url(dsn).set(drivername="mysql+asyncmy").render_as_string(False)

    primary, replica = pair_dsns()
    Item = pair.models.Item

    async def main() -> None:
        engine: Any = engine_from_config(
            {"dsn": to_async(primary), "replicas": [to_async(replica)], "replica_wait": "1.5"}
        )
        atx = AsyncScopedTransaction(engine, pair.models.Base)
        rs = replica_set(engine)
        assert rs is not None
        try:
            await asyncio.to_thread(replication, False)
            async with atx() as session:
                session.add(Item(name="first"))
            loop = asyncio.get_running_loop()
            # The timeout runs out *after* seconds into the wait itself,
            # whatever the machine's load.
            async with asyncio.timeout(None) as deadline:

                def note_wait(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
                    if "MASTER_GTID_WAIT" in statement.upper():
                        deadline.reschedule(loop.time() + after)

                replica_engine = replicas(engine)[0].sync_engine
                sa.event.listen(replica_engine, "before_cursor_execute", note_wait)
                try:
                    with pytest.raises(asyncio.CancelledError):
                        async with atx(readonly=True) as session:
                            await session.scalars(sa.select(Item.name))
                            await asyncio.sleep(5)
                finally:
                    sa.event.remove(replica_engine, "before_cursor_execute", note_wait)
            assert rs.stats["waits"] == 1  # it was waiting on the replica
            for each in (engine, *replicas(engine)):
                assert each.sync_engine.pool.checkedout() == 0
            async with atx() as session:
                session.add(Item(name="second"))
            rs.wait = 0.0
            async with atx(readonly=True) as session:
                sid = (await session.execute(sa.text("SELECT @@server_id"))).scalar()
                found = (await session.scalars(sa.select(Item.name).order_by(Item.id))).all()
                assert (sid, found) == (1, ["first", "second"])
        finally:
            await asyncio.to_thread(replication, True)
            for each in (engine, *replicas(engine)):
                assert each.sync_engine.pool.checkedout() == 0
                await each.dispose()

    asyncio.run(main())


# -- servers that are not replicas of this primary -------------------------------------


def _port(session: Any) -> int:
    return int(session.execute(sa.text("SELECT @@port")).scalar())


def test_a_read_only_server_replicating_another_primary_serves_no_read(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The pair's replica (read_only=1) named as a replica of TEST_MYSQL_DSN's
    server, which it does not replicate (and which writes no binlog): a
    scope's own write is read on the primary, never missed on the replica."""
    _, replica = pair_dsns()
    dsn = os.environ.get("TEST_MYSQL_DSN")
    if not dsn:
        pytest.skip("TEST_MYSQL_DSN is not set, so there is no other MariaDB server")
    pair_primary = engine_from_config({"dsn": pair_dsns()[0]})
    engine = engine_from_config({"dsn": dsn, "replicas": [replica], "replica_wait": "0"})
    assert isinstance(engine, Engine) and isinstance(pair_primary, Engine)
    models = build_models()
    Item = models.Item
    models.Base.metadata.create_all(engine)  # the same table, empty, on the replica too
    models.Base.metadata.create_all(pair_primary)
    wait_caught_up(pair_primary)
    tx = ThreadLocalSASessionTransaction(engine, models.Base)
    primary_port = make_url(dsn).port or 3306
    try:
        with tx() as session:
            session.add(Item(name="mine"))
        with caplog.at_level(logging.WARNING, logger="sparc.sa.replicas"):
            for _ in range(3):
                with tx(readonly=True) as session:
                    assert _port(session) == primary_port
                    assert session.scalars(sa.select(Item.name)).all() == ["mine"]
                assert in_thread(lambda: _read_port(tx)) == primary_port
        rs = replica_set(engine)
        assert rs is not None and rs.stats["replica"] == 0
        assert rs.describe()[0]["state"] == "foreign"
        assert "binary log" in rs.describe()[0]["reason"]
        assert sum("not a standby" in r.getMessage() for r in caplog.records) == 1
    finally:
        models.Base.metadata.drop_all(engine)
        models.Base.metadata.drop_all(pair_primary)
        for each in (engine, *replicas(engine), pair_primary):
            assert each.pool.checkedout() == 0
            each.dispose()


def _read_port(tx: Any) -> int:
    with tx(readonly=True) as session:
        return _port(session)


def test_a_replica_of_another_server_id_serves_no_read_until_it_is_ours_again(
    pair: SimpleNamespace,
) -> None:
    """The primary's @@server_id is not the one the replica replicates
    (Master_Server_Id): the replica serves no read; once they match again
    (the primary restarted with its id), it is used again."""
    primary_dsn, _ = pair_dsns()
    owner = make_url(admin_dsn()).username
    primary_admin = sa.create_engine(
        make_url(primary_dsn).set(username=owner),
        isolation_level="AUTOCOMMIT",
        poolclass=sa.NullPool,
    )

    def set_server_id(value: int) -> None:
        with primary_admin.connect() as conn:
            conn.exec_driver_sql(f"SET GLOBAL server_id = {value}")

    rs = replica_set(pair.engine)
    assert rs is not None
    set_server_id(7)
    try:
        pair.engine.dispose()  # as after a restart: new connections, the id read anew
        with pair.tx() as session:
            session.add(pair.models.Item(name="mine"))
        with pair.tx(readonly=True) as session:
            assert server_id(session) == 7
            assert session.scalars(sa.select(pair.models.Item.name)).all() == ["mine"]
        assert in_thread(lambda: _read_server(pair.tx)) == 7
        assert rs.describe()[0]["state"] == "foreign"
        assert "replicates server id 1 (127.0.0.1:" in rs.describe()[0]["reason"]
        assert "the primary's server id is 7" in rs.describe()[0]["reason"]
    finally:
        set_server_id(1)
        primary_admin.dispose()
    (replica,) = rs.replicas
    time.sleep(max(0.0, replica.retry_at - time.monotonic()) + 0.05)  # the back-off
    assert in_thread(lambda: _read_server(pair.tx)) == 2
    assert rs.describe()[0]["state"] == "up"


# -- the primary's connection after a read-only block ----------------------------------


def test_interrupt_before_the_read_write_reset_leaves_no_read_only_connection_in_the_pool(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A KeyboardInterrupt after a read-only block's COMMIT and before its
    connection is set back to READ WRITE: the next writer, on the same
    one-connection pool, writes, in another thread too (whose scope was not
    interrupted, so nothing replaces the pool for it)."""
    import sparc.sa.replicas.gtid

    dsn = os.environ.get("TEST_MYSQL_DSN")
    if not dsn:
        pytest.skip("TEST_MYSQL_DSN is not set, so there is no mysql server to test against")
    engine = engine_from_config({"dsn": dsn, "kwargs": {"pool_size": 1, "max_overflow": 0}})
    assert isinstance(engine, Engine)
    models = build_models()
    models.Base.metadata.create_all(engine)
    tx = ThreadLocalSASessionTransaction(engine, models.Base)
    Item = models.Item
    end_read_only = sparc.sa.replicas.gtid.end_read_only
    landed: list[bool] = []

    def interrupted(mode: Any) -> None:
        if not landed:
            landed.append(True)
            raise KeyboardInterrupt
        end_read_only(mode)

    monkeypatch.setattr(sparc.sa.replicas.gtid, "end_read_only", interrupted)
    try:
        with pytest.raises(KeyboardInterrupt), tx(readonly=True) as session:
            assert session.scalars(sa.select(Item.name)).all() == []
        assert landed and engine.pool.checkedout() == 0

        def write() -> None:
            with tx() as session:
                session.add(Item(name="written"))

        in_thread(write)  # another thread, before this one opens a block again
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT @@session.tx_read_only").scalar() == 0
            assert conn.exec_driver_sql(f"SELECT name FROM {Item.__table__.name}").all() == [
                ("written",)
            ]
    finally:
        monkeypatch.undo()
        models.Base.metadata.drop_all(engine)
        assert engine.pool.checkedout() == 0
        engine.dispose()


def test_nested_token_is_honoured_or_refused_never_stale(pair: SimpleNamespace) -> None:
    """A token inside an open read-only block on the replica (REPEATABLE
    READ, MariaDB's default): a position the outer block saw is honoured; a
    later one raises StaleSnapshotError, never reads the stale snapshot."""
    from sparc.sa.exceptions import StaleSnapshotError

    tx, Item = pair.tx, pair.models.Item

    def write(name: str) -> str:
        with tx() as session:
            session.add(Item(name=name))
        token = tx.commit_token
        assert token is not None
        return token

    early = in_thread(lambda: write("early"))
    wait_caught_up(pair.engine)
    with tx(readonly=True, after=early) as session:
        assert server_id(session) == 2
        assert session.scalars(sa.select(Item.name)).all() == ["early"]
        with tx(readonly=True, after=early) as inner:  # seen: honoured
            assert inner.scalars(sa.select(Item.name)).all() == ["early"]
        late = in_thread(lambda: write("late"))
        with (
            pytest.raises(StaleSnapshotError, match="snapshot"),
            tx(readonly=True, after=late) as inner,
        ):
            inner.scalars(sa.select(Item.name)).all()
    with tx() as session:  # the scope is as before
        session.add(Item(name="after"))
    assert pair.engine.pool.checkedout() == 0 and pair.replica.pool.checkedout() == 0
