"""Replicas a reader can trust: a server that is not a standby of the
primary serves no read, tokens inside open blocks, interrupted waits,
refusing replicas, cut tokens, and faults tried for real.

The shared streaming replica (``TEST_PG_REPLICA_DSN``, port 5433) is only
read. Pausing replay, stopping and promoting need a throwaway replica of
their own, named by ``TEST_PG_FAULT_REPLICA_DSN`` (``.ci/run`` makes one
with ``PG_REPLICA_CLUSTER=replica_faults PG_REPLICA_PORT=5434 .ci/replica.sh``);
without it those cases skip with the reason.
"""

from __future__ import annotations

import _thread
import asyncio
import contextvars
import gc
import logging
import os
import shutil
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
from sparc.sa.exceptions import StaleSnapshotError
from sparc.sa.orm import ThreadLocalSASessionTransaction
from sparc.sa.replicas import ReplicaSet, commit_token, replica_set, replicas
from tests.conftest import build_models
from tests.test_replicas import (
    PASSWORD,
    control,
    ensure_fault_standby,
    pair_dsns,
    wait_caught_up,
)

ROOT = Path(__file__).parent.parent
PORT = sa.text("SELECT inet_server_port()")


def port_of(session: Any) -> int:
    return int(session.execute(PORT).scalar())


def in_thread(fn: Any) -> Any:
    """fn() in a new thread (a fresh scope); its result, or its exception raised here."""
    out: list[Any] = []

    def body() -> None:
        try:
            out.append((True, fn()))
        except BaseException as error:
            out.append((False, error))

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    ok, value = out[0]
    if not ok:
        raise value
    return value


def checked_in(*engines: Any) -> None:
    for each in engines:
        pool = getattr(each, "sync_engine", each).pool
        assert pool.checkedout() == 0, f"{each!r} has {pool.checkedout()} connection(s) out"


# -- configuration ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("primary", "replica"),
    [
        ("postgresql+psycopg://app@primary/app", "postgresql+asyncpg://app:{pw}@r1/app"),
        ("postgresql+asyncpg://app@primary/app", "postgresql+psycopg://app:{pw}@r1/app"),
    ],
)
def test_replica_with_the_other_kind_of_driver_is_refused_naming_it(
    primary: str, replica: str
) -> None:
    pytest.importorskip("asyncpg")
    named = r"replica postgresql\+\w+://app:\*\*\*@r1/app has"
    with pytest.raises(ValueError, match=named) as info:
        engine_from_config({"dsn": primary, "replicas": [replica.format(pw=PASSWORD)]})
    assert PASSWORD not in str(info.value)
    assert "asyncio" in str(info.value) and "synchronous" in str(info.value)


@pytest.mark.parametrize("wait", ["inf", float("inf"), "nan", "-1"])
def test_replica_wait_must_be_finite(wait: object) -> None:
    with pytest.raises(ValueError, match=r"'replica_wait' must be a number of seconds.*finite"):
        engine_from_config(
            {"dsn": "postgresql+psycopg://h/db", "replicas": [], "replica_wait": wait}
        )


def test_positions_do_not_pass_to_a_new_replica_set_with_a_reused_id(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A scope's position noted for one primary never reaches another that
    Python allocated at the address of a collected one. The reuse is made
    certain here by giving every object the same id() in the module."""
    import sparc.sa.replicas

    monkeypatch.setattr(sparc.sa.replicas, "id", lambda obj: 1, raising=False)
    gone = ReplicaSet(sa.create_engine("postgresql+psycopg://h/db"), [])
    gone.note(12345)
    assert gone.position() == 12345
    new = ReplicaSet(sa.create_engine("postgresql+psycopg://h/db"), [])
    assert new.position() == 0


# -- a real primary and the shared standby (read only) ---------------------------------


@pytest.fixture
def pair() -> Iterator[SimpleNamespace]:
    primary_dsn, replica_dsn = pair_dsns()
    engine = engine_from_config({"dsn": primary_dsn, "replicas": [replica_dsn]})
    assert isinstance(engine, Engine)
    models = build_models()
    models.Base.metadata.create_all(engine)
    wait_caught_up(engine, replica_dsn)
    rs = replica_set(engine)
    assert rs is not None
    yield SimpleNamespace(
        engine=engine,
        replica=replicas(engine)[0],
        rs=rs,
        models=models,
        tx=ThreadLocalSASessionTransaction(engine, models.Base),
        port=make_url(replica_dsn).port,
        primary_port=make_url(primary_dsn).port or 5432,
    )
    models.Base.metadata.drop_all(engine)
    checked_in(engine, *replicas(engine))
    for each in (engine, *replicas(engine)):
        each.dispose()


@pytest.mark.parametrize("differs", ["system identifier", "timeline"])
def test_standby_of_another_cluster_or_timeline_serves_no_read(
    pair: SimpleNamespace, differs: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The replica's system identifier or timeline is compared with the
    primary's: one that differs serves no read-only block, with one warning."""
    tx, rs = pair.tx, pair.rs
    assert in_thread(lambda: tx.run(port_of, readonly=True)) == pair.port
    system, timeline = rs.load_identity()
    # As if the primary were another cluster, or had moved to a new timeline.
    rs.identity = ("1", timeline) if differs == "system identifier" else (system, timeline + 1)
    rs.replicas[0].checked = 0.0  # the next check is due
    with caplog.at_level(logging.WARNING, logger="sparc.sa.replicas"):
        ports = [in_thread(lambda: tx.run(port_of, readonly=True)) for _ in range(3)]
    assert ports == [pair.primary_port] * 3
    assert rs.describe()[0]["state"] == "foreign"
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and differs in warnings[0] and "not a standby" in warnings[0]
    # Its own again: back in use after the back-off.
    rs.identity = (system, timeline)
    rs.replicas[0].retry_at = 0.0
    assert in_thread(lambda: tx.run(port_of, readonly=True)) == pair.port
    assert rs.describe()[0]["state"] == "up"


def test_cut_or_altered_token_is_refused_or_read_on_the_primary(pair: SimpleNamespace) -> None:
    """Every prefix of a real token, and every one-character change of it,
    either raises ValueError or reads on the primary: never on the replica
    below the token's position."""
    tx, Item = pair.tx, pair.models.Item
    with tx() as Session:
        Session.add(Item(name="mine"))
    token = tx.commit_token
    assert token is not None
    wait_caught_up(pair.engine, make_url(pair.replica.url).render_as_string(False))
    variants = {token[:cut] for cut in range(1, len(token))}
    for index, char in enumerate(token):
        if char in "0123456789abcdefABCDEF":
            for other in "05aF":
                if other.lower() != char.lower():
                    variants.add(token[:index] + other + token[index + 1 :])
    variants.discard(token)
    outcomes: dict[str, int] = {}
    for variant in sorted(variants):

        def read(variant: str = variant) -> str:
            try:
                port = tx.run(port_of, readonly=True, after=variant)
            except ValueError:
                return "refused"
            return "primary" if port == pair.primary_port else "replica"

        outcome = in_thread(read)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        assert outcome != "replica", f"{variant!r} (from {token!r}) was read on the replica"
    assert outcomes.get("refused", 0) > 0 and outcomes.get("primary", 0) > 0
    # The token itself still reads on the replica once it has replayed it.
    assert in_thread(lambda: tx.run(port_of, readonly=True, after=token)) == pair.port


@pytest.mark.parametrize("max_lag", [None, 5])
def test_refusing_replica_is_skipped_without_error(
    max_lag: float | None, caplog: pytest.LogCaptureFixture
) -> None:
    primary_dsn, replica_dsn = pair_dsns()
    dead = make_url(replica_dsn).set(port=1).render_as_string(False)
    config: dict[str, Any] = {"dsn": primary_dsn, "replicas": [dead]}
    if max_lag is not None:
        config["replica_max_lag"] = max_lag
    engine = engine_from_config(config)
    tx = ThreadLocalSASessionTransaction(engine, build_models().Base)
    try:

        def read() -> int:
            with tx(readonly=True) as Session:  # a fresh scope's first block
                return port_of(Session())

        with caplog.at_level(logging.WARNING, logger="sparc.sa.replicas"):
            assert [in_thread(read) for _ in range(3)] == [make_url(primary_dsn).port] * 3
        assert replica_set(engine).describe()[0]["state"] == "down"  # type: ignore[union-attr]
        assert PASSWORD not in caplog.text
    finally:
        checked_in(engine, *replicas(engine))
        engine.dispose()


def test_refusing_replica_named_in_zcml_is_skipped_without_error() -> None:
    from zope import component
    from zope.configuration import xmlconfig

    import sparc.sa
    from sparc.sa.interfaces import ISAEngine
    from sparc.sa.zcml import NAMESPACE

    primary_dsn, replica_dsn = pair_dsns()
    dead = make_url(replica_dsn).set(port=1).render_as_string(False)
    context = xmlconfig.file("configure.zcml", package=sparc.sa)
    xmlconfig.string(
        f"""<configure xmlns="http://namespaces.zope.org/zope" xmlns:sa="{NAMESPACE}">
           <sa:engine name="refusing" dsn="{primary_dsn}" replicas="{dead}" />
           </configure>""",
        context=context,
    )
    engine = component.getUtility(ISAEngine, "refusing")
    tx = ThreadLocalSASessionTransaction(engine, build_models().Base)
    try:

        def read() -> int:
            with tx(readonly=True) as Session:
                return port_of(Session())

        assert in_thread(read) == make_url(primary_dsn).port
    finally:
        checked_in(engine, *replicas(engine))
        engine.dispose()


def test_refusing_replica_is_skipped_without_error_asyncpg() -> None:
    pytest.importorskip("asyncpg")
    from sparc.sa.aio import AsyncScopedTransaction

    primary_dsn, replica_dsn = pair_dsns()

    def to_async(dsn: str, **parts: Any) -> str:
        return make_url(dsn).set(drivername="postgresql+asyncpg", **parts).render_as_string(False)

    engine: Any = engine_from_config(
        {"dsn": to_async(primary_dsn), "replicas": [to_async(replica_dsn, port=1)]}
    )
    atx = AsyncScopedTransaction(engine, build_models().Base)

    async def main() -> list[int]:
        async def read() -> int:
            async with atx(readonly=True) as session:
                return int((await session.execute(PORT)).scalar())

        try:
            return [await asyncio.create_task(read()) for _ in range(3)]
        finally:
            checked_in(engine, *replicas(engine))
            for each in (engine, *replicas(engine)):
                await each.dispose()

    assert asyncio.run(main()) == [make_url(primary_dsn).port] * 3


def test_thread_ending_inside_a_readonly_block_leaves_no_primary_connection() -> None:
    """A thread used its session outside blocks (a connection checked out),
    then ended inside a read-only block (held open by a generator, say): the
    session it set aside is closed as the thread ends, not at the next
    garbage collection."""
    dsn = os.environ.get("TEST_PG_DSN")
    if not dsn:
        pytest.skip("TEST_PG_DSN is not set, so there is no postgresql server to test against")
    engine = engine_from_config({"dsn": dsn})
    tx = ThreadLocalSASessionTransaction(engine, build_models().Base)
    held: list[Any] = []

    def body() -> None:
        tx.session.execute(sa.text("SELECT 1"))  # outside any block
        block = tx(readonly=True)
        block.__enter__()
        held.append(block)  # left open when the thread ends

    gc.disable()
    try:
        thread = threading.Thread(target=body)
        thread.start()
        thread.join()
        assert engine.pool.checkedout() == 0
    finally:
        gc.enable()
        held.clear()
        gc.collect()
        engine.dispose()


# -- a throwaway replica of our own: paused replay, stops, kills, promotion ---------


def fault_dsns() -> tuple[str, str]:
    primary = os.environ.get("TEST_PG_DSN")
    replica = os.environ.get("TEST_PG_FAULT_REPLICA_DSN")
    if not primary or not replica:
        pytest.skip(
            "TEST_PG_DSN and TEST_PG_FAULT_REPLICA_DSN are not both set, so there is no "
            "throwaway replica to pause, stop or promote (.ci/run makes one: "
            "PG_REPLICA_CLUSTER=replica_faults PG_REPLICA_PORT=5434 .ci/replica.sh)"
        )
    return primary, replica


def fault_cluster() -> str:
    return os.environ.get("TEST_PG_FAULT_REPLICA_CLUSTER", "replica_faults")


def remake_fault_replica(replica_dsn: str) -> None:
    """Make the throwaway replica a standby of the primary again (promotion
    is one-way: .ci/replica.sh drops and makes it again)."""
    if os.geteuid() != 0 or shutil.which("pg_ctlcluster") is None:
        pytest.skip("re-making the throwaway replica needs root and Debian's pg_ctlcluster")
    env = {
        **os.environ,
        "PG_REPLICA_CLUSTER": fault_cluster(),
        "PG_REPLICA_PORT": str(make_url(replica_dsn).port),
    }
    subprocess.run(
        [str(ROOT / ".ci" / "replica.sh")], env=env, check=True, capture_output=True, timeout=300
    )


def set_paused(replica_dsn: str, paused: bool) -> None:
    control(replica_dsn, f"SELECT pg_wal_replay_{'pause' if paused else 'resume'}()")


@pytest.fixture
def faults() -> Iterator[SimpleNamespace]:
    primary_dsn, replica_dsn = fault_dsns()
    ensure_fault_standby(replica_dsn)  # stopped or promoted by an interrupted test: again
    set_paused(replica_dsn, False)
    engine = engine_from_config({"dsn": primary_dsn, "replicas": [replica_dsn], "replica_wait": 3})
    assert isinstance(engine, Engine)
    models = build_models()
    models.Base.metadata.create_all(engine)
    wait_caught_up(engine, replica_dsn)
    rs = replica_set(engine)
    assert rs is not None
    ns = SimpleNamespace(
        engine=engine,
        replica=replicas(engine)[0],
        replica_dsn=replica_dsn,
        rs=rs,
        models=models,
        tx=ThreadLocalSASessionTransaction(engine, models.Base),
        port=make_url(replica_dsn).port,
        primary_port=make_url(primary_dsn).port or 5432,
    )
    try:
        yield ns
    finally:
        if control(replica_dsn, "SELECT pg_is_in_recovery()") == [True]:
            set_paused(replica_dsn, False)
        models.Base.metadata.drop_all(engine)
        checked_in(engine, *replicas(engine))
        for each in (engine, *replicas(engine)):
            each.dispose()


def names(session: Any, Item: Any) -> list[str]:
    return list(session.scalars(sa.select(Item.name).order_by(Item.id)).all())


def test_nested_token_is_honoured_or_refused_never_stale(faults: SimpleNamespace) -> None:
    tx, Item = faults.tx, faults.models.Item
    faults.rs.wait = 0.5
    set_paused(faults.replica_dsn, True)
    with tx() as Session:
        Session.add(Item(name="mine"))
    token = tx.commit_token

    resumed: list[object] = []

    def resume() -> None:
        try:
            set_paused(faults.replica_dsn, False)
            resumed.append(time.monotonic())
        except Exception as error:  # shown in the failure below, not lost in the thread
            resumed.append(error)

    def nested(resume_after: float | None) -> tuple[int, list[str]]:
        with tx(readonly=True) as Session:  # a fresh scope: on the replica
            outer_port = port_of(Session())
            assert names(Session(), Item) == []  # replay is paused
            if resume_after is not None:
                threading.Timer(resume_after, resume).start()
            with tx(readonly=True, after=token) as Inner:
                return outer_port, names(Inner(), Item)

    # The replica cannot replay it in time, and the outer block cannot move.
    with pytest.raises(StaleSnapshotError, match="did not replay the token's commit"):
        in_thread(lambda: nested(None))
    # It replays it while the inner block waits: honoured, in the outer block.
    # The wait is generous: the block returns as soon as the replica has
    # replayed the commit (under a second here), but one CI run, on a replica
    # made seconds before, saw it take over 3 s after the resume.
    faults.rs.wait = 10.0
    started = time.monotonic()
    try:
        found = in_thread(lambda: nested(0.3))
    except StaleSnapshotError as error:
        state = control(
            faults.replica_dsn,
            "SELECT pg_get_wal_replay_pause_state()",
            "SELECT pg_last_wal_receive_lsn()::text",
            "SELECT pg_last_wal_replay_lsn()::text",
        )
        raise AssertionError(
            f"not honoured ({error}); resumed: {resumed} (wait began at {started}); "
            f"the replica's pause state, received and replayed WAL now: {state}; "
            f"the token: {token}"
        ) from error
    assert found == (faults.port, ["mine"])
    checked_in(faults.engine, faults.replica)


def test_nested_token_in_a_repeatable_read_outer_block_is_refused(
    faults: SimpleNamespace,
) -> None:
    """A writing block under REPEATABLE READ took its snapshot: a token
    inside it cannot be shown to be seen, so it is refused."""
    tx, Item = faults.tx, faults.models.Item
    with tx() as Session:
        Session.add(Item(name="mine"))
    token = tx.commit_token

    def nested() -> None:
        with tx() as Session:
            Session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
            names(Session(), Item)
            with tx(readonly=True, after=token):
                pass

    with pytest.raises(StaleSnapshotError, match=r"\(repeatable read\)"):
        in_thread(nested)


def test_nested_token_async_honoured_or_refused(faults: SimpleNamespace) -> None:
    pytest.importorskip("asyncpg")
    from sparc.sa.aio import AsyncScopedTransaction

    def to_async(dsn: str) -> str:
        return make_url(dsn).set(drivername="postgresql+asyncpg").render_as_string(False)

    primary_dsn, replica_dsn = fault_dsns()
    engine: Any = engine_from_config(
        {"dsn": to_async(primary_dsn), "replicas": [to_async(replica_dsn)], "replica_wait": 0.5}
    )
    Item = faults.models.Item
    atx = AsyncScopedTransaction(engine, faults.models.Base)

    async def main() -> None:
        set_paused(replica_dsn, True)
        async with atx() as session:
            session.add(Item(name="mine"))
        token = commit_token(engine)
        assert token is not None

        async def nested(resume_after: float | None) -> tuple[int, list[str]]:
            async with atx(readonly=True) as session:
                port = int((await session.execute(PORT)).scalar())
                if resume_after is not None:
                    threading.Timer(resume_after, set_paused, (replica_dsn, False)).start()
                async with atx(readonly=True, after=token) as inner:
                    found = (await inner.scalars(sa.select(Item.name))).all()
                    return port, list(found)

        async def outcome() -> Any:
            try:
                return await nested(None)
            except StaleSnapshotError as error:
                return error

        try:
            # Tasks of a fresh context, which never wrote: on the replica,
            # refused. Should the outer block have gone to the primary (the
            # replica judged down under load), the token is honoured there:
            # either way, never a read without the token's write.
            got = await asyncio.create_task(outcome(), context=contextvars.Context())
            if not isinstance(got, StaleSnapshotError):
                port, found = got
                assert found == ["mine"], "a stale read inside an outer read-only block"
                assert port != faults.port, "honoured on a replica whose replay is paused"
            replica_set(engine).wait = 3.0  # type: ignore[union-attr]
            fresh = contextvars.Context()
            assert await asyncio.create_task(nested(0.3), context=fresh) == (
                faults.port,
                ["mine"],
            )
        finally:
            set_paused(replica_dsn, False)
            checked_in(engine, *replicas(engine))
            for each in (engine, *replicas(engine)):
                await each.dispose()

    asyncio.run(main())


def test_async_commit_token_carries_a_task_s_write_to_another_task(
    faults: SimpleNamespace,
) -> None:
    """atx.commit_token, given to a task that never wrote, makes its read see
    the write while the replica has not replayed it."""
    pytest.importorskip("asyncpg")
    from sparc.sa.aio import AsyncScopedTransaction

    def to_async(dsn: str) -> str:
        return make_url(dsn).set(drivername="postgresql+asyncpg").render_as_string(False)

    primary_dsn, replica_dsn = fault_dsns()
    engine: Any = engine_from_config(
        {"dsn": to_async(primary_dsn), "replicas": [to_async(replica_dsn)], "replica_wait": 0}
    )
    Item = faults.models.Item
    atx = AsyncScopedTransaction(engine, faults.models.Base)

    async def main() -> None:
        set_paused(replica_dsn, True)
        try:
            assert atx.commit_token is None
            async with atx() as session:
                session.add(Item(name="mine"))
            token = atx.commit_token
            assert token is not None and token.startswith("pg:")

            async def read(after: str | None) -> list[str]:
                async with atx(readonly=True, after=after) as session:
                    return list((await session.scalars(sa.select(Item.name))).all())

            fresh = contextvars.Context
            assert await asyncio.create_task(read(None), context=fresh()) == []  # the replica
            assert await asyncio.create_task(read(token), context=fresh()) == ["mine"]
        finally:
            set_paused(replica_dsn, False)
            checked_in(engine, *replicas(engine))
            for each in (engine, *replicas(engine)):
                await each.dispose()

    asyncio.run(main())


@pytest.mark.parametrize("after", [0.01, 0.05, 0.15, 0.4])
def test_keyboard_interrupt_while_waiting_leaves_the_scope_as_before(
    faults: SimpleNamespace, after: float
) -> None:
    """A KeyboardInterrupt at any point of the wait for the replica: the
    thread's later writing blocks work, its read-only blocks see its own
    writes, and no connection stays checked out.

    The interrupt fires *after* seconds into the wait itself (from the
    first statement on the replica), whatever the machine's load. Timed
    from the block's start instead, it could land inside psycopg's own
    connect, in a Connection that psycopg had not yet handed to anyone:
    nobody can close that one, and it is not what this test is about."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("KeyboardInterrupt reaches the main thread only")
    tx, Item = faults.tx, faults.models.Item
    set_paused(faults.replica_dsn, True)
    with tx() as Session:
        Session.add(Item(name="first"))
    waiting, done = threading.Event(), threading.Event()

    def note_wait(*args: Any) -> None:
        waiting.set()

    def fire() -> None:
        if waiting.wait(10) and not done.is_set():
            time.sleep(after)
            if not done.is_set():
                _thread.interrupt_main()

    sa.event.listen(faults.replica, "before_cursor_execute", note_wait)
    timer = threading.Thread(target=fire)
    try:
        timer.start()
        with pytest.raises(KeyboardInterrupt), tx(readonly=True) as Session:
            names(Session(), Item)
            time.sleep(5)  # the wait ended before the interrupt: it lands here
    finally:
        done.set()
        waiting.set()
        timer.join()
        sa.event.remove(faults.replica, "before_cursor_execute", note_wait)
    assert faults.rs.stats["waits"] >= 1  # it was waiting on the replica
    checked_in(faults.replica)
    with tx() as Session:  # writes work
        Session.add(Item(name="second"))
    faults.rs.wait = 0.0
    with tx(readonly=True) as Session:  # and reads see them
        assert names(Session(), Item) == ["first", "second"]
    set_paused(faults.replica_dsn, False)
    checked_in(faults.engine, faults.replica)


@pytest.mark.parametrize("after", [0.01, 0.05, 0.15, 0.4])
def test_timeout_while_waiting_leaves_the_task_as_before(
    faults: SimpleNamespace, after: float
) -> None:
    pytest.importorskip("asyncpg")
    from sparc.sa.aio import AsyncScopedTransaction

    def to_async(dsn: str) -> str:
        return make_url(dsn).set(drivername="postgresql+asyncpg").render_as_string(False)

    primary_dsn, replica_dsn = fault_dsns()
    engine: Any = engine_from_config(
        {"dsn": to_async(primary_dsn), "replicas": [to_async(replica_dsn)], "replica_wait": 3}
    )
    Item = faults.models.Item
    atx = AsyncScopedTransaction(engine, faults.models.Base)

    async def main() -> None:
        set_paused(replica_dsn, True)
        try:
            async with atx() as session:
                session.add(Item(name="first"))
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(after), atx(readonly=True) as session:
                    await session.scalars(sa.select(Item.name))
                    await asyncio.sleep(5)
            checked_in(*replicas(engine))
            async with atx() as session:
                session.add(Item(name="second"))
            async with atx(readonly=True) as session:
                found = (await session.scalars(sa.select(Item.name).order_by(Item.id))).all()
                assert found == ["first", "second"]
        finally:
            set_paused(replica_dsn, False)
            checked_in(engine, *replicas(engine))
            for each in (engine, *replicas(engine)):
                await each.dispose()

    asyncio.run(main())


def pg_cluster(action: str, replica_dsn: str) -> None:
    if os.geteuid() != 0 or shutil.which("pg_ctlcluster") is None:
        pytest.skip("stopping the throwaway replica needs root and Debian's pg_ctlcluster")
    version = sorted(os.listdir("/etc/postgresql"), key=float)[-1]
    extra = ["-m", "fast"] if action == "stop" else []
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, fault_cluster(), action, *extra],
        check=True,
        capture_output=True,
    )


def test_faults_under_load_lose_no_read_and_serve_none_stale(faults: SimpleNamespace) -> None:
    """Writers write a row and hand its token to readers in other threads,
    who read it back with run(readonly=True, after=token), while the
    throwaway replica has its replay paused, is stopped and started, has the
    backend of a read-only block terminated under it, and is promoted.
    Every read is counted: none lost, none stale, no connection left."""
    tx, Item = faults.tx, faults.models.Item
    faults.rs.wait = 0.2
    handed: list[tuple[int, str | None]] = []
    cond = threading.Condition()
    stop = threading.Event()
    counts = {"written": 0, "read": 0, "stale": 0, "errors": 0, "on replica": 0}
    errors: list[BaseException] = []
    serial = iter(range(1, 1_000_000))
    lock = threading.Lock()

    def writer() -> None:
        while not stop.is_set():
            with lock:
                n = next(serial)
            with tx() as Session:
                Session.add(Item(id=n, name=f"u{n}"))
            with cond:
                handed.append((n, tx.commit_token))
                counts["written"] += 1
                cond.notify()
            time.sleep(0.01)

    def reader() -> None:
        while True:
            with cond:
                while not handed and not stop.is_set():
                    cond.wait(0.1)
                if not handed:
                    return
                n, token = handed.pop(0)

            def read(session: Any, n: int = n) -> tuple[Any, int]:
                return session.get(Item, n), port_of(session)

            try:
                found, port = tx.run(read, readonly=True, after=token)
            except BaseException as error:
                with cond:
                    counts["errors"] += 1
                    errors.append(error)
                continue
            with cond:
                counts["read"] += 1
                counts["stale"] += found is None
                counts["on replica"] += port == faults.port

    threads = [threading.Thread(target=writer) for _ in range(2)]
    threads += [threading.Thread(target=reader) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        set_paused(faults.replica_dsn, True)  # replay paused
        time.sleep(1.0)
        set_paused(faults.replica_dsn, False)
        time.sleep(0.5)
        pg_cluster("stop", faults.replica_dsn)  # stopped mid-load
        time.sleep(1.0)
        pg_cluster("start", faults.replica_dsn)
        time.sleep(1.5)
        # A backend terminated under a read-only block (our own block's).
        killed: list[int] = []
        for _ in range(20):

            def kill_own(session: Any) -> int:
                if not killed and port_of(session) == faults.port:
                    pid = session.execute(sa.text("SELECT pg_backend_pid()")).scalar()
                    control(faults.replica_dsn, f"SELECT pg_terminate_backend({int(pid)})")
                    killed.append(pid)
                return port_of(session)

            in_thread(lambda: tx.run(kill_own, readonly=True))
            if killed:
                break
            time.sleep(0.1)
        assert killed, "no read-only block ran on the replica to kill its backend"
        time.sleep(0.5)
        control(faults.replica_dsn, "SELECT pg_promote()")  # promoted
        time.sleep(1.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        with cond:
            cond.notify_all()
    promoted_reads = [in_thread(lambda: tx.run(port_of, readonly=True)) for _ in range(5)]
    print(f"\nfaults: {counts}, routed {faults.rs.stats}")
    try:
        assert errors == [] and counts["errors"] == 0
        assert counts["read"] == counts["written"] > 100
        assert counts["stale"] == 0
        assert counts["on replica"] > 0
        assert promoted_reads == [faults.primary_port] * 5  # the promoted server serves none
        assert faults.rs.describe()[0]["state"] == "foreign"
        checked_in(faults.engine, faults.replica)
    finally:
        remake_fault_replica(faults.replica_dsn)
